"""Non-finite steps: every rank skips the same optimizer step, and too many in a row stop the run.

No extra collective or host sync in a normal step. DeepSpeed's ZeRO optimizers already compute the global gradient
norm before every optimizer step (one all-reduce) and, when it is not finite, zero the gradients and skip the
optimizer and learning-rate scheduler step on every rank together (`engine.skipped_steps` counts it; the
optimizer state is untouched). A non-finite loss on one rank does not always make its gradients non-finite (a
constant NaN term has zero gradient), so the loss goes into backward multiplied by NaN when it is not finite:
then every gradient it reaches is NaN, on every rank after the gradient reduction, and the engine skips the step.
Only after a skipped step do the ranks exchange which of them saw a non-finite loss (one small all-gather).

Requires the engine's overflow check: ZeRO-3 in every precision, ZeRO-2 in fp32/fp16, ZeRO-2 in bf16 only with
bf16.check_grad_overflow. With fp16, a skip without a non-finite loss is DeepSpeed's dynamic loss scaler at work
(it lowers the scale and stops the run itself at its minimum): it is counted apart (state.loss_scale_skipped,
logged as train/loss_scale_skipped with the current train/loss_scale) and does not count towards the stop.
"""
from __future__ import annotations

import logging

import torch

from nlip_ds import distributed as D
from nlip_ds.config import Config
from nlip_ds.train.state import RunState

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    def __init__(self, cfg: Config, device):
        self.limit = cfg.train.max_nonfinite_steps
        self.fp16 = cfg.train.precision == "fp16"
        self.bad_loss = torch.zeros(1, dtype=torch.uint8, device=device)  # this rank, since the last optimizer step
        self.last_cause = ""

    def loss_for_backward(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, or NaN-scaled loss when it is not finite; the finite flag) without a host sync."""
        finite = torch.isfinite(loss)
        self.bad_loss |= ~finite
        return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype), finite

    def after_optimizer_step(self, engine, state: RunState, skipped: bool) -> None:
        """Count a skipped step and say why. Every rank calls this after the same steps (the skip is global)."""
        if skipped:
            bad_ranks = [r for r, bad in enumerate(D.all_gather_tensor(self.bad_loss).tolist()) if bad]
            self._record(engine, state, bad_ranks)
        else:
            state.nonfinite_streak = 0
        self.bad_loss.zero_()

    def _record(self, engine, state: RunState, bad_ranks: list[int]) -> None:
        if not bad_ranks and self.fp16:
            state.loss_scale_skipped += 1
            if D.get_rank() == 0:
                logger.warning("step %d (optimizer step %d) skipped on every rank: fp16 gradient overflow, the "
                               "loss scaler lowers the scale to %g; %d such skips in this run", state.step,
                               engine.global_steps, loss_scale(engine), state.loss_scale_skipped)
            return
        state.nonfinite_skipped += 1
        state.nonfinite_streak += 1
        self.last_cause = (f"loss not finite on rank(s) {', '.join(map(str, bad_ranks))}" if bad_ranks else
                           "global gradient norm not finite (the loss was finite on every rank)")
        if D.get_rank() == 0:  # every rank knows the same; one line per skip is enough
            logger.warning("step %d (optimizer step %d) skipped on every rank: %s; %d in a row, %d in this run "
                           "(train.max_nonfinite_steps=%d in a row stop the run)", state.step, engine.global_steps,
                           self.last_cause, state.nonfinite_streak, state.nonfinite_skipped, self.limit)

    def should_stop(self, state: RunState) -> bool:
        return state.nonfinite_streak >= self.limit

    def stop_message(self, state: RunState, checkpoint: str) -> str:
        return (f"nlip-ds train: stopped: {state.nonfinite_streak} optimizer steps in a row were skipped because "
                f"of non-finite values (last at step {state.step}: {self.last_cause}). The checkpoint {checkpoint} "
                "holds the last good model and optimizer state (skipped steps change neither); the data position "
                "is past the skipped batches. Check the data and the learning rate (optim.lr, optim.grad_clip, "
                "train.precision), then continue with train.resume=latest; train.max_nonfinite_steps="
                f"{self.limit} sets how many skipped steps in a row are tolerated.")


def loss_scale(engine) -> float:
    """The dynamic loss scale of an fp16 engine (DeepSpeed's ZeRO optimizers expose it as `loss_scale`)."""
    return float(getattr(engine.optimizer, "loss_scale", getattr(engine.optimizer, "cur_scale", 1.0)))


def scaler_metrics(engine, state: RunState) -> dict:
    """train/loss_scale and train/loss_scale_skipped of an fp16 run; nothing in fp32/bf16 (no scaler)."""
    if not engine.fp16_enabled():
        return {}
    return {"train/loss_scale": loss_scale(engine), "train/loss_scale_skipped": state.loss_scale_skipped}
