"""MAE decoder V_d: reconstructs the patches V_e dropped, from the tokens it kept (the L_IR term).

As in MAE: a light transformer over [kept tokens ; one learned mask token per dropped patch], unshuffled back
to patch order with position embeddings, predicting each patch's pixels; the loss is the MSE on per-patch
normalized pixels, over dropped patches only. Position embeddings are learned (MAE uses fixed sin-cos; at
these sizes either works, and learned ones need no grid bookkeeping). The loss is returned per sample so the
caller can weight or average it.
"""
from __future__ import annotations

import logging

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from nlip_ds.config import MAEConfig
from nlip_ds.model.layers import LayerNorm, masked_mean

logger = logging.getLogger(__name__)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in the row-major order of the ViT's patch embedding."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)  # (B, H/p, W/p, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE (B,) over masked patches; targets normalized per patch (MAE's norm_pix_loss)."""
    target = target.float()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(-1)  # (B, L)
    return masked_mean(per_patch, mask.bool(), dim=1)


class MAEDecoder(nn.Module):
    """V_d: kept tokens (B, P + L_keep, Dv), ids_restore (B, L), mask (B, L), images -> loss (B,)."""

    def __init__(self, cfg: MAEConfig, *, vision_width: int, num_patches: int, num_prefix_tokens: int,
                 patch_size: int, in_chans: int = 3):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.patch_size = patch_size
        self.embed = nn.Linear(vision_width, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix_tokens + num_patches, cfg.width))
        self.blocks = nn.Sequential(*[Block(cfg.width, cfg.heads, mlp_ratio=4.0, qkv_bias=True,
                                            norm_layer=LayerNorm) for _ in range(cfg.depth)])
        self.norm = LayerNorm(cfg.width)
        self.pred = nn.Linear(cfg.width, patch_size * patch_size * in_chans)

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE's init: Xavier-uniform Linear weights, zero biases, unit norms, small token and position init."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor, mask: torch.Tensor,
                images: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        x = self.embed(tokens)  # (B, P + L_keep, Dm)
        batch, num_patches = ids_restore.shape
        fill = self.mask_token.expand(batch, num_patches + p - x.shape[1], -1)  # (B, L - L_keep, Dm)
        shuffled = torch.cat([x[:, p:], fill], dim=1)  # (B, L, Dm) kept patches first
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.cat([x[:, :p], shuffled.gather(1, index)], dim=1) + self.pos_embed  # (B, P + L, Dm)
        pred = self.pred(self.norm(self.blocks(x))[:, p:])  # (B, L, p*p*C)
        return reconstruction_loss(pred, patchify(images, self.patch_size), mask)
