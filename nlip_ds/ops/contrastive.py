"""Fused symmetric InfoNCE (CLIP) and the NLIP noise-adaptive contrastive losses.

Three layers (docs/architecture.md): the kernels and their checking binding in kernels/ (loaded by .extension), the
autograd rule `_FusedContrastive` here, and the public `fused_contrastive_loss`, which picks the compiled kernel
for the features' device and falls back, with a one-time warning, to the materializing reference
`fused_contrastive_loss_ref` beside it; on a CUDA device the kernel must first pass its self-check
(.selfcheck). `last_impl` records which one ran ("cpu", "cuda" or "reference").

Semantics (docs/method.md, "Losses"): this rank's n pairs are rows [row_offset, row_offset + n) of the N gathered pairs.
    l_i  = 1/2 [ -log softmax_j(scale v_i . t_j)[g_i]  -  log softmax_j(scale t_i . v_j)[g_i] ],  g_i = row_offset + i
    loss = mean_i of  -1/2 sum_j q_ij [log p^i2t_ij + log p^t2i_ij]  with targets q (w = omega):
    soft_target  q_ij = (1 - w_i) [j = g_i] + w_i / (N - 1) [j != g_i]  (one-hot without omega or when N = 1)
    reweight     q_ij = (1 - w_i) [j = g_i]                             (the loss (1 - w_i) l_i)
The returned per-sample vector is always the plain l (what the noise estimator consumes), detached.

Both forms are q_ij = a_i [j = g_i] + b_i with row mass m_i = sum_j q_ij = a_i + N b_i (1 for soft_target). The
kernels compute the logit gradient P - Q of a unit-mass row; the gradient of a row of mass m is m P - Q, which
they produce when handed lse - log m instead of lse (exp(x - lse + log m) = m p). So one kernel serves both.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch
from torch.autograd.function import once_differentiable

from . import extension, selfcheck

logger = logging.getLogger(__name__)

DISABLE_ENV = "NLIP_DS_DISABLE_EXT"

FORMS = ("soft_target", "reweight")

last_impl: str | None = None
_warned: set[str] = set()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(img_local, txt_local, img_all, txt_all, logit_scale, row_offset, omega, form) -> None:
    """Shape errors name the offending argument, for the kernel and the reference alike."""
    for name, t in (("img_local", img_local), ("txt_local", txt_local), ("img_all", img_all), ("txt_all", txt_all)):
        if t.dim() != 2 or t.shape[1] != img_local.shape[-1]:
            raise ValueError(f"{name} must be (rows, {img_local.shape[-1]}), got {tuple(t.shape)}")
    n, N = img_local.shape[0], img_all.shape[0]
    if txt_local.shape[0] != n or txt_all.shape[0] != N:
        raise ValueError(f"txt_local / txt_all must have {n} / {N} rows like img_local / img_all, got "
                         f"{txt_local.shape[0]} / {txt_all.shape[0]}")
    if n == 0:
        raise ValueError("img_local has no rows")
    if not 0 <= row_offset <= N - n:
        raise ValueError(f"row_offset {row_offset} puts the {n} local rows outside the {N} gathered rows")
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one element, got shape {tuple(logit_scale.shape)}")
    if omega is not None and tuple(omega.shape) != (n,):
        raise ValueError(f"omega must have shape ({n},), got {tuple(omega.shape)}")
    if form not in FORMS:
        raise ValueError(f"form {form!r} is not one of {FORMS}")


def target_coefficients(omega, n: int, N: int, dtype, device,
                        form: str = "soft_target") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, m), each (n,): the targets q_ij = a_i [j = g_i] + b_i of `form` and each row's mass m_i.
    Plain CLIP (no omega, or N = 1 for soft_target): a = m = 1, b = 0."""
    ones = torch.ones(n, dtype=dtype, device=device)
    if omega is None or (N == 1 and form == "soft_target"):
        return ones, torch.zeros(n, dtype=dtype, device=device), ones
    w = omega.detach().to(dtype=dtype, device=device)
    if form == "reweight":
        keep = (1 - w).contiguous()
        return keep, torch.zeros_like(keep), keep
    b = w / (N - 1)
    return (1 - w - b).contiguous(), b.contiguous(), ones


