"""Fused kernels and their pure-PyTorch references."""
from .contrastive import fused_contrastive_loss, fused_contrastive_loss_ref

__all__ = ["fused_contrastive_loss", "fused_contrastive_loss_ref"]
