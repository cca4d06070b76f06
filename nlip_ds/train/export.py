"""`nlip-ds export`: consolidate a ZeRO-3 run into the DeepSpeed-free NLIPModel format."""
from __future__ import annotations

import logging
from pathlib import Path

from nlip_ds.run.model import load_run_model

logger = logging.getLogger(__name__)


def export(run_dir: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    model, cfg, _ = load_run_model(run_dir, tag)
    model.save_pretrained(out_dir, tokenizer_dir=cfg.data.tokenizer)
    return Path(out_dir)
