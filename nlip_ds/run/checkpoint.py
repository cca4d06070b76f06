"""The atomic checkpoint commit, manifests, verification and the compatibility check on resume.

<run>/checkpoints holds
  stepN/               a complete checkpoint: the engine's files, rank_state_RRRRR.pt per rank, manifest.json
  latest               the name of the newest complete checkpoint folder
  *.partial/, *.old/   a save in progress, or a folder on its way out; the next save removes them unless
                       `latest` names one (then it is complete: see _commit)

A save commits by renames, which are atomic within one file system: every rank writes into a fresh staging
folder, rank 0 checks that the files of every rank are there, writes manifest.json (file sizes, config,
parameter shapes), renames the folder to its tag and only then points `latest` at it. A kill at any moment
leaves `latest` naming a complete checkpoint (or absent before the first one).

This module does not import DeepSpeed: the engine's own files are written and read by train/checkpoint.py,
which hands its `engine.save_checkpoint` call to `commit_save` as `write` and calls `engine.load_checkpoint`
after `open_for_resume` accepted the folder. What a complete save must hold is spelled here by file name.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch

from nlip_ds.config import Config, ConfigError, fill_legacy, shape_keys
from nlip_ds.run.layout import LATEST, STEP_TAG, RunFolder

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
STAGING, OLD = ".partial", ".old"
NOT_COMPARED = frozenset({"train.resume"})  # differs between the first run and every resume by design
ABSENT = "<absent>"
SHAPE_KEYS = shape_keys()  # config fields declared with shape=True: a change there changes a parameter's shape


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, damaged or incompatible with the current run."""


def checkpoint_dir(cfg: Config) -> Path:
    return RunFolder.of(cfg).checkpoints


# -------------------------------------------------------------------------------------------- saving


def commit_save(root: Path, tag: str, write: Callable[[Path], None], shared_state: dict, rank_state: dict, *,
                zero_stage: int, param_shapes: dict, keep: int) -> Path:
    """Save checkpoint `tag` under `root` atomically; every rank calls it. `write(staging)` writes the engine's
    files of this rank into the staging folder; `rank_state` (loader position, RNG) is written beside them.

    The folder must be one file system that every rank sees (a shared file system across nodes): rank 0
    checks and commits the files of all ranks, after a barrier that every rank reaches once its files are
    written and flushed. Node-local checkpoint storage is not supported.
    """
    from nlip_ds.distributed import all_gather_object, barrier, get_rank, get_world_size

    rank, world = get_rank(), get_world_size()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    # Rank 0's fresh name for everyone: a staging folder never collides with one that `latest` names.
    staging = root / all_gather_object(f"{tag}.{uuid.uuid4().hex[:8]}{STAGING}")[0]
    write(staging)
    _save_rank_state(rank_state, staging / rank_state_name(rank))
    for path in _files(staging):
        if _owner(path.name) % world == rank:
            _fsync(path)
    barrier()
    error = None
    if rank == 0:
        try:
            manifest = _manifest(staging, tag, shared_state, world, zero_stage, param_shapes)
            _commit(root, staging, tag, manifest)
            _clean(root, keep)
        except (CheckpointError, OSError) as exc:
            error = f"checkpoint {tag} was not committed: {exc}"
    error = all_gather_object(error)[0]  # every rank fails together instead of hanging in the next collective
    if error:
        raise CheckpointError(error)
    return root / tag


def rank_state_name(rank: int) -> str:
    return f"rank_state_{rank:05d}.pt"


