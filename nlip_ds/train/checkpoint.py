"""Checkpoints of a training run: the DeepSpeed engine's save and load, inside the run folder's commit protocol.

nlip_ds/run/checkpoint.py owns the protocol (staging folder, manifest, atomic commit, `latest`, pruning,
verification and the resume check) and knows nothing of DeepSpeed; this module is the engine's side of it:
`engine.save_checkpoint` writes into the staging folder the protocol names, `engine.load_checkpoint` reads a
folder the protocol has accepted. What goes into a checkpoint besides the engine comes from RunState and the
loader (save, resume).
"""
from __future__ import annotations

import logging
from pathlib import Path

from nlip_ds.config import Config, git_sha, to_dict
from nlip_ds.distributed import get_rank
from nlip_ds.run import checkpoint as C
from nlip_ds.run.layout import step_tag
from nlip_ds.train.state import RunState, capture_rng, restore_rng

logger = logging.getLogger(__name__)


def save(engine, cfg: Config, state: RunState, loader) -> None:
    """Checkpoint step<state.step>: the engine, the run state (same on every rank), each rank's loader and RNG."""
    shared = state.shared_state(to_dict(cfg), git_sha())
    path = save_checkpoint(engine, cfg, step_tag(state.step), shared,
                           {"loader": loader.state_dict(), "rng": capture_rng(), **state.rank_state()})
    logger.info("checkpoint %s written", path)


def resume(engine, cfg: Config, state: RunState, loader) -> None:
    """Continue from train.resume (nothing when it is unset, or 'latest' before the first checkpoint)."""
    found = C.resolve_resume(cfg)
    if found is None:
        return
    shared, mine = load_checkpoint(engine, cfg, *found)
    folder = Path(found[0]) / found[1]
    state.load_shared_state(shared, lambda rank: mine if rank == get_rank() else C.load_rank_state(folder, rank))
    loader.load_state_dict(mine["loader"])
    restore_rng(mine["rng"])
    logger.info("resumed from %s/%s at epoch %d, step %d", found[0], found[1], state.epoch, state.step)


def save_checkpoint(engine, cfg: Config, tag: str, shared_state: dict, rank_state: dict) -> Path:
    """Write checkpoint `tag` atomically; every rank calls it. `shared_state` (identical on every rank) goes
    through DeepSpeed's client_state; `rank_state` (loader position, RNG) is written by each rank beside it."""
    def write(staging: Path) -> None:
        engine.save_checkpoint(str(staging.parent), tag=staging.name, client_state=shared_state, save_latest=False)

    return C.commit_save(C.checkpoint_dir(cfg), tag, write, shared_state, rank_state,
                         zero_stage=engine.zero_optimization_stage(), param_shapes=param_shapes(engine),
                         keep=cfg.train.keep_last)


def load_checkpoint(engine, cfg: Config, root: Path, tag: str) -> tuple[dict, dict]:
    """Check the checkpoint folder root/tag against this run, restore the engine; return (shared client state,
    this rank's state). Every rank calls it; every rank raises the same CheckpointError when it does not fit."""
    folder = Path(root) / tag
    C.open_for_resume(folder, to_dict(cfg), param_shapes(engine), engine.zero_optimization_stage())
    _, client = engine.load_checkpoint(str(root), tag=tag)
    if client is None:
        raise C.CheckpointError(f"DeepSpeed could not load checkpoint {folder}")
    return client, C.load_rank_state(folder)


def param_shapes(engine) -> dict:
    """Full shape of every parameter by name (ZeRO-3 keeps the unpartitioned shape in ds_shape)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in engine.module.named_parameters()}
