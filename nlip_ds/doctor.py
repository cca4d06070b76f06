"""`nlip-ds doctor [--config F]`: is this environment ready to train, and if not, what to do (docs/doctor.md).

Prints one section each for the versions, the devices, the fused-loss extensions, the kernel self-check per
device, the fused loss's achieved rate against the device's measured GEMM rate, and (with --config) the
precision, ZeRO stage and batch arithmetic the config would train with, through the same config loader and
DeepSpeed config merge as `nlip-ds train` (DeepSpeed itself is not initialised). Ends with every problem found
and its fix; exits 1 when one of them blocks training, else 0.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.nn.functional as F

from nlip_ds.config import Config, ConfigError, load_config
from nlip_ds.ops import contrastive, extension, selfcheck

# (distribution, needed to train, fix when missing)
PACKAGES = (("deepspeed", True, "pip install 'deepspeed>=0.19,<0.20' (scripts/gpu_wheels.sh for an offline GPU)"),
            ("timm", True, "pip install timm"),
            ("transformers", True, "pip install transformers"),
            ("webdataset", True, "pip install webdataset"),
            ("apex", False, "optional (fused optimizers); nlip-ds does not need it"))
BUILD_FIX = ("build it: `python setup.py build_ext --inplace` in the repository (or `pip install "
             "--no-build-isolation -e .`); for CUDA, CUDA_HOME must name a toolkit with bin/nvcc")


@dataclass
class Problem:
    what: str
    fix: str
    blocking: bool


class Report:
    """Sections of `name: value` lines, and the problems found on the way."""

    def __init__(self):
        self.problems: list[Problem] = []

    def section(self, title: str) -> None:
        print(f"\n== {title} ==", flush=True)

    def line(self, name: str, value) -> None:
        print(f"  {name:<26} {value}", flush=True)

    def problem(self, what: str, fix: str, blocking: bool = True) -> None:
        self.problems.append(Problem(what, fix, blocking))


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_versions(r: Report) -> None:
    r.section("versions")
    r.line("python", platform.python_version())
    r.line("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    if torch.cuda.is_available():
        r.line("CUDA runtime (torch)", torch.version.cuda)
        r.line("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
    else:
        r.line("CUDA / NCCL", "no CUDA device visible")
    for dist, needed, fix in PACKAGES:
        found = version(dist)
        r.line(dist, found or "not installed")
        if found is None and needed:
            r.problem(f"{dist} is not installed", fix)


def devices() -> list[torch.device]:
    """The CPU and every visible CUDA device."""
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def check_devices(r: Report) -> None:
    r.section("devices")
    r.line("cpu", f"{os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads, "
                  f"{platform.processor() or platform.machine()}")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        r.line(f"cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                            f"{p.multi_processor_count} SMs")


def extension_state(kind: str) -> tuple[str, bool]:
    """(what to print, usable) for one fused-loss extension, compiling nothing."""
    if extension._import_prebuilt(kind) is not None:
        return f"built ({extension.module_name(kind)})", True
    if not all(p.exists() for p in extension.sources(kind)):
        return f"not built, and no kernel sources at {extension.KERNEL_DIR}", False
    if kind == "cuda" and extension.cuda_toolkit() is None:
        return "not built, and no CUDA toolkit to build it just in time", False
    if kind == "cpu" and shutil.which("c++") is None:
        return "not built, and no C++ compiler (c++) to build it just in time", False
    return "not built; compiled just in time on first use (about a minute, then cached)", True


def check_extensions(r: Report) -> None:
    r.section("fused-loss extensions")
    wanted = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for kind in extension.KINDS:
        state, usable = extension_state(kind)
        r.line(extension.module_name(kind), state)
        if kind in wanted and not usable:
            r.problem(f"{extension.module_name(kind)} is unavailable ({state}): the loss would fall back to the "
                      "reference, which materializes the n x N logits", BUILD_FIX)


def check_kernels(r: Report) -> None:
    r.section("kernel self-check (float64 reference, odd sizes, gathered and shared, omega on)")
    for device in devices():
        result = selfcheck.check_device(device) if os.environ.get(contrastive.DISABLE_ENV) != "1" else None
        if result is None:
            r.line(str(device), f"no kernel ({extension.load_error(device.type) or contrastive.DISABLE_ENV + '=1'})")
            continue
        verdict = "passed" if result.ok else f"FAILED: {result.detail}"
        r.line(result.device, f"{verdict} (error {result.error:.2g}, tolerance {result.tolerance:.2g})")
        if not result.ok:
            r.problem(f"the fused kernel is wrong on {result.device}: {result.detail}",
                      "report it with this output; training would use the slow reference loss there "
                      f"(set {contrastive.DISABLE_ENV}=1 to choose that knowingly)")


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def rate_problem(device: torch.device) -> tuple[int, int, torch.dtype]:
    """(N, d, dtype) of the short timing: seconds on a GPU, a fraction of a second on the CPU."""
    return (16384, 512, torch.bfloat16) if device.type == "cuda" else (2048, 256, torch.float32)


def measure_rates(device: torch.device) -> tuple[float, float]:
    """(GEMM TFLOP/s, fused loss TFLOP/s) at the device's rate_problem; the loss counts its three n x N x d
    products (the logits and the two feature gradients), as the naive loss would compute them."""
    N, d, dtype = rate_problem(device)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(N, N, generator=gen).to(device, dtype), torch.randn(N, d, generator=gen).to(device, dtype)
    gemm_s = timed(lambda: a @ b, device, 5)  # (N, N) x (N, d): the shape of a feature-gradient product
    img, txt = (F.normalize(torch.randn(N, d, generator=gen), dim=1).to(device, dtype).requires_grad_()
                for _ in range(2))
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    loss_s = timed(lambda: contrastive.fused_contrastive_loss(img, txt, img, txt, scale)[0].backward(), device, 3)
    return 2 * N * N * d / gemm_s / 1e12, 3 * 2 * N * N * d / loss_s / 1e12


def check_rates(r: Report) -> None:
    r.section("fused loss rate vs the device's GEMM rate (forward + backward, one process)")
    for device in devices():
        N, d, dtype = rate_problem(device)
        gemm, loss = measure_rates(device)
        impl = contrastive.last_impl
        r.line(str(device), f"N={N} d={d} {str(dtype).removeprefix('torch.')}: GEMM {gemm:.3g} TFLOP/s, fused "
                            f"loss ({impl}) {loss:.3g} TFLOP/s = {100 * loss / gemm:.0f}% of it")


def world_size() -> int:
    """Ranks a launch on this machine would start: WORLD_SIZE if set, else one per GPU, else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return max(1, torch.cuda.device_count())


