"""Framework overhead: the nlip-ds training step against a bare PyTorch loop over the same NLIPModel.

The bare loop is what one would write by hand: NLIPModel forward, the naive CLIP loss (full logit matrix, cross
entropy both ways) plus the caption loss, backward, AdamW step. The nlip-ds step is `loop.train_step` (the one
`nlip-ds train` runs) on a DeepSpeed engine over NLIPTask: ZeRO-2 and ZeRO-3 (ds_configs/), noise on (omega
lookup, loss bank update) and off, and ZeRO-3 with DeepSpeed's hooks left on the modules that hold no parameter
(zero3-hooked: what engine.unhook_parameterless_modules removes). Every variant runs on the same random
in-memory batches (no loader), the variants take turns rep by rep (a change in machine load hits all of them),
and each figure is the median rep.

    python benchmarks/bench_overhead.py [--world 1 2] [--reps 5] [--steps 10] [--batch 32] [section.key=value ...]

Overrides apply to configs/tiny-cpu.yaml for every variant, e.g. `model.vision.width=256 model.text.width=256
model.decoder.width=256` for a wider model (the per-module cost of ZeRO-3's hooks is fixed, so its share of a
step falls as layers grow).

At world size 2 each rank runs the bare loop on its own micro-batch (no communication, the same compute per
rank) beside the 2-rank nlip-ds step; torch threads per rank = cores / ranks. Prints samples/s (global) and the
ratio bare / variant, i.e. how many times longer a step of the variant takes.

DeepSpeed replaces torch.nn.functional.linear for the whole process when it builds a ZeRO-3 engine with
zero_optimization.memory_efficient_linear on (its default) and never puts it back, which would slow the bare
loop built beside it. Each variant therefore runs with the linear that a process of its own would have: the
builtin one for the bare loop, ZeRO-2 and ds_configs/zero3.json (which turns the option off), DeepSpeed's for a
ZeRO-3 JSON that leaves it on.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BUILTIN_LINEAR = F.linear

from nlip_ds.distributed import free_port, leave_process_group  # noqa: E402

VOCAB, TOKENS = 256, 32
VARIANTS = ("bare", "zero2", "zero2+noise", "zero3", "zero3+noise", "zero3-hooked")
# zero3-hooked: ZeRO-3 without engine.unhook_parameterless_modules, DeepSpeed's hooks left on modules that hold no
# parameter (the step before 2026-12-07), for an A/B of that change within one run


def config(zero: str, noise: bool, batch: int, overrides: list[str]):
    """The tiny config with the command line's section.key=value `overrides` and this variant's settings."""
    from nlip_ds.config import load_config

    os.chdir(ROOT)
    return load_config("configs/tiny-cpu.yaml", [*overrides, f"deepspeed.config=ds_configs/{zero}.json",
                                                 f"noise.enabled={str(noise).lower()}",
                                                 f"train.micro_batch_size={batch}", "monitor.tensorboard=false",
                                                 "optim.warmup_steps=0"])


def batches(n: int, batch: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, VOCAB, (batch, TOKENS), generator=g)
        ids[:, 0], ids[:, -1] = 1, 2
        out.append({"image": torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8),
                    "input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "sample_id": torch.arange(i * batch, (i + 1) * batch), "noise_type": torch.zeros(batch).long(),
                    "pad": torch.zeros(batch, dtype=torch.bool)})
    return out


def model(cfg):
    from nlip_ds.model import NLIPModel

    torch.manual_seed(0)
    return NLIPModel(cfg.model, vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2, sep_id=3)


class Bare:
    def __init__(self, cfg):
        self.model = model(cfg).train()
        self.linear = BUILTIN_LINEAR
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    def step(self, batch: dict) -> None:
        from nlip_ds.model.decoder import caption_loss

        out = self.model(batch)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T  # (B, B)
        labels = torch.arange(logits.shape[0])
        clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss = clip + caption_loss(out["caption_logits"], out["caption_labels"])[0]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class NLIPStep:
    def __init__(self, zero: str, noise: bool, batch: int, world: int, overrides: list[str],
                 unhook: bool = True):
        from contextlib import nullcontext
        from unittest import mock

        from nlip_ds.noise.estimator import NoiseEstimator
        from nlip_ds.train import engine as E
        from nlip_ds.train.loop import MetricAccumulator
        from nlip_ds.train.nonfinite import NonFiniteGuard
        from nlip_ds.train.state import RunState
        from nlip_ds.train.task import NLIPTask

        self.cfg = config(zero, noise, batch, overrides)
        estimator = NoiseEstimator(self.cfg.noise, contrastive_batch=batch * world)  # as train/loop.py builds it
        keep_hooks = mock.patch.object(E, "unhook_parameterless_modules", lambda engine: 0)
        with nullcontext() if unhook else keep_hooks:
            self.engine = E.initialize(NLIPTask(model(self.cfg), self.cfg, estimator), self.cfg,
                                       E.build_ds_config(self.cfg, world), total_steps=10 ** 6)
        self.linear = F.linear  # DeepSpeed's if this engine replaced it (see the module docstring)
        torch.nn.functional.linear = BUILTIN_LINEAR
        self.state, self.acc = RunState.create(estimator), MetricAccumulator()
        self.guard = NonFiniteGuard(self.cfg, self.engine.device)

    def step(self, batch: dict) -> None:
        from nlip_ds.train.loop import train_step

        train_step(self.engine, self.cfg, self.state, batch, self.acc, self.guard)


def measure(world: int, rank: int, reps: int, steps: int, batch: int, overrides: list[str]) -> dict:
    runners = {"bare": Bare(config("zero3", False, batch, overrides))}
    for zero in ("zero2", "zero3"):
        for noise in (False, True):
            runners[zero + ("+noise" if noise else "")] = NLIPStep(zero, noise, batch, world, overrides)
    runners["zero3-hooked"] = NLIPStep("zero3", False, batch, world, overrides, unhook=False)
    data = batches(steps + 1, batch, seed=rank)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(reps + 1):  # rep 0 warms up
        for name, runner in runners.items():
            torch.nn.functional.linear = runner.linear
            runner.step(data[-1])
            if world > 1:
                torch.distributed.barrier()
            start = time.perf_counter()
            for b in data[:steps]:
                runner.step(b)
            if world > 1:
                torch.distributed.barrier()
            if rep:
                times[name].append(time.perf_counter() - start)
        if rank == 0:
            print(f"rep {rep}/{reps} done", file=sys.stderr, flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def worker(rank: int, world: int, port: int, args, out: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from nlip_ds.train import engine as E

    E.init_distributed(config("zero3", False, args.batch, args.overrides))
    result = measure(world, rank, args.reps, args.steps, args.batch, args.overrides)
    if rank == 0:
        out[world] = result
    leave_process_group()  # left to exit-time destructors, gloo's threads can abort the rank (std::terminate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], help="world sizes")
    parser.add_argument("--reps", type=int, default=5, help="timed reps per variant (median kept)")
    parser.add_argument("--steps", type=int, default=10, help="steps per rep")
    parser.add_argument("--batch", type=int, default=32, help="micro-batch per rank")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides for every variant (the tiny config's model, for instance)")
    args = parser.parse_args()
    from nlip_ds.config import ConfigError

    try:
        config("zero3", False, args.batch, args.overrides)  # refuse a bad override before any process starts
    except ConfigError as exc:
        parser.error(str(exc))
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    model = f" with {' '.join(args.overrides)}" if args.overrides else ""
    print(f"tiny config{model}, micro-batch {args.batch}, {args.steps} steps x {args.reps} reps, "
          f"{os.cpu_count()} cores, load average {load} at start")
    results = mp.Manager().dict()
    for world in args.world:
        mp.spawn(worker, args=(world, free_port(), args, results), nprocs=world, join=True)
        times = results[world]
        print(f"\nworld size {world}")
        print(f"{'variant':>12} | {'samples/s':>9} | {'x bare':>6}")
        for name in VARIANTS:
            rate = args.batch * world * args.steps / times[name]
            print(f"{name:>12} | {rate:>9.1f} | {times[name] / times['bare']:>6.2f}")


if __name__ == "__main__":
    main()
