"""The fused-loss kernel checks itself on the first call on each device (docs/performance.md, "Self-check").

Before a compiled kernel serves a device of a checked type (CUDA by default, `CHECK_DEVICE_TYPES`) for the first
time in a process, `kernel_usable` runs it on a few small random problems (odd sizes, the gathered layout of one
rank of many across a CUDA tile edge and the shared layout of one process, omega on, float32 and bfloat16) and
compares the loss, the per-sample losses and every gradient with the float64 reference. A mismatch, or an
exception, is logged as an error naming the device, the case, the error and the tolerance, and the caller uses
the reference on that device from then on: a wrong kernel costs speed, never a silently wrong loss.
`NLIP_DS_KERNEL_SELFCHECK=0` skips the check (the kernel is then trusted).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV = "NLIP_DS_KERNEL_SELFCHECK"
CHECK_DEVICE_TYPES = ("cuda",)

# (n, N, row_offset, d, shared). N = 4099 puts the positives of the gathered rows on both sides of column 4096,
# the edge of the CUDA kernel's default tile.
CASES = ((37, 37, 0, 19, True), (13, 4099, 4085, 19, False))
# Relative to max |reference| (floored at 0.1): float32 accumulation for the losses; the feature gradients of
# bfloat16 inputs come back in bfloat16 (8 bits of mantissa). A kernel bug is off by far more.
TOLERANCE = {torch.float32: {"loss": 1e-4, "grad": 1e-3}, torch.bfloat16: {"loss": 1e-3, "grad": 3e-2}}

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class CheckResult:
    device: str  # "cuda:0 (NVIDIA H100 80GB HBM3)"
    ok: bool
    error: float  # the worst max |error| / max |reference|, over every case and output
    tolerance: float  # the tolerance of that worst output
    detail: str  # which case and output, or the exception
    skipped: bool = False


_results: dict[str, CheckResult] = {}


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def results() -> dict[str, CheckResult]:
    """The checks run so far in this process, by device ("cuda:0")."""
    return dict(_results)


def device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def describe(device: torch.device) -> str:
    key = device_key(device)
    if device.type == "cuda":
        return f"{key} ({torch.cuda.get_device_name(torch.device(key))})"
    return key


def kernel_usable(device: torch.device, kernel: LossFn, reference: LossFn) -> bool:
    """Whether the compiled `kernel` may serve `device`: checked once per device and process (see module)."""
    if device.type not in CHECK_DEVICE_TYPES:
        return True
    key = device_key(device)
    if key not in _results:
        if not enabled():
            _results[key] = CheckResult(describe(device), True, 0.0, 0.0, f"{ENV}=0", skipped=True)
            return True
        _results[key] = run_check(torch.device(key), kernel, reference)
        report(_results[key])
    return _results[key].ok


def check_device(device: torch.device) -> CheckResult | None:
    """The check run now on `device` with its compiled kernel (for `nlip-ds doctor` and scripts/gpu_check.sh),
    whatever CHECK_DEVICE_TYPES says; None when no kernel is available for it."""
    from . import contrastive, extension

    module = extension.load(device.type) if device.type in extension.KINDS else None
    if module is None:
        return None
    return run_check(device, lambda *args: contrastive._kernel_loss(module, *args),
                     contrastive.fused_contrastive_loss_ref)


def report(result: CheckResult) -> None:
    if result.ok:
        logger.info("fused contrastive kernel self-check passed on %s (worst error %.2g of tolerance %.2g)",
                    result.device, result.error, result.tolerance)
        return
    logger.error("fused contrastive kernel self-check FAILED on %s: %s (error %.3g, tolerance %.3g); this process "
                 "uses the pure-PyTorch reference loss on that device from now on (it materializes the n x N "
                 "logits; set %s=0 to skip the check)", result.device, result.detail, result.error,
                 result.tolerance, ENV)


def run_check(device: torch.device, kernel: LossFn, reference: LossFn) -> CheckResult:
    """Every case x dtype, kernel against the float64 reference; the worst relative error decides."""
    worst = (0.0, 1.0, "")  # (error / tolerance, tolerance, where)
    worst_error = 0.0
    for dtype, tol in TOLERANCE.items():
        for case in CASES:
            name = f"{dtype_name(dtype)} n={case[0]} N={case[1]} offset={case[2]} d={case[3]} " \
                   f"{'shared' if case[4] else 'gathered'}"
            try:
                errors = compare(case, dtype, device, kernel, reference)
            except Exception as err:  # a kernel that throws fails its check like one that computes wrong
                return CheckResult(describe(device), False, float("inf"), tol["grad"],
                                   f"{name}: {type(err).__name__}: {err}")
            for output, error in errors.items():
                bound = tol["loss"] if output in ("loss", "per-sample loss", "d logit_scale") else tol["grad"]
                if error / bound > worst[0]:
                    worst, worst_error = (error / bound, bound, f"{name}, {output}"), error
    ok = worst[0] <= 1.0
    return CheckResult(describe(device), ok, worst_error, worst[1], worst[2] if not ok else "")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compare(case, dtype, device, kernel: LossFn, reference: LossFn) -> dict[str, float]:
    """Max |kernel - reference| / max(|reference|, 0.1) of each output of one case."""
    inputs = make_case(case)
    got = run_loss(kernel, inputs, dtype, device, case[4])
    rounded = {k: v.to(dtype).double() if v.dim() == 2 else v for k, v in inputs.items()}
    want = run_loss(reference, rounded, torch.float64, torch.device("cpu"), case[4])
    errors = {}
    for output, value in got.items():
        expected = want[output]
        value = value.detach().double().cpu()
        if value.shape != expected.shape or not torch.isfinite(value).all():
            errors[output] = float("inf")
            continue
        scale = max(expected.abs().max().item(), 0.1)
        errors[output] = (value - expected).abs().max().item() / scale
    return errors


def make_case(case) -> dict[str, torch.Tensor]:
    """float64 CPU features (L2-normalized), a CLIP-like logit scale and omega in [0, 1)."""
    n, N, offset, d, _ = case
    gen = torch.Generator().manual_seed(1234 + N)
    img = F.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1)
    omega = torch.rand(n, generator=gen, dtype=torch.float64)
    return {"img_all": img, "txt_all": txt, "omega": omega, "offset": torch.tensor(offset),
            "scale": torch.tensor(1 / 0.07, dtype=torch.float64)}


def run_loss(fn: LossFn, inputs, dtype, device, shared: bool) -> dict[str, torch.Tensor]:
    """Loss, per-sample losses and the gradients of fn on fresh leaves of `inputs` rounded to dtype."""
    offset, n = int(inputs["offset"]), inputs["omega"].shape[0]
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        img_all, txt_all = (inputs[k].to(device=device, dtype=dtype).requires_grad_() for k in ("img_all", "txt_all"))
        scale = inputs["scale"].to(device=device, dtype=scale_dtype).requires_grad_()
        if shared:
            img_local, txt_local = img_all, txt_all
        else:
            img_local = img_all.detach()[offset:offset + n].clone().requires_grad_()
            txt_local = txt_all.detach()[offset:offset + n].clone().requires_grad_()
        loss, per_sample = fn(img_local, txt_local, img_all, txt_all, scale, offset, inputs["omega"].to(device),
                              "soft_target")
        leaves = {"img_all": img_all, "txt_all": txt_all, "logit_scale": scale}
        if not shared:
            leaves.update(img_local=img_local, txt_local=txt_local)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    out = {"loss": loss.detach(), "per-sample loss": per_sample.detach()}
    for name, grad, leaf in zip(leaves, grads, leaves.values()):
        out[f"d {name}"] = torch.zeros_like(leaf) if grad is None else grad
    return out
