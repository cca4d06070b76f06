"""Small building blocks shared by the NLIP modules: the LayerNorm that uses apex when it can, the learnable
logit scale, weight initialization of transformers models, and the masked-mean helpers.

Why a LayerNorm subclass instead of swapping in `apex.normalization.FusedLayerNorm` modules: the kernel choice
is made per call from the input's device, so one model object is correct on CPU (tests, export, inference
without apex) and fast on CUDA, its state dict keys never change, and converting an existing module is a class
change that keeps its parameters (which matters when ZeRO-3 has already partitioned them at construction).
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def _import_apex_layer_norm() -> Optional[Callable]:
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except Exception:  # apex missing or built without its CUDA extensions
        return None
    return fused_layer_norm_affine


_APEX_LAYER_NORM: Optional[Callable] = _import_apex_layer_norm()
# which kernel the first LayerNorm call used ("apex" or "torch"); None until a LayerNorm has run
layer_norm_backend: Optional[str] = None


def apex_available() -> bool:
    return _APEX_LAYER_NORM is not None


def _log_backend_once(backend: str) -> None:
    global layer_norm_backend
    if layer_norm_backend is None:
        layer_norm_backend = backend
        reason = "apex fused kernel, input on CUDA" if backend == "apex" else (
            "apex not installed" if _APEX_LAYER_NORM is None else "input not on CUDA")
        logger.info("LayerNorm: %s (%s)", backend, reason)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that runs apex's fused kernel on CUDA inputs when apex imports, torch's kernel otherwise.

    Same parameters and state-dict keys as nn.LayerNorm, so checkpoints load with or without apex.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and _APEX_LAYER_NORM is not None and self.elementwise_affine:
            _log_backend_once("apex")
            return _APEX_LAYER_NORM(input=x, weight=self.weight, bias=self.bias,
                                    normalized_shape=self.normalized_shape, eps=self.eps)
        _log_backend_once("torch")
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def convert_layer_norms(module: nn.Module) -> int:
    """Turn every plain nn.LayerNorm inside `module` into `LayerNorm` in place; returns how many changed.

    transformers builds its own nn.LayerNorm modules with no way to pass a class, so the class is changed
    after construction; `LayerNorm` adds no state, so the parameters stay exactly as they were.
    """
    changed = 0
    for sub in module.modules():
        if type(sub) is nn.LayerNorm:
            sub.__class__ = LayerNorm
            changed += 1
    return changed


@torch.no_grad()
def init_transformers_weights(model: nn.Module, skip: tuple = ()) -> None:
    """Run a transformers model's own per-module initializer (`_init_weights`) on every submodule but `skip`.

    The encoders build their transformers models with initialization switched off and call this from their
    init_weights(), so that one code path initializes both a plain model and one whose parameters DeepSpeed's
    zero.Init partitioned at construction (then gathered around the init_weights() call).
    """
    for module in model.modules():
        if not isinstance(module, skip):
            model._init_weights(module)


class LogitScale(nn.Module):
    """The learnable temperature as its own module, so ZeRO-3 gathers it when it is called.

    Stores log(scale) as a (1,) parameter (DeepSpeed's zero.Init cannot partition 0-dim parameters); forward
    returns exp(log_scale) clamped at `max_scale` as a 0-dim tensor, differentiable below the clamp, as CLIP
    does.
    """

    def __init__(self, init: float, max_scale: float):
        super().__init__()
        self.init, self.max_scale = float(init), float(max_scale)
        self.log_scale = nn.Parameter(torch.tensor([self.init]).log())  # (1,)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.log_scale.fill_(math.log(self.init))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)[0]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit rows in float32: the contrastive loss then runs in float32 whatever the compute precision."""
    return F.normalize(x.float(), dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is true; 0 where a row has none."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)
