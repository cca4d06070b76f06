"""Optimizers: AdamW (torch) and LAMB, both plain torch so they run under ZeRO on CPU and GPU alike.

DeepSpeed's fused optimizers need CUDA; a client optimizer keeps CPU debugging runs on the same code path.

LAMB under ZeRO-3: DeepSpeed hands the client optimizer one flat fp32 partition per parameter sub-group (each
rank's slice of every tensor of the sub-group, back to back), not the tensors themselves. `Lamb.use_zero3_layout`
tells it where each tensor's slice lies in those flat partitions; each step then sums the squared weights and
updates of every slice, all-reduces those (2 x tensors floats per sub-group: one call per sub-group, two per
step with the decay and no-decay groups) and applies each tensor's own trust ratio. The update is the one of
per-tensor LAMB on whole tensors, whatever the world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nlip_ds.config import OptimConfig


@dataclass
class FlatLayout:
    """Where the tensors of one flat ZeRO-3 partition lie: segment i is `lengths[i]` elements; even segments are a
    tensor's valid slice on this rank, odd ones the padding after it (its partition is rounded up)."""

    lengths: torch.Tensor  # (2K,) long: valid, pad, valid, pad, ...
    group: Optional[object]  # the process group the tensors are partitioned over


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020): Adam's update rescaled per tensor by ||w|| / ||update|| (trust ratio).

    Weight decay is decoupled and part of the update, as in the paper; tensors with zero norm use ratio 1.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._layouts: dict[int, FlatLayout] = {}  # id(flat partition) -> its layout, under ZeRO-3

    def use_zero3_layout(self, zero_optimizer) -> None:
        """Learn the flat partitions of a DeepSpeed ZeRO-3 optimizer (DeepSpeedZeroOptimizer_Stage3 wrapping this
        one): for every sub-group, each parameter's slice on this rank and the padding after it."""
        import torch.distributed as dist

        for i, params in enumerate(zero_optimizer.fp16_groups):
            group = zero_optimizer.sub_group_process_groups[i]
            rank = dist.get_rank(group=group)
            lengths = []
            for p in params:
                part = p.partition_numel()
                valid = max(0, min(part, p.ds_numel - rank * part))
                lengths += [valid, part - valid]
            flat = zero_optimizer.fp32_partitioned_groups_flat[i]
            if sum(lengths) != flat.numel():
                raise RuntimeError(f"LAMB: ZeRO-3 sub-group {i} holds {flat.numel()} elements, its parameters' "
                                   f"partitions {sum(lengths)}: unsupported DeepSpeed layout")
            self._layouts[id(flat)] = FlatLayout(torch.tensor(lengths, dtype=torch.long, device=flat.device),
                                                 group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    update = self._adam_update(p, group)
                    layout = self._layouts.get(id(p))
                    ratio = trust_ratio(p, update) if layout is None else self._flat_ratio(p, update, layout)
                    p.add_(update.mul_(ratio), alpha=-group["lr"])
        return loss

    def _adam_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
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
        # m_hat / (sqrt(v_hat) + eps) + wd * p in one buffer: at paper scale each temporary is a full fp32 copy of
        # the partition (0.9 GB per rank at world size 1)
        update = v.div(1 - beta2 ** state["step"]).sqrt_().add_(group["eps"])
        update = torch.div(m, update, out=update).div_(1 - beta1 ** state["step"])
        return update.add_(p, alpha=group["weight_decay"])

    @staticmethod
    def _flat_ratio(p: torch.Tensor, update: torch.Tensor, layout: FlatLayout) -> torch.Tensor:
        """(numel,) the trust ratio of each element's tensor, 0 on padding (which must stay as it is)."""
        sums = torch.stack([torch.segment_reduce(p * p, "sum", lengths=layout.lengths),
                            torch.segment_reduce(update * update, "sum", lengths=layout.lengths)])  # (2, 2K)
        if layout.group is not None and torch.distributed.get_world_size(group=layout.group) > 1:
            torch.distributed.all_reduce(sums, group=layout.group)
        w_norm, u_norm = sums[:, 0::2].sqrt()  # (K,) each: whole-tensor norms
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        per_segment = torch.stack([ratio, torch.zeros_like(ratio)], dim=1).flatten()  # (2K,) pads get 0
        return per_segment.repeat_interleave(layout.lengths, output_size=p.numel())  # (numel,)


def trust_ratio(p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """||w|| / ||update|| of one whole tensor, 1 when either is zero."""
    w_norm, u_norm = p.norm(), update.norm()
    return torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))


def build_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "lamb":
        return Lamb(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)
