"""Everything a run carries besides the engine: counters, the noise estimator, the completer, RNG states.

Split in two for checkpoints: the shared part is identical on every rank (counters, the noise estimator's bank,
fit and schedule) and goes through DeepSpeed's client state; the per-rank part (loader position, RNG, and with
noise.state=sharded this rank's slice of the bank and ε) is saved by each rank.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from nlip_ds.noise.estimator import NoiseEstimator


@dataclass
class RunState:
    noise: NoiseEstimator  # loss bank, refit schedule and history, ε/ω, L_NITC form
    epoch: int = 0
    step: int = 0  # micro-batches done (the engine counts optimizer steps itself)
    final_train: dict = field(default_factory=dict)  # the last logged train/* means
    nonfinite_skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm, in this run
    nonfinite_streak: int = 0  # of those, how many in a row up to now
    loss_scale_skipped: int = 0  # fp16: optimizer steps the dynamic loss scaler skipped (gradient overflow)
    completion: Optional[Any] = None  # completion.completer.Completer (concept cache, caption bank) when enabled

    @classmethod
    def create(cls, noise: NoiseEstimator, completion=None) -> "RunState":
        return cls(noise=noise, completion=completion)

    def shared_state(self, config_dict: dict, git_sha: str) -> dict:
        # the estimator's keys (bank, noise, history, ...) sit at the top level, where older checkpoints hold them
        return {"epoch": self.epoch, "step": self.step, **self.noise.state_dict(),
                "nonfinite_skipped": self.nonfinite_skipped, "nonfinite_streak": self.nonfinite_streak,
                "loss_scale_skipped": self.loss_scale_skipped,
                "config": config_dict, "git_sha": git_sha,
                "completion": None if self.completion is None else self.completion.state_dict()}

    def rank_state(self) -> dict:
        """What this rank saves besides its loader and RNG: its noise-state and caption shards, when sharded."""
        shard = self.noise.shard_state_dict()
        if shard is None:
            return {}
        captions = None if self.completion is None else self.completion.shard_state_dict()
        return {"noise": shard, "captions": captions}

    def load_shared_state(self, state: dict, rank_state: Optional[Callable[[int], dict]] = None) -> None:
        """Restore the shared part; rank_state(r) reads the saved per-rank state of rank r (a sharded noise
        state needs this rank's own, or every rank's when the partition changed)."""
        self.epoch, self.step = state["epoch"], state["step"]
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)  # absent from older checkpoints
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        self.loss_scale_skipped = state.get("loss_scale_skipped", 0)
        shards = [rank_state(r) for r in self.noise.shards_needed(state)]
        self.noise.load_state_dict(state, [s["noise"] for s in shards])  # reads its own keys
        if self.completion is not None and state.get("completion") is not None:
            self.completion.load_state_dict(state["completion"], [s["captions"] for s in shards])


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x):
    """random.setstate needs tuples where a round trip through a checkpoint may give lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
