"""`nlip-ds export`: consolidate a ZeRO-3 run and write it as NLIPModel, transformers CLIP or open_clip
(nlip_ds/interop/, docs/export.md)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from nlip_ds.config import from_dict

logger = logging.getLogger(__name__)


def _checkpoint_root(path: Path) -> Path:
    if (path / "latest").is_file():
        return path
    if (path / "checkpoints" / "latest").is_file():
        return path / "checkpoints"
    raise FileNotFoundError(f"{path}: no ZeRO checkpoint found (expected {path}/checkpoints/latest)")


def load_run_model(run_dir: str | Path, tag: str | None = None):
    """(NLIPModel with the consolidated fp32 weights, the run's Config, the checkpoint folder of `tag`).

    Consolidates in memory on the calling process; no DeepSpeed engine or process group is needed.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from nlip_ds.data.tokenizer import load_tokenizer
    from nlip_ds.model import NLIPModel
    from nlip_ds.train.engine import read_latest, verify_checkpoint

    root = _checkpoint_root(Path(run_dir))
    run = root.parent
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    tag = tag or read_latest(root)
    verify_checkpoint(root / tag)  # a clear error naming a missing or truncated file
    logger.info("consolidating %s/%s", root, tag)
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    weights = {k.removeprefix("model."): v for k, v in state.items()}  # the task module holds the model
    tok = load_tokenizer(cfg.data.tokenizer)
    model = NLIPModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                      eos_id=tok.eos_id, sep_id=tok.sep_id)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {root / tag} does not match the model of {run / 'config.yaml'}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, cfg, root / tag


def export(run_dir: str | Path, out_dir: str | Path, tag: str | None = None, formats: tuple[str, ...] = ("nlip",),
           open_clip_name: str | None = None) -> dict[str, Path]:
    """{format: folder}: one format is written into `out_dir`, several into a sub-folder each."""
    from nlip_ds.config import git_sha
    from nlip_ds.interop.write import write_exports
    from nlip_ds.interop.folder import Source

    model, cfg, ckpt = load_run_model(run_dir, tag)
    run_json = ckpt.parent.parent / "run.json"
    train_sha = json.loads(run_json.read_text()).get("git_sha", "unknown") if run_json.is_file() else "unknown"
    source = Source(str(Path(run_dir).resolve()), ckpt.name, train_sha, git_sha())
    return write_exports(model, cfg.data.tokenizer, out_dir, list(formats), source, open_clip_name)
