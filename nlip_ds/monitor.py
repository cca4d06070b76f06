"""Logging setup, the metric sink (TensorBoard + metrics.jsonl, rank 0 only) and the progress line.

Tags are namespaced: train/, noise/, eval/, throughput/, data/. Every other module logs through `logging` and
hands numbers to a `MetricSink`; nothing else writes event files.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Mapping, Optional

from nlip_ds.run.layout import RunFolder

logger = logging.getLogger(__name__)


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """One handler on stderr; ranks other than 0 only report warnings, with their rank in the prefix."""
    fmt = f"[%(asctime)s] [rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls torch 2.13's renamed collectives by their old names on every step; the warning
    # says nothing a user can act on and would flood the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class MetricSink:
    """`log(dict, step)` to TensorBoard and metrics.jsonl; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        if not enabled:
            return
        run = RunFolder(run_dir)
        run.root.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run.metrics, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run.tensorboard_nlip))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, float(value), step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.enabled and self.writer is not None and len(values):
            self.writer.add_histogram(tag, values, step)

    def image(self, tag: str, hwc, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, hwc, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


class ProgressLine:
    """A one-line progress report on rank 0: epoch, step, samples/s and ETA (tqdm when on a terminal)."""

    def __init__(self, total_steps: int, samples_per_step: int, *, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.total = total_steps
        self.samples_per_step = samples_per_step
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def rate(self, step: int) -> float:
        """Samples per second since this run (or resume) started."""
        elapsed = time.perf_counter() - self.t0
        return (step - self.start_step) * self.samples_per_step / max(elapsed, 1e-9)

    def update(self, step: int, epoch: int, loss: Optional[float] = None) -> None:
        if not self.enabled:
            return
        rate = self.rate(step)
        eta = (self.total - step) * self.samples_per_step / max(rate, 1e-9)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}" if loss is not None else "-",
                                  samples_s=f"{rate:.0f}")
            self._bar.refresh()
        else:
            loss_txt = f" loss {loss:.4f}" if loss is not None else ""
            logger.info("epoch %d step %d/%d%s | %.0f samples/s | ETA %s", epoch, step, self.total, loss_txt,
                        rate, _fmt_seconds(eta))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