def _save_rank_state(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _owner(name: str) -> int:
    """The rank that wrote a file (per-rank shards and rank states carry it in the name); rank 0 otherwise."""
    match = re.search(r"zero_pp_rank_(\d+)_|rank_state_(\d+)\.pt", name)
    return int(match.group(1) or match.group(2)) if match else 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(staging: Path, tag: str, shared: dict, world: int, zero_stage: int, param_shapes: dict) -> dict:
    files = {str(p.relative_to(staging)): p.stat().st_size for p in _files(staging)}
    missing = _missing_files(files, world, zero_stage)
    if missing:
        raise CheckpointError(f"{staging} lacks {', '.join(missing)}")
    return {"format": MANIFEST_FORMAT, "tag": tag, "step": shared.get("step"), "epoch": shared.get("epoch"),
            "world_size": world, "zero_stage": zero_stage, "git_sha": shared.get("git_sha"),
            "config": shared.get("config"), "param_shapes": param_shapes, "files": files}


def _missing_files(files: dict, world: int, zero_stage: int) -> list[str]:
    """Files every complete save has: a rank state per rank, model states, a ZeRO optimizer shard per rank."""
    def has(pattern: str) -> bool:
        return any(re.fullmatch(pattern, name) for name in files)

    wanted = [(re.escape(rank_state_name(r)), rank_state_name(r)) for r in range(world)]
    wanted.append((r".*model_states\.pt", "*model_states.pt"))
    if zero_stage > 0:
        wanted += [(rf".*zero_pp_rank_{r}_mp_rank_\d+_optim_states\.pt", f"*zero_pp_rank_{r}_*optim_states.pt")
                   for r in range(world)]
    if zero_stage == 3:
        wanted += [(rf"zero_pp_rank_{r}_mp_rank_\d+_model_states\.pt", f"zero_pp_rank_{r}_*model_states.pt")
                   for r in range(world)]
    return ([label for pattern, label in wanted if not has(pattern)] +
            [f"{name} (empty)" for name, size in files.items() if size == 0])


def _commit(root: Path, staging: Path, tag: str, manifest: dict) -> None:
    _write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1, default=str))  # staging is complete now
    final = root / tag
    if final.exists():  # the same step saved again (an epoch ending on a save_every step), or a leftover
        old = root / (staging.name.removesuffix(STAGING) + OLD)
        if read_latest(root) == tag:
            # `latest` must name a complete folder while `final` is swapped: the new one, then the old one.
            _point_latest(root, staging.name)
            os.rename(final, old)
            _point_latest(root, old.name)
        else:
            os.rename(final, old)
    os.rename(staging, final)
    _fsync_dir(root)
    _point_latest(root, tag)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point_latest(root: Path, name: str) -> None:
    _write_atomic(root / LATEST, name)


def read_latest(root: Path) -> str | None:
    """The folder name `latest` holds, or None when no checkpoint was committed yet."""
    latest = Path(root) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def _clean(root: Path, keep: int) -> None:
    """Rank 0, after a commit: drop leftovers of killed saves and all but the newest `keep` checkpoints,
    never the folder `latest` names. A kill here leaves *.old folders, which the next save removes."""
    latest = read_latest(root)
    for p in root.iterdir():
        if p.is_dir() and p.name != latest and p.name.endswith((STAGING, OLD)):
            shutil.rmtree(p, ignore_errors=True)
    tags = sorted((p for p in root.iterdir() if p.is_dir() and STEP_TAG.fullmatch(p.name)),
                  key=lambda p: int(STEP_TAG.fullmatch(p.name).group(1)))
    for old in tags[:-keep]:
        if old.name != latest:
            gone = root / f"{old.name}.{uuid.uuid4().hex[:8]}{OLD}"
            os.rename(old, gone)  # the tag disappears at once; deleting the files may take a while
            shutil.rmtree(gone, ignore_errors=True)


# ------------------------------------------------------------------------------------------- loading


def resolve_resume(cfg: Config) -> tuple[Path, str] | None:
    """(checkpoint root, folder name) for train.resume = 'latest' or a checkpoint folder; None to start fresh."""
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "latest":
        root = checkpoint_dir(cfg)
        name = read_latest(root)
        if name is None:
            logger.info("train.resume=latest: no checkpoint in %s yet, starting fresh", root)
            return None
        return root, name
    path = Path(cfg.train.resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume: {path} is not a checkpoint folder")
    return path.parent, path.name


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist.{_hint(folder)}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}: its save did not finish (or an nlip-ds "
                              f"without manifests wrote it).{_hint(folder)}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / MANIFEST} is damaged: {exc}.{_hint(folder)}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, this nlip-ds reads "
                              f"format {MANIFEST_FORMAT}")
    return manifest


def verify_files(folder: Path, manifest: dict, rank: int | None = None, world: int = 1) -> str | None:
    """The first file of the manifest that is missing or has another size (None when all are intact); with
    `rank`, only the files that rank wrote (ranks check their share in parallel)."""
    for name, size in manifest["files"].items():
        if rank is not None and _owner(name) % world != rank:
            continue
        path = Path(folder) / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes where {size} were written (truncated or damaged)"
    return None


def verify_checkpoint(folder: Path) -> dict:
    """Manifest and every file of a checkpoint folder; raise CheckpointError naming what is wrong."""
    manifest = read_manifest(folder)
    problem = verify_files(folder, manifest)
    if problem:
        raise CheckpointError(f"checkpoint {folder} is damaged: {problem}.{_hint(Path(folder))}")
    return manifest


