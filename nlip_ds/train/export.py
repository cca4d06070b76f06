"""`nlip-ds export`: consolidate a ZeRO-3 run and write it as NLIPModel, transformers CLIP or open_clip
(nlip_ds/interop/, docs/export.md)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from nlip_ds.run.layout import RunFolder
from nlip_ds.run.model import load_run_model

logger = logging.getLogger(__name__)


def export(run_dir: str | Path, out_dir: str | Path, tag: str | None = None, formats: tuple[str, ...] = ("nlip",),
           open_clip_name: str | None = None) -> dict[str, Path]:
    """{format: folder}: one format is written into `out_dir`, several into a sub-folder each."""
    from nlip_ds.config import git_sha
    from nlip_ds.interop.folder import Source
    from nlip_ds.interop.write import write_exports

    model, cfg, ckpt = load_run_model(run_dir, tag)
    run_info = RunFolder(ckpt.parent.parent).run_info
    train_sha = json.loads(run_info.read_text()).get("git_sha", "unknown") if run_info.is_file() else "unknown"
    source = Source(str(Path(run_dir).resolve()), ckpt.name, train_sha, git_sha())
    return write_exports(model, cfg.data.tokenizer, out_dir, list(formats), source, open_clip_name)
