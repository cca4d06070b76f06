"""What `nlip-ds eval --checkpoint` accepts: a training run folder (ZeRO-3 checkpoint) or an exported model.

A run folder is consolidated in memory with run/model.py's load_run_model (DeepSpeed's zero_to_fp32 on
the saved shards); the result is a plain NLIPModel, so evaluation needs no engine and no lockstep. Results go
into the run folder (eval/<task>.json, the run's own TensorBoard), or into an eval/ folder in the export.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from nlip_ds.choices import PRECISIONS
from nlip_ds.run.layout import RunFolder, checkpoint_root, folder_kind, step_of

logger = logging.getLogger(__name__)

DTYPES = dict(zip(PRECISIONS, (torch.float32, torch.bfloat16, torch.float16)))


def inference_dtype(precision: str, device) -> torch.dtype:
    """The weights' dtype for --precision; fp16 is refused on a CPU device before anything is loaded (PyTorch's
    CPU kernels lack or crawl through much of fp16, as train.precision=fp16 is refused on CPU ranks)."""
    if precision not in DTYPES:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ValueError("--precision fp16 needs a GPU; use --precision bf16 on the CPU")
    return DTYPES[precision]


@dataclass
class LoadedModel:
    model: object  # NLIPModel in eval mode, on the requested device
    tokenizer: object  # nlip_ds.data.tokenizer.Tokenizer
    kind: str  # "run" or "export"
    folder: Path  # the run folder or the export folder
    step: int  # the checkpoint's global step (0 for an export)

    def default_output(self, task: str) -> Path:
        return RunFolder(self.folder).eval_result(task)

    @property
    def tensorboard_dir(self) -> Path:
        """Where the eval/ scalars go: the run's own TensorBoard, or eval/ inside the export."""
        return self.folder if self.kind == "run" else RunFolder(self.folder).eval_dir


def load_for_eval(path: str | Path, tag: Optional[str] = None, device="cpu", precision: str = "fp32"
                  ) -> LoadedModel:
    """The model in eval mode on `device` with its weights in `precision` (fp32, bf16, fp16): every module casts
    its floating inputs to its weights' dtype, and the embeddings are scored in float32 (eval/embed.py)."""
    from nlip_ds.data.tokenizer import load_tokenizer
    from nlip_ds.model import NLIPModel

    dtype = inference_dtype(precision, device)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if folder_kind(path) == "export":
        tokenizer_dir = path / "tokenizer"
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"export {path} has no tokenizer/ folder (export with the tokenizer)")
        model = NLIPModel.from_pretrained(path, map_location=device).to(dtype=dtype).eval()
        return LoadedModel(model, load_tokenizer(tokenizer_dir), "export", path, 0)
    from nlip_ds.run.model import load_run_model

    model, cfg, ckpt = load_run_model(path, tag)
    run = checkpoint_root(path).parent
    logger.info("consolidated %s in memory", ckpt)
    return LoadedModel(model.to(device=device, dtype=dtype).eval(), load_tokenizer(cfg.data.tokenizer), "run", run,
                       step_of(ckpt.name))
