"""Image-text retrieval recall@K when each image has one caption (its own sample)."""
from __future__ import annotations

import torch


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """Query i's match is gallery i. Its rank is the number of gallery items scoring strictly higher, so a
    tie with the match does not count against it (the optimistic convention; ties are rare with floats)."""
    scores = query @ gallery.T  # (M, M)
    positive = scores.diagonal()[:, None]
    rank = (scores > positive).sum(dim=1)  # (M,)
    return {k: (rank < k).float().mean().item() for k in ks if k <= gallery.shape[0]}


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor) -> dict:
    i2t = recall_at_k(image, text)
    t2i = recall_at_k(text, image)
    out = {f"i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r{k}": v for k, v in t2i.items()})
    return out