def _assemble(stats: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row statistics (2, 3, n) [i2t, t2i] x [lse, pos, rowsum] -> (mean target loss, plain per-sample).

    -sum_j q_ij log p_ij = m_i lse_i - (a_i pos_i + b_i rowsum_i). With a = m = 1, b = 0 the two expressions
    below are the same floating-point operations, so omega = 0 gives exactly the plain CLIP loss.
    """
    lse, pos, rowsum = stats.unbind(1)  # each (2, n)
    per_sample = 0.5 * (lse - pos).sum(0)  # (n,)
    target = 0.5 * (m * lse - (a * pos + b * rowsum)).sum(0)  # (n,)
    return target.mean(), per_sample


def _mass_shifted(lse: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """lse - log m (2, n): what makes the kernels' P - Q the gradient m P - Q of a row of mass m. A zero mass
    is floored at the dtype's smallest normal number, so the kernels never see an infinity (its P term is
    then below 1e-37 of the plain one)."""
    return (lse - m.clamp(min=torch.finfo(m.dtype).tiny).log()).contiguous()


class _FusedContrastive(torch.autograd.Function):
    """Forward keeps per-row statistics only; backward recomputes the logit tiles in the kernel."""

    @staticmethod
    def forward(ctx, ext, symmetric, row_offset, img_local, txt_local, img_all, txt_all, logit_scale, a, b, m):
        scale = logit_scale.detach()
        stats = ext.stats(img_local, txt_local, img_all, txt_all, scale, row_offset, symmetric)  # (2, 3, n)
        loss, per_sample = _assemble(stats, a, b, m)
        lse = _mass_shifted(stats[:, 0], m)  # (2, n); the plain lse when every mass is 1
        ctx.save_for_backward(img_local, txt_local, img_all, txt_all, scale, lse, a, b)
        ctx.ext, ctx.symmetric, ctx.row_offset, ctx.scale_shape = ext, symmetric, row_offset, logit_scale.shape
        ctx.mark_non_differentiable(per_sample)
        return loss, per_sample

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_per_sample):
        img_local, txt_local, img_all, txt_all, scale, lse, a, b = ctx.saved_tensors
        # d mean / d (row loss of one direction) = 1/(2n); kept on device so a CUDA backward never syncs.
        weight = grad_loss.to(lse.dtype) * (0.5 / img_local.shape[0])
        d_vl, d_tl, d_va, d_ta, d_scale = ctx.ext.grads(img_local, txt_local, img_all, txt_all, scale,
                                                        ctx.row_offset, ctx.symmetric, lse, a, b, weight)
        d_scale = d_scale.to(scale.dtype).reshape(ctx.scale_shape)
        return None, None, None, d_vl, d_tl, d_va, d_ta, d_scale, None, None, None


def fused_contrastive_loss_ref(img_local, txt_local, img_all, txt_all, logit_scale, row_offset=0, omega=None,
                               form="soft_target"):
    """Pure-PyTorch reference with the contract of `fused_contrastive_loss`; materializes two (n, N) logit
    matrices. Used by the tests (in float64) and as the fallback."""
    _check_inputs(img_local, txt_local, img_all, txt_all, logit_scale, row_offset, omega, form)
    acc = _acc_dtype(img_local.dtype)
    n, N = img_local.shape[0], img_all.shape[0]
    scale = logit_scale.reshape(()).to(acc)
    rows = torch.arange(n, device=img_local.device)
    target = rows + row_offset  # (n,) the positive's column
    logp_i2t = (scale * (img_local.to(acc) @ txt_all.to(acc).T)).log_softmax(1)  # (n, N)
    logp_t2i = (scale * (txt_local.to(acc) @ img_all.to(acc).T)).log_softmax(1)  # (n, N)
    per_sample = -0.5 * (logp_i2t[rows, target] + logp_t2i[rows, target])  # (n,)
    if omega is None or (N == 1 and form == "soft_target"):
        return per_sample.mean(), per_sample.detach()
    w = omega.detach().to(acc)[:, None]  # (n, 1)
    off = w / (N - 1) if form == "soft_target" else torch.zeros_like(w)
    q = off.expand(n, N).clone()  # (n, N) targets
    q[rows, target] = 1 - w[:, 0]
    loss = -0.5 * (q * (logp_i2t + logp_t2i)).sum(1).mean()
    return loss, per_sample.detach()


def _extension_for(device: torch.device):
    """(compiled module or None, why not)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None, f"{DISABLE_ENV}=1"
    if device.type not in extension.KINDS:
        return None, f"no fused kernel for device type {device.type!r}"
    module = extension.load(device.type)
    return module, extension.load_error(device.type)


