"""What `nlip-ds eval --checkpoint` accepts: a training run folder (ZeRO-3 checkpoint) or an exported model.

A run folder is consolidated in memory with train/export.py's load_run_model (DeepSpeed's zero_to_fp32 on
the saved shards); the result is a plain NLIPModel, so evaluation needs no engine and no lockstep. Results go
into the run folder (eval/<task>.json, the run's own TensorBoard), or into an eval/ folder in the export.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: object  # NLIPModel in eval mode, on the requested device
    tokenizer: object  # nlip_ds.data.tokenizer.Tokenizer
    kind: str  # "run" or "export"
    folder: Path  # the run folder or the export folder
    step: int  # the checkpoint's global step (0 for an export)

    def default_output(self, task: str) -> Path:
        return self.folder / "eval" / f"{task}.json"

    @property
    def tensorboard_dir(self) -> Path:
        """Where the eval/ scalars go: the run's own TensorBoard, or eval/ inside the export."""
        return self.folder if self.kind == "run" else self.folder / "eval"


def checkpoint_kind(path: Path) -> str:
    if (path / "checkpoints" / "latest").is_file() or (path / "latest").is_file():
        return "run"
    if (path / "config.json").is_file():
        return "export"
    raise FileNotFoundError(f"{path} is neither a training run folder (no checkpoints/latest) nor an exported "
                            f"model (no config.json)")


def _step_of(tag: str) -> int:
    """The trainer names checkpoint folders step<N> (step<N>.<id>.partial while `latest` is being swapped); any
    other tag is logged at step 0."""
    match = re.search(r"step(\d+)", tag)
    return int(match.group(1)) if match else 0


def load_for_eval(path: str | Path, tag: Optional[str] = None, device="cpu") -> LoadedModel:
    from nlip_ds.data.tokenizer import load_tokenizer
    from nlip_ds.model import NLIPModel

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if checkpoint_kind(path) == "export":
        tokenizer_dir = path / "tokenizer"
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"export {path} has no tokenizer/ folder (export with the tokenizer)")
        model = NLIPModel.from_pretrained(path, map_location=device)
        return LoadedModel(model, load_tokenizer(tokenizer_dir), "export", path, 0)
    from nlip_ds.train.export import load_run_model

    model, cfg, ckpt = load_run_model(path, tag)
    run = path if (path / "checkpoints").is_dir() else path.parent
    logger.info("consolidated %s in memory", ckpt)
    return LoadedModel(model.to(device).eval(), load_tokenizer(cfg.data.tokenizer), "run", run, _step_of(ckpt.name))