def _hint(folder: Path) -> str:
    """Where to go instead: the other checkpoints beside `folder` that have a manifest, newest first."""
    others = sorted((p for p in folder.parent.glob("step*") if p != folder and STEP_TAG.fullmatch(p.name)
                     and (p / MANIFEST).is_file()), key=lambda p: -int(STEP_TAG.fullmatch(p.name).group(1)))
    if not others:
        return ""
    return f" Resume from an earlier checkpoint instead, e.g. train.resume={others[0]}"


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}"""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_compatible(manifest: dict, config: dict, shapes: dict, world_size: int, zero_stage: int) -> dict:
    """Refuse a checkpoint the current run cannot continue exactly; return the other changed settings
    {key: (saved, now)}, which are allowed (open_for_resume logs them as a warning)."""
    saved = flatten(fill_legacy(manifest["config"] or {}))  # a key the run predates has its legacy value
    now = flatten(json.loads(json.dumps(config, default=str)))  # the manifest went through JSON too
    changed = {k: (saved.get(k, ABSENT), now.get(k, ABSENT)) for k in sorted(saved.keys() | now.keys())
               if k not in NOT_COMPARED and saved.get(k, ABSENT) != now.get(k, ABSENT)}
    # A key only one side knows is a config schema change; the parameter shapes below still guard the model.
    shape = {k: v for k, v in changed.items() if k in SHAPE_KEYS and ABSENT not in v}
    refused = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in shape.items()]
    refused += _shape_changes(manifest["param_shapes"], shapes)
    if manifest["world_size"] != world_size:
        refused.append(f"world size: {manifest['world_size']} -> {world_size} (exact resume continues every "
                       "rank's data position, so it needs the same number of ranks)")
    if manifest["zero_stage"] != zero_stage:
        refused.append(f"ZeRO stage: {manifest['zero_stage']} -> {zero_stage}")
    if refused:
        raise CheckpointError(f"checkpoint {manifest['tag']} does not fit this run (saved -> now): "
                              + "; ".join(refused))
    return {k: v for k, v in changed.items() if k not in shape}



def _shape_changes(saved: dict, now: dict) -> list[str]:
    out = [f"parameter {n}: {saved.get(n, 'absent')} -> {now.get(n, 'absent')}"
           for n in sorted(saved.keys() | now.keys()) if saved.get(n) != now.get(n)]
    return out[:10] + ([f"... {len(out) - 10} more parameters"] if len(out) > 10 else [])


def open_for_resume(folder: Path, config: dict, shapes: dict, zero_stage: int) -> dict:
    """Check checkpoint `folder` against this run before the engine reads it: its manifest, compatibility
    (refused changes raise, allowed ones are logged) and every file, each rank its own share. Every rank calls
    it and every rank raises the same CheckpointError when the folder does not fit; returns the manifest."""
    from nlip_ds.distributed import all_gather_object, get_rank, get_world_size

    folder = Path(folder)
    manifest = read_manifest(folder)
    allowed = check_compatible(manifest, config, shapes, get_world_size(), zero_stage)
    if allowed and get_rank() == 0:
        logger.warning("resuming from %s with changed settings (saved -> now): %s", folder,
                       "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in allowed.items()))
    problems = [p for p in all_gather_object(verify_files(folder, manifest, get_rank(), get_world_size())) if p]
    if problems:
        raise CheckpointError(f"checkpoint {folder} is damaged: {problems[0]}.{_hint(folder)}")
    return manifest


def load_rank_state(folder: Path, rank: int | None = None) -> dict:
    """This rank's (or `rank`'s) loader position, RNG states and noise-state shard, saved beside the engine's
    files."""
    from nlip_ds.distributed import get_rank

    return torch.load(Path(folder) / rank_state_name(get_rank() if rank is None else rank), weights_only=True)


def read_shared_state(folder: Path) -> dict:
    """The client state every rank saved identically (step, loader epoch, the noise estimator, the caption store),
    read from the engine's first model-states file without an engine: what inspection tools (`nlip-ds audit`) need.
    Not weights-only: DeepSpeed pickles the client state with its own objects in the same file."""
    files = sorted(Path(folder).glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"no *model_states.pt in {folder}")
    return torch.load(files[0], map_location="cpu", weights_only=False)
