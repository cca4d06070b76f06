"""Embed an evaluation split on every rank in lockstep and gather the features of all ranks.

Under ZeRO-3 every rank must call the model the same number of times; the exact-epoch loader gives every
rank the same number of equally sized batches (short ranks repeat samples, flagged `pad`), so a plain loop
is in lockstep, and the padded repeats are dropped after the gather.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nlip_ds.distributed import all_gather_tensor


@dataclass
class SplitFeatures:
    image: torch.Tensor  # (M, D) L2-normalized
    text: torch.Tensor  # (M, D) L2-normalized, of each sample's own caption
    label: torch.Tensor  # (M,) class index, -1 when unknown
    sample_id: torch.Tensor  # (M,)


@torch.no_grad()
def extract_features(model, loader, device) -> SplitFeatures:
    parts = {"image": [], "text": [], "label": [], "sample_id": [], "pad": []}
    loader.set_epoch(0)
    for batch in loader:
        parts["image"].append(model.encode_image(batch["image"].to(device)).float())
        parts["text"].append(model.encode_text(batch["input_ids"].to(device),
                                               batch["attention_mask"].to(device)).float())
        for key in ("label", "sample_id", "pad"):
            parts[key].append(batch[key].to(device))
    gathered = {k: all_gather_tensor(torch.cat(v)) for k, v in parts.items()}
    keep = ~gathered["pad"]
    order = torch.argsort(gathered["sample_id"][keep])  # the same order for any world size
    return SplitFeatures(**{k: gathered[k][keep][order].cpu() for k in ("image", "text", "label", "sample_id")})
