"""The task module that DeepSpeed wraps: NLIPModel plus the NLIP losses, summed into one loss.

One training step's data flow (DESIGN.md): local features -> differentiable all-gather -> fused contrastive
op with this rank's omega -> L_NITC and per-sample l -> caption loss weighted by the clean probability ->
optional MAE loss -> L = L_NITC + alpha L_LM + beta L_IR. When noise-completion changed some captions (the
batch carries "orig_input_ids"), the per-sample l handed to the noise estimator is that of the original pairs.
"""
from __future__ import annotations

import torch
from torch import nn

from nlip_ds.completion.policy import original_pair_loss
from nlip_ds.config import Config
from nlip_ds.distributed import all_gather_with_grad, get_rank
from nlip_ds.model.decoder import caption_loss
from nlip_ds.noise.harmonize import penalty_term
from nlip_ds.ops import fused_contrastive_loss


class NLIPTask(nn.Module):
    def __init__(self, model: nn.Module, cfg: Config):
        super().__init__()
        self.model = model
        self.alpha = cfg.model.decoder.loss_weight
        self.beta = cfg.model.mae.loss_weight if cfg.model.mae.enabled else 0.0
        self.label_smoothing = cfg.model.decoder.label_smoothing
        self.nitc_mode = cfg.noise.nitc_mode
        self.penalty_mu = cfg.noise.penalty_mu
        self.concept_dropout = cfg.model.text.concept_dropout

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.model.param_groups(weight_decay)

    def forward(self, batch: dict, omega: torch.Tensor, clean_prob: torch.Tensor) -> dict:
        """omega (n,): lambda * epsilon of this rank's samples (zeros in warm-up); clean_prob (n,): 1 - epsilon,
        the weight of each pair in the caption loss. Returns named loss terms, the total under "loss", and the
        detached per-sample contrastive losses the noise estimator consumes."""
        out = self.model(batch)
        img, txt = out["image_features"], out["text_features"]  # (n, D) each, L2-normalized
        img_all, txt_all = all_gather_with_grad(img), all_gather_with_grad(txt)  # (N, D): every rank's n rows
        row_offset = get_rank() * img.shape[0]
        soft_omega = omega if self.nitc_mode == "soft_target" else None
        contrastive, per_sample = fused_contrastive_loss(img, txt, img_all, txt_all, out["logit_scale"],
                                                         row_offset, soft_omega)
        if self.nitc_mode == "penalty":
            contrastive = contrastive + penalty_term(img, txt, omega, self.penalty_mu)
        caption, _ = caption_loss(out["caption_logits"], out["caption_labels"], clean_prob,
                                  label_smoothing=self.label_smoothing)
        terms = {"contrastive_loss": contrastive, "caption_loss": caption}
        total = contrastive + self.alpha * caption
        if "mae_loss" in out:
            terms["mae_loss"] = out["mae_loss"].mean()
            total = total + self.beta * terms["mae_loss"]
        terms["loss"] = total
        per_sample = per_sample.detach()
        if "orig_input_ids" in batch:  # noise-completion changed some captions: keep the original pairs' loss
            original = self._original_loss(batch, img, img_all, txt_all, out["logit_scale"], row_offset)
            per_sample = torch.where(batch["caption_changed"], original, per_sample)
        terms["per_sample_loss"] = per_sample
        terms["logit_scale"] = out["logit_scale"].detach()
        return terms

    @torch.no_grad()
    def _original_loss(self, batch: dict, img, img_all, txt_all, logit_scale, row_offset: int) -> torch.Tensor:
        """(n,) per-sample InfoNCE of each pair with its original caption: one no-grad T_e forward of the
        original captions (every row, so every rank runs T_e the same number of times under ZeRO-3), then the
        pair's loss against the gathered batch. The concept prefix is dropped with the training probability,
        by a draw of its own, so these losses have the same distribution as the unchanged rows' ones."""
        concept_ids, concept_mask = batch.get("concept_ids"), batch.get("concept_mask")
        if concept_ids is not None and self.training and self.concept_dropout > 0:
            keep = torch.rand(concept_ids.shape[0], device=concept_ids.device) >= self.concept_dropout  # (n,)
            concept_mask = concept_mask.bool() & keep.unsqueeze(1)
        txt = self.model.encode_text(batch["orig_input_ids"], batch["orig_attention_mask"], concept_ids,
                                     concept_mask)  # (n, D)
        return original_pair_loss(img.detach(), txt_all.detach(), img_all.detach(), txt, logit_scale.detach(),
                                  row_offset)
