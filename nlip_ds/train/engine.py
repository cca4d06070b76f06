"""DeepSpeed lives here: the ZeRO config merge and engine construction (checkpoints: train/checkpoint.py).

ds_configs/*.json hold engine settings only (ZeRO stage, offload, buckets). Batch sizes, optimizer, schedule,
clipping and precision come from the run config and are merged in `build_ds_config`, the one place that
checks train_batch_size = micro_batch x grad_accum x world_size.
"""
from __future__ import annotations

import json
import logging
import math
import os
from datetime import timedelta
from pathlib import Path

import torch

from nlip_ds.config import Config, ConfigError
from nlip_ds.run.layout import RunFolder
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
        ds["tensorboard"] = {"enabled": True, "output_path": str(RunFolder.of(cfg).tensorboard),
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
    if backend == "gloo":
        unlink_shm_allreduce_buffer()


def unlink_shm_allreduce_buffer() -> None:
    """Remove the name of this rank's shared-memory allreduce buffer once every rank has mapped it.

    On CPU ranks of one machine DeepSpeed gives each rank a 66 MB buffer in /dev/shm
    (deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, created and mapped by every rank in
    deepspeed/ops/csrc/cpu/comm/shm.cpp during init_distributed) and never deletes it: each 2-rank CPU run left
    132 MB of RAM behind, and a day of test runs here held 7.7 GB in 118 such files, enough to get a later test
    OOM-killed. After one barrier every rank has mapped every buffer, so the names can go: the memory stays
    mapped until the ranks exit and is freed then, whether the run ends well or not."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


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


def gather_by_layer(model: torch.nn.Module, ds_config: dict) -> int:
    """Under ZeRO-3, mark each transformer layer a DeepSpeed leaf module: the layer's parameters are gathered
    together when it starts and released when it ends, where DeepSpeed would otherwise hook, gather and release
    every Linear and LayerNorm inside it. A layer runs whole anyway, so the peak of gathered parameters stays
    about one layer; the hooks' Python work was most of ZeRO-3's overhead on the tiny model (docs/performance.md,
    "Framework overhead").

    DeepSpeed reduces a leaf's gradients when the leaf's backward ends, so a leaf must run at most once per
    backward, which `NLIPModel.single_pass_layers` promises. An engine JSON with its own
    zero_optimization.leaf_module section decides instead: `"leaf_module": {"classes": []}` hooks every
    submodule again. Returns the number of layers marked."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) != 3 or "leaf_module" in zero:
        return 0
    from deepspeed.utils import set_z3_leaf_module

    layers = model.single_pass_layers()
    for layer in layers:
        set_z3_leaf_module(layer, True)
    logger.info("ZeRO-3 gathers parameters per transformer layer (%d layers)", len(layers))
    return len(layers)


def unhook_parameterless_modules(engine) -> int:
    """Under ZeRO-3, take DeepSpeed's hooks off every module that holds no parameter of its own: dropouts,
    activations, containers such as nn.Sequential, timm's Identity placeholders (a leaf module counts its whole
    subtree). DeepSpeed hooks every submodule it reaches; on these the gather and the release find nothing to do,
    but each still costs four hooks and two autograd Function applications a step, about half of all that the
    tiny model's ZeRO-3 step hooked (docs/performance.md, "Framework overhead"). Modules with parameters, the
    root and every leaf keep theirs, so what is gathered and when is unchanged.

    Reaches into DeepSpeed's hook bookkeeping (DeepSpeedZeRoOffload.forward_hooks/backward_hooks); where a
    DeepSpeed version lays it out otherwise, nothing is removed and the reason is logged. Returns the number of
    modules unhooked."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None:  # not ZeRO-3
        return 0
    from deepspeed.utils import z3_leaf_module

    hooks = (getattr(offload, "forward_hooks", None), getattr(offload, "backward_hooks", None))
    if not all(isinstance(h, list) and all(hasattr(x, "hooks_dict_ref") for x in h) for h in hooks):
        logger.info("ZeRO-3: this DeepSpeed keeps its module hooks otherwise; parameterless modules stay hooked")
        return 0
    idle = [module for module in engine.module.modules() if module is not engine.module
            and next(module.parameters(recurse=z3_leaf_module(module)), None) is None]
    idle_dicts = {id(d) for module in idle for d in (module._forward_pre_hooks, module._forward_hooks)}
    removed = set()
    for name in ("forward_hooks", "backward_hooks"):
        kept = []
        for handle in getattr(offload, name):
            hooks = id(handle.hooks_dict_ref())
            if hooks in idle_dicts:
                handle.remove()
                removed.add(hooks)
            else:
                kept.append(handle)
        setattr(offload, name, kept)
    count = sum(id(module._forward_hooks) in removed for module in idle)  # leaves' insides were never hooked
    logger.info("ZeRO-3: %d modules without parameters of their own unhooked", count)
    return count


def initialize(task: torch.nn.Module, cfg: Config, ds_config: dict, total_steps: int):
    """One DeepSpeed engine over the task module (model + losses); under ZeRO-3 this partitions every parameter.

    The model is built whole on each rank first, not under deepspeed.zero.Init: transformers re-initializes
    weights after construction (post_init), which indexes parameters zero.Init has already partitioned away.
    NLIP-scale models (ViT-B/32 + text encoder + decoder, about 0.3B parameters) fit in host memory per rank.
    """
    import deepspeed

    gather_by_layer(task.model, ds_config)
    optimizer = build_optimizer(task.param_groups(cfg.optim.weight_decay), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    unhook_parameterless_modules(engine)
    if isinstance(optimizer, Lamb):  # per-tensor trust ratios over the flat partitions (see optim.py)
        optimizer.use_zero3_layout(engine.optimizer)
    return engine