def check_config(r: Report, path: str | None) -> None:
    r.section(f"config ({path})" if path else "config")
    if path is None:
        r.line("skipped", "no --config given")
        return
    try:
        cfg = load_config(path)
        from nlip_ds.train.engine import build_ds_config

        ds = build_ds_config(cfg, world_size())
    except (ConfigError, FileNotFoundError) as err:
        r.line("error", err)
        r.problem(f"config {path}: {err}", "correct the file or key named in the message")
        return
    describe_config(r, cfg, ds)
    check_precision(r, cfg)
    check_data(r, cfg)


def describe_config(r: Report, cfg: Config, ds: dict) -> None:
    t = cfg.train
    zero = ds.get("zero_optimization", {})
    r.line("precision", t.precision)
    r.line("ZeRO stage", f"{zero.get('stage', 0)} ({cfg.deepspeed.config})")
    offload = [k for k in ("offload_param", "offload_optimizer") if zero.get(k, {}).get("device", "none") != "none"]
    r.line("offload", ", ".join(offload) or "none")
    r.line("global batch", f"{ds['train_batch_size']} = micro batch {t.micro_batch_size} x grad accum "
                           f"{t.grad_accum} x {world_size()} ranks")
    r.line("contrastive batch N", f"{t.micro_batch_size * world_size()} (gathered per step)")
    r.line("ds_config (merged)", json.dumps({k: ds[k] for k in ("bf16", "fp16", "gradient_clipping")}))


def check_precision(r: Report, cfg: Config) -> None:
    precision, gpu = cfg.train.precision, torch.cuda.is_available()
    if precision == "fp16" and not gpu:
        r.problem("train.precision=fp16 needs a CUDA device; none is visible", "train.precision=fp32 (or bf16)")
    if precision == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        r.problem(f"train.precision=bf16 is not supported by {torch.cuda.get_device_name()}",
                  "train.precision=fp16 or fp32")


def check_data(r: Report, cfg: Config) -> None:
    """The training data must exist before a run starts (a folder, a file, or a brace pattern's first shard)."""
    if cfg.data.train is None:
        r.problem("data.train is not set", "data.train=PATH (a split folder from `nlip-ds data synth` or shards)")
        return
    try:
        from nlip_ds.data.shards import expand_pattern

        shards = sum(expand_pattern(cfg.data.train), [])
    except (ConfigError, OSError, ValueError, ImportError) as err:
        r.line("training shards", f"error: {err}")
        r.problem(f"data.train: {err}", "point data.train at existing shards (check with `nlip-ds data inspect`)")
        return
    r.line("training shards", f"{len(shards)} ({cfg.data.train})")


def summarize(r: Report) -> int:
    r.section("problems")
    if not r.problems:
        print("  none: ready to train", flush=True)
        return 0
    for p in r.problems:
        print(f"  [{'blocking' if p.blocking else 'warning'}] {p.what}\n      fix: {p.fix}", flush=True)
    return 1 if any(p.blocking for p in r.problems) else 0


def doctor(config: str | None = None, timing: bool = True) -> int:
    """Run every check, print the report; 1 when something blocks training, else 0."""
    r = Report()
    check_versions(r)
    check_devices(r)
    check_extensions(r)
    check_kernels(r)
    if timing:
        check_rates(r)
    check_config(r, config)
    return summarize(r)
