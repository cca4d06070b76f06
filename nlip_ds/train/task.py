"""The task module that DeepSpeed wraps: NLIPModel plus the NLIP losses, summed into one loss.

One training step's data flow (docs/architecture.md): local features -> differentiable all-gather -> fused contrastive
op with this rank's omega -> L_NITC and per-sample l -> caption loss weighted by the clean probability ->
optional MAE loss -> L = L_NITC + alpha L_LM + beta L_IR.

The per-sample l handed to the noise estimator is always that of the pair as the data gave it: the original
caption with no concept prefix. By default the trained text embedding reads the caption alone (the prefix
goes to the caption decoder), so that is the trained pair's own l until synthetic captions start; from then
on (or when model.text.prefix_in_embedding lets the embedding read the prefix) it is recomputed.
"""
from __future__ import annotations

import torch
from torch import nn

from nlip_ds.config import Config
from nlip_ds.distributed import all_gather_tensor, all_gather_with_grad, get_rank
from nlip_ds.model.decoder import caption_loss
from nlip_ds.noise.estimator import NoiseEstimator
from nlip_ds.ops import fused_contrastive_loss


class NLIPTask(nn.Module):
    def __init__(self, model: nn.Module, cfg: Config, noise: NoiseEstimator | None = None):
        """noise: the run's estimator, whose L_NITC form the task computes (a fresh one from cfg.noise if None)."""
        super().__init__()
        self.model = model
        self.noise = noise if noise is not None else NoiseEstimator(cfg.noise)
        self.alpha = cfg.model.decoder.loss_weight
        self.beta = cfg.model.mae.loss_weight if cfg.model.mae.enabled else 0.0
        self.label_smoothing = cfg.model.decoder.label_smoothing
        self.prefix_in_embedding = cfg.model.text.prefix_in_embedding

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
        logit_scale = out["logit_scale"].float()  # a bf16/fp16 parameter under DeepSpeed; the loss runs in float32
        contrastive, per_sample = self.noise.nitc_loss(img, txt, img_all, txt_all, logit_scale, row_offset, omega)
        caption, _ = caption_loss(out["caption_logits"], out["caption_labels"], clean_prob,
                                  label_smoothing=self.label_smoothing)
        terms = {"contrastive_loss": contrastive, "caption_loss": caption}
        total = contrastive + self.alpha * caption
        if "mae_loss" in out:
            terms["mae_loss"] = out["mae_loss"].mean()
            total = total + self.beta * terms["mae_loss"]
        terms["loss"] = total
        if self._trained_pair_differs(batch):  # the estimator sees the data's own pair
            per_sample = self._estimator_loss(batch, img, img_all, logit_scale, row_offset)
        terms["per_sample_loss"] = per_sample.detach()
        terms["logit_scale"] = logit_scale.detach()
        return terms

    def _trained_pair_differs(self, batch: dict) -> bool:
        """Whether the trained text embedding is not that of the original caption alone: some captions may be
        synthetic (from completion.start_epoch on: "caption_changed" is in every rank's batch), or the
        embedding reads the concept prefix. The same answer on every rank at every step (lockstep)."""
        return "caption_changed" in batch or ("concept_ids" in batch and self.prefix_in_embedding)

    @torch.no_grad()
    def _estimator_loss(self, batch: dict, img, img_all, logit_scale, row_offset: int) -> torch.Tensor:
        """(n,) per-sample InfoNCE of every pair with its original caption and no concept prefix, against the
        gathered batch of such captions: what the noise estimator must see. The prefix is retrieved from the
        image, so with it an incorrect caption borrows its image's concepts and looks clean (docs/completion.md:
        the detection AUC fell from 0.96 to about 0.75 when the estimator saw the prefixed loss), and a replaced
        caption says nothing about the original pair. One no-grad T_e forward on every rank (lockstep under
        ZeRO-3: `_trained_pair_differs` answers alike on every rank) and one all-gather of (n, D)."""
        input_ids = batch.get("orig_input_ids", batch["input_ids"])
        attention_mask = batch.get("orig_attention_mask", batch["attention_mask"])
        txt = self.model.encode_text(input_ids, attention_mask)  # (n, D)
        _, per_sample = fused_contrastive_loss(img.detach(), txt, img_all.detach(), all_gather_tensor(txt),
                                               logit_scale.detach(), row_offset)
        return per_sample
