"""DeepSpeed lives here: the ZeRO config merge, engine construction and checkpoint I/O.

ds_configs/*.json hold engine settings only (ZeRO stage, offload, buckets). Batch sizes, optimizer, schedule,
clipping and precision come from the run config and are merged in `build_ds_config`, the one place that
checks train_batch_size = micro_batch x grad_accum x world_size.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import torch

from nlip_ds.config import Config, ConfigError, to_dict
from nlip_ds.train.optim import Lamb, build_optimizer

logger = logging.getLogger(__name__)

# Keys the run config owns; a ds_configs file that sets them would silently fight the merge.
RUN_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "optimizer", "scheduler", "gradient_clipping", "fp16", "bf16", "tensorboard")
DEPRECATED_KEYS = ("cpu_offload", "cpu_offload_params", "cpu_offload_use_pin_memory", "allgather_partitions",
                   "elastic_checkpoint", "zero_optimization.cpu_offload", "zero_optimization.cpu_offload_params")


def _load_engine_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config: {path} does not exist")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {exc}") from None
    for key in RUN_OWNED_KEYS:
        if key in ds:
            raise ConfigError(f"deepspeed.config: {path} sets '{key}', which comes from the run config "
                              "(train.*, optim.*); remove it from the JSON")
    zero = ds.get("zero_optimization", {})
    for key in DEPRECATED_KEYS:
        section, _, sub = key.rpartition(".")
        if (sub in zero) if section else (key in ds):
            raise ConfigError(f"deepspeed.config: {path} uses deprecated key '{key}'; use "
                              "zero_optimization.offload_optimizer / offload_param instead")
    return ds


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """Engine JSON + run config -> the dict handed to deepspeed.initialize."""
    ds = _load_engine_json(cfg.deepspeed.config)
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    # The JSON may not set it (RUN_OWNED_KEYS), so this product is the only source of the global batch.
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["bf16"] = {"enabled": t.precision == "bf16"}
    ds["fp16"] = {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    if cfg.monitor.tensorboard:
        # DeepSpeed's own monitor writes next to ours, in the same run folder.
        ds["tensorboard"] = {"enabled": True, "output_path": str(Path(t.output_dir) / "tensorboard"),
                             "job_name": "deepspeed"}
    return ds


def lr_lambda(cfg: Config, total_steps: int):
    """Linear warm-up to the peak, then cosine to min_lr_ratio (or constant): a multiplier of optim.lr."""
    o = cfg.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def init_distributed(cfg: Config) -> None:
    """Start the process group (gloo on CPU, NCCL on GPU) with the configured collective timeout."""
    import deepspeed

    check_engine_options(cfg)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.train.collective_timeout_s),
                               verbose=False)


def check_engine_options(cfg: Config) -> None:
    """Combinations the engine cannot run, refused before any work. fp16 needs GPUs: DeepSpeed's CPU accelerator
    has no fp16. LAMB's per-tensor trust ratios need ZeRO-3's partition layout (optim.Lamb.use_zero3_layout)
    and the optimizer step on the ranks' own partitions, so not ZeRO-0/1/2 and not optimizer offload."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision: fp16 needs GPUs (DeepSpeed's CPU accelerator supports fp32 and "
                          "bf16 only); use train.precision=bf16 on CPU ranks")
    if cfg.optim.name != "lamb":
        return
    zero = _load_engine_json(cfg.deepspeed.config).get("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        raise ConfigError(f"optim.name: lamb needs ZeRO stage 3 ({cfg.deepspeed.config} sets stage "
                          f"{zero.get('stage', 0)}); use deepspeed.config=ds_configs/zero3.json, or optim.name=adamw")
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        raise ConfigError(f"optim.name: lamb does not support optimizer offload ({cfg.deepspeed.config}); use "
                          "deepspeed.config=ds_configs/zero3.json, or optim.name=adamw with offload")


def initialize(task: torch.nn.Module, cfg: Config, ds_config: dict, total_steps: int):
    """One DeepSpeed engine over the task module (model + losses); under ZeRO-3 this partitions every parameter.

    The model is built whole on each rank first, not under deepspeed.zero.Init: transformers re-initializes
    weights after construction (post_init), which indexes parameters zero.Init has already partitioned away.
    NLIP-scale models (ViT-B/32 + text encoder + decoder, about 0.3B parameters) fit in host memory per rank.
    """
    import deepspeed

    optimizer = build_optimizer(task.param_groups(cfg.optim.weight_decay), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if isinstance(optimizer, Lamb):  # per-tensor trust ratios over the flat partitions (see optim.py)
        optimizer.use_zero3_layout(engine.optimizer)
    return engine


# ------------------------------------------------------------------------------------------ checkpoints
#
# <output_dir>/checkpoints holds
#   stepN/               a complete checkpoint: DeepSpeed's files, rank_state_RRRRR.pt per rank, manifest.json
#   latest               the name of the newest complete checkpoint folder
#   *.partial/, *.old/   a save in progress, or a folder on its way out; the next save removes them unless
#                        `latest` names one (then it is complete: see _commit)
#
# A save commits by renames, which are atomic within one file system: every rank writes into a fresh staging
# folder, rank 0 checks that the files of every rank are there, writes manifest.json (file sizes, config,
# parameter shapes), renames the folder to its tag and only then points `latest` at it. A kill at any moment
# leaves `latest` naming a complete checkpoint (or absent before the first one).

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
STAGING, OLD = ".partial", ".old"
STEP_TAG = re.compile(r"step(\d+)")
# model.* keys that change no parameter shape; any other model.* change is refused on resume.
NON_SHAPE_MODEL_KEYS = frozenset({
    "model.vision.mask_ratio", "model.vision.pretrained_path", "model.text.concept_dropout",
    "model.decoder.label_smoothing", "model.decoder.dropout", "model.decoder.loss_weight",
    "model.mae.loss_weight", "model.logit_scale_init", "model.logit_scale_max"})
NOT_COMPARED = frozenset({"train.resume"})  # differs between the first run and every resume by design
ABSENT = "<absent>"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, damaged or incompatible with the current run."""


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def save_checkpoint(engine, cfg: Config, tag: str, shared_state: dict, rank_state: dict) -> Path:
    """Write checkpoint `tag` atomically; every rank calls it. `shared_state` (identical on every rank) goes
    through DeepSpeed's client_state; `rank_state` (loader position, RNG) is written by each rank beside it.

    The folder must be one file system that every rank sees (a shared file system across nodes): rank 0
    checks and commits the files of all ranks, after a barrier that every rank reaches once its files are
    written and flushed. Node-local checkpoint storage is not supported.
    """
    from nlip_ds.distributed import all_gather_object, barrier, get_rank, get_world_size

    root, rank, world = checkpoint_dir(cfg), get_rank(), get_world_size()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    # Rank 0's fresh name for everyone: a staging folder never collides with one that `latest` names.
    staging = root / all_gather_object(f"{tag}.{uuid.uuid4().hex[:8]}{STAGING}")[0]
    engine.save_checkpoint(str(root), tag=staging.name, client_state=shared_state, save_latest=False)
    _save_rank_state(rank_state, staging / _rank_state_name(rank))
    for path in _files(staging):
        if _owner(path.name) % world == rank:
            _fsync(path)
    barrier()
    error = None
    if rank == 0:
        try:
            manifest = _manifest(staging, engine, tag, shared_state, world)
            _commit(root, staging, tag, manifest)
            _clean(root, cfg.train.keep_last)
        except (CheckpointError, OSError) as exc:
            error = f"checkpoint {tag} was not committed: {exc}"
    error = all_gather_object(error)[0]  # every rank fails together instead of hanging in the next collective
    if error:
        raise CheckpointError(error)
    return root / tag


def _rank_state_name(rank: int) -> str:
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


def _manifest(staging: Path, engine, tag: str, shared: dict, world: int) -> dict:
    files = {str(p.relative_to(staging)): p.stat().st_size for p in _files(staging)}
    stage = engine.zero_optimization_stage()
    missing = _missing_files(files, world, stage)
    if missing:
        raise CheckpointError(f"{staging} lacks {', '.join(missing)}")
    return {"format": MANIFEST_FORMAT, "tag": tag, "step": shared.get("step"), "epoch": shared.get("epoch"),
            "world_size": world, "zero_stage": stage, "git_sha": shared.get("git_sha"),
            "config": shared.get("config"), "param_shapes": param_shapes(engine), "files": files}


def _missing_files(files: dict, world: int, zero_stage: int) -> list[str]:
    """Files every complete save has: a rank state per rank, model states, a ZeRO optimizer shard per rank."""
    def has(pattern: str) -> bool:
        return any(re.fullmatch(pattern, name) for name in files)

    wanted = [(re.escape(_rank_state_name(r)), _rank_state_name(r)) for r in range(world)]
    wanted.append((r".*model_states\.pt", "*model_states.pt"))
    if zero_stage > 0:
        wanted += [(rf".*zero_pp_rank_{r}_mp_rank_\d+_optim_states\.pt", f"*zero_pp_rank_{r}_*optim_states.pt")
                   for r in range(world)]
    if zero_stage == 3:
        wanted += [(rf"zero_pp_rank_{r}_mp_rank_\d+_model_states\.pt", f"zero_pp_rank_{r}_*model_states.pt")
                   for r in range(world)]
    return ([label for pattern, label in wanted if not has(pattern)] +
            [f"{name} (empty)" for name, size in files.items() if size == 0])


def param_shapes(engine) -> dict:
    """Full shape of every parameter by name (ZeRO-3 keeps the unpartitioned shape in ds_shape)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in engine.module.named_parameters()}


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
    _write_atomic(root / "latest", name)


def read_latest(root: Path) -> str | None:
    """The folder name `latest` holds, or None when no checkpoint was committed yet."""
    latest = Path(root) / "latest"
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
    {key: (saved, now)}, which are allowed (load_checkpoint logs them as a warning)."""
    saved = flatten(manifest["config"] or {})
    now = flatten(json.loads(json.dumps(config, default=str)))  # the manifest went through JSON too
    changed = {k: (saved.get(k, ABSENT), now.get(k, ABSENT)) for k in sorted(saved.keys() | now.keys())
               if k not in NOT_COMPARED and saved.get(k, ABSENT) != now.get(k, ABSENT)}
    # A key only one side knows is a config schema change; the parameter shapes below still guard the model.
    shape = {k: v for k, v in changed.items() if _is_shape_key(k) and ABSENT not in v}
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


def _is_shape_key(key: str) -> bool:
    return key.startswith("model.") and key not in NON_SHAPE_MODEL_KEYS


def _shape_changes(saved: dict, now: dict) -> list[str]:
    out = [f"parameter {n}: {saved.get(n, 'absent')} -> {now.get(n, 'absent')}"
           for n in sorted(saved.keys() | now.keys()) if saved.get(n) != now.get(n)]
    return out[:10] + ([f"... {len(out) - 10} more parameters"] if len(out) > 10 else [])


def load_checkpoint(engine, cfg: Config, root: Path, tag: str) -> tuple[dict, dict]:
    """Check the checkpoint folder root/tag against this run, restore the engine; return (shared client state,
    this rank's state). Every rank calls it; every rank raises the same CheckpointError when it does not fit."""
    from nlip_ds.distributed import all_gather_object, get_rank, get_world_size

    folder = Path(root) / tag
    manifest = read_manifest(folder)
    allowed = check_compatible(manifest, to_dict(cfg), param_shapes(engine), get_world_size(),
                               engine.zero_optimization_stage())
    if allowed and get_rank() == 0:
        logger.warning("resuming from %s with changed settings (saved -> now): %s", folder,
                       "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in allowed.items()))
    problems = [p for p in all_gather_object(verify_files(folder, manifest, get_rank(), get_world_size())) if p]
    if problems:
        raise CheckpointError(f"checkpoint {folder} is damaged: {problems[0]}.{_hint(folder)}")
    _, client = engine.load_checkpoint(str(root), tag=tag)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {folder}")
    return client, torch.load(folder / _rank_state_name(get_rank()), weights_only=True)
