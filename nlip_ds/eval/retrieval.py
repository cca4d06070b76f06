"""Image-text retrieval recall@K, the standard protocol (Flickr30K / COCO Karpathy test).

- image-to-text: an image is retrieved at K when any of its captions ranks within the top K; its rank is
  the number of captions of *other* images that score at least as high as its best caption.
- text-to-image: each caption has one image; its rank is the number of other images that score at least as
  high as that image.

Ties are counted pessimistically (a wrong item that ties with the match ranks above it). The optimistic
convention would give a collapsed model, whose embeddings are all equal, perfect recall; the pessimistic
one gives it zero. Ties between two captions of the same image do not matter: both are matches.
"""
from __future__ import annotations

import torch

KS = (1, 5, 10)


def i2t_ranks(image: torch.Tensor, text: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """(N,) rank of each image's best caption among the captions of other images."""
    scores = image @ text.T  # (N, C)
    match = text_image[None, :] == torch.arange(image.shape[0])[:, None]  # (N, C)
    best = scores.masked_fill(~match, float("-inf")).max(dim=1).values  # (N,)
    return ((scores >= best[:, None]) & ~match).sum(dim=1)


def t2i_ranks(image: torch.Tensor, text: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """(C,) rank of each caption's image among the other images."""
    scores = text @ image.T  # (C, N)
    positive = scores.gather(1, text_image[:, None])  # (C, 1)
    match = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, text_image[:, None], True)
    return ((scores >= positive) & ~match).sum(dim=1)


def recall(ranks: torch.Tensor, ks=KS) -> dict[int, float]:
    return {k: (ranks < k).float().mean().item() for k in ks}


def multi_caption_retrieval(image: torch.Tensor, text: torch.Tensor, text_image: torch.Tensor) -> dict:
    """i2t_r{1,5,10} and t2i_r{1,5,10} for N images (N, D) and their C captions (C, D); text_image (C,) is
    the image row of each caption. Every image needs at least one caption."""
    if image.shape[0] == 0 or text.shape[0] == 0:
        raise ValueError("retrieval needs at least one image with a caption")
    if torch.bincount(text_image, minlength=image.shape[0]).min() == 0:
        raise ValueError("retrieval: an image has no caption")
    out = {f"i2t_r{k}": v for k, v in recall(i2t_ranks(image, text, text_image)).items()}
    out.update({f"t2i_r{k}": v for k, v in recall(t2i_ranks(image, text, text_image)).items()})
    return out


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor) -> dict:
    """One caption per image (row i of `text` describes row i of `image`), as the training split gives."""
    return multi_caption_retrieval(image, text, torch.arange(image.shape[0]))
