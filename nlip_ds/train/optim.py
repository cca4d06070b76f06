"""Optimizers: AdamW (torch) and LAMB, both plain torch so they run under ZeRO on CPU and GPU alike.

DeepSpeed's fused optimizers need CUDA; a client optimizer keeps CPU debugging runs on the same code path.
"""
from __future__ import annotations

import torch

from nlip_ds.config import OptimConfig


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020): Adam's update rescaled per tensor by ||w|| / ||update|| (trust ratio).

    Weight decay is decoupled and part of the update, as in the paper; tensors with zero norm use ratio 1.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        m_hat = m / (1 - beta1 ** state["step"])
        v_hat = v / (1 - beta2 ** state["step"])
        update = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * p
        w_norm, u_norm = p.norm(), update.norm()
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        p.add_(update * ratio, alpha=-group["lr"])


def build_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "lamb":
        return Lamb(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)