def _record(impl: str, fallback_reason: str | None = None) -> None:
    global last_impl
    last_impl = impl
    logger.debug("fused_contrastive_loss ran the %s implementation", impl)
    if fallback_reason is not None and fallback_reason not in _warned:
        _warned.add(fallback_reason)
        message = (f"fused_contrastive_loss falls back to the pure-PyTorch reference ({fallback_reason}); it "
                   "materializes the n x N logits")
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def fused_contrastive_loss(img_local, txt_local, img_all, txt_all, logit_scale, row_offset=0, omega=None,
                           form="soft_target"):
    """Symmetric InfoNCE over the gathered batch without materializing the (n, N) logits.

    Args:
        img_local, txt_local: (n, d) L2-normalized features of this rank.
        img_all, txt_all: (N, d) features of all ranks (differentiably gathered); the local block sits at
            row_offset. Pass the local tensors themselves (`img_all is img_local`) in a single process: one
            tile product then serves both directions.
        logit_scale: one-element tensor, the multiplier of the cosines (1/tau); receives a gradient.
        omega: optional (n,) NLIP weights in [0, 1]; treated as a constant.
        form: how omega enters the loss (module docstring): "soft_target" (the default, the paper-like form)
            moves a pair's target mass from its own caption to the others; "reweight" scales its loss by 1 - w.

    Returns:
        (mean loss over the n local rows, (n,) plain per-sample CLIP loss, detached), both in float32 (float64
        for float64 features). Gradients reach all four feature inputs and logit_scale.
    """
    _check_inputs(img_local, txt_local, img_all, txt_all, logit_scale, row_offset, omega, form)
    ext, reason = _extension_for(img_local.device)
    if ext is not None and not selfcheck.kernel_usable(img_local.device, lambda *args: _kernel_loss(ext, *args),
                                                       fused_contrastive_loss_ref):
        reason = f"the {ext.device} kernel failed its self-check on {selfcheck.device_key(img_local.device)}"
        ext = None
    if ext is None:
        _record("reference", reason)
        return fused_contrastive_loss_ref(img_local, txt_local, img_all, txt_all, logit_scale, row_offset, omega,
                                          form)
    _record(ext.device)
    return _kernel_loss(ext, img_local, txt_local, img_all, txt_all, logit_scale, row_offset, omega, form)


def _kernel_loss(ext, img_local, txt_local, img_all, txt_all, logit_scale, row_offset, omega, form):
    """The compiled kernel's (loss, per_sample) on checked inputs: the entry the self-check runs."""
    n, N = img_local.shape[0], img_all.shape[0]
    a, b, m = target_coefficients(omega, n, N, _acc_dtype(img_local.dtype), img_local.device, form)
    symmetric = img_local is img_all and txt_local is txt_all
    if symmetric:
        v, t = img_local.contiguous(), txt_local.contiguous()
        features = (v, t, v, t)
    else:
        features = tuple(x.contiguous() for x in (img_local, txt_local, img_all, txt_all))
    return _FusedContrastive.apply(ext, symmetric, int(row_offset), *features, logit_scale, a, b, m)
