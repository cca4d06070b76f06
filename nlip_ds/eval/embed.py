"""Embed (and optionally caption) a stream of evaluation records with a plain NLIPModel, then gather ranks.

Evaluation runs on the consolidated model, not under ZeRO-3, so ranks need not call the model in lockstep:
each rank embeds its own records (every world_size-th) and the results travel through one all_gather_object
(ranks hold different counts once bad images are skipped, which the fixed-size tensor gather cannot take).
Sorting by record index afterwards gives exactly the single-process result.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from nlip_ds.distributed import all_gather_object
from nlip_ds.eval.data import EvalRecord, Problems, image_batches
from nlip_ds.model.generation import GenerationOptions

logger = logging.getLogger(__name__)


@dataclass
class Embedded:
    index: torch.Tensor  # (N,) record index
    image: torch.Tensor  # (N, D) L2-normalized
    label: torch.Tensor  # (N,) class index, -1 when unknown
    where: list[str]
    captions: list[list[str]]  # references per image
    text: torch.Tensor  # (C, D) L2-normalized caption embeddings, C = all captions of all images
    text_image: torch.Tensor  # (C,) row of `image` that each caption describes
    generated: Optional[list[str]] = None
    problems: list[tuple[str, str]] = field(default_factory=list)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], context_length: int, batch_size: int,
                device) -> torch.Tensor:
    """(len(texts), D) float32 on the CPU."""
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenizer.encode(texts[start:start + batch_size], context_length)
        out.append(model.encode_text(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


@torch.no_grad()
def embed_records(model, tokenizer, records: Iterable[EvalRecord], *, batch_size: int, device,
                  need_captions: bool = False, embed_captions: bool = False,
                  generate: Optional[GenerationOptions] = None) -> Embedded:
    """This rank's share: image embeddings, caption embeddings (embed_captions), generated captions."""
    problems = Problems()
    size, context = model.config.vision.image_size, model.config.text.context_length
    parts: dict[str, list] = {"index": [], "image": [], "label": [], "where": [], "captions": [], "generated": []}
    for images, kept in image_batches(records, size, batch_size, problems, need_captions):
        images = images.to(device)
        parts["image"].append(model.encode_image(images).float().cpu())  # (B, D)
        parts["index"] += [r.index for r in kept]
        parts["label"] += [r.label for r in kept]
        parts["where"] += [r.where for r in kept]
        parts["captions"] += [r.captions for r in kept]
        if generate is not None:
            ids = model.generate(images, options=generate)
            parts["generated"] += tokenizer.decode(ids)
    flat = [c for caps in parts["captions"] for c in caps] if embed_captions else []
    owner = [i for i, caps in zip(parts["index"], parts["captions"]) for _ in caps] if embed_captions else []
    dim = model.config.embed_dim
    return Embedded(
        index=torch.tensor(parts["index"], dtype=torch.long),
        image=torch.cat(parts["image"]) if parts["image"] else torch.zeros(0, dim),
        label=torch.tensor(parts["label"], dtype=torch.long), where=parts["where"], captions=parts["captions"],
        text=embed_texts(model, tokenizer, flat, context, batch_size, device) if flat else torch.zeros(0, dim),
        text_image=torch.tensor(owner, dtype=torch.long),  # record indices until gather_embedded maps them
        generated=parts["generated"] if generate is not None else None, problems=problems.items)


def gather_embedded(local: Embedded) -> Embedded:
    """Every rank's share, in record order; text_image becomes a row index into the gathered images."""
    shares = all_gather_object(local)
    index = torch.cat([s.index for s in shares])
    order = torch.argsort(index)
    sorted_index = index[order]

    def cat_list(name):
        flat = [x for s in shares for x in getattr(s, name)]
        return [flat[i] for i in order.tolist()]

    owner = torch.cat([s.text_image for s in shares])
    text = torch.cat([s.text for s in shares])
    caption_order = torch.argsort(owner, stable=True)  # captions grouped by image, in their original order
    return Embedded(
        index=sorted_index, image=torch.cat([s.image for s in shares])[order],
        label=torch.cat([s.label for s in shares])[order], where=cat_list("where"),
        captions=cat_list("captions"), text=text[caption_order],
        text_image=torch.searchsorted(sorted_index, owner[caption_order]),
        generated=cat_list("generated") if local.generated is not None else None,
        problems=[p for s in shares for p in s.problems])
