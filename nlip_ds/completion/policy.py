"""Completion policies: which pairs train on a synthetic caption and how the caption is built. (The noise
estimator keeps seeing the original pair's loss: nlip_ds/train/task.py.)

- `replace` (default): a pair uses its synthetic caption with probability ε; `threshold`: when ε > 0.5;
  `concat`: with probability ε, the original caption followed by the synthetic one, cut to the context length.
- The draw is a hash of (seed, epoch, sample id), not an RNG stream: the same pair gets the same decision on
  any number of ranks, in any batch order and after a resume, and a new one each epoch.
- A replaced pair (replace, threshold) trains with ω = 0: its caption is no longer the noisy one. A concat pair
  keeps its ω, since its original (possibly incorrect) text is still in the caption.
"""
from __future__ import annotations

import torch

POLICIES = ("replace", "concat", "threshold")
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (the 'lowbias32' xor-shift-multiply); int64 arithmetic without overflow
    (x < 2^32 times a multiplier < 2^31)."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x46B08A5B) & _M32  # 0x846CA68B halved into int64-safe range
    return x ^ (x >> 16)


def uniform_draw(sample_ids: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """(n,) ids -> (n,) float64 in [0, 1), a fixed function of (seed, epoch, id)."""
    ids = sample_ids.long()
    key = _mix32(torch.full_like(ids, (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + 0x165667B1) & _M32))
    x = _mix32(_mix32(ids ^ key) ^ ((ids >> 32) & _M32))
    return x.double() / 2.0 ** 32


def select(policy: str, epsilon: torch.Tensor, sample_ids: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """(n,) bool: which pairs train on their synthetic caption this epoch."""
    if policy == "threshold":
        return epsilon > 0.5
    if policy in ("replace", "concat"):
        return uniform_draw(sample_ids, seed, epoch).to(epsilon.device) < epsilon.double()
    raise ValueError(f"completion policy {policy!r} is not one of {POLICIES}")


def _content(row: list[int], special: set[int], eos_id: int) -> list[int]:
    """The tokens of a caption row between [BOS] and its [EOS] (specials dropped)."""
    out = []
    for token in row:
        if token == eos_id:
            break
        if token not in special:
            out.append(token)
    return out


def caption_rows(policy: str, original: torch.Tensor, synthetic: torch.Tensor, *, bos_id: int, eos_id: int,
                 pad_id: int, special: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """New (input_ids, attention_mask), both (m, T) like `original` (m, T): `[BOS] caption [EOS] [PAD]...`
    where the caption is the synthetic one (replace, threshold) or original + synthetic (concat), cut so
    that [EOS] fits in T. `synthetic` (m, L) holds generated ids after [BOS] (as NLIPModel.generate)."""
    width = original.shape[1]
    ids = torch.full_like(original, pad_id)
    for i, (orig, syn) in enumerate(zip(original.tolist(), synthetic.tolist())):
        text = _content(syn, special, eos_id)
        if policy == "concat":
            text = _content(orig, special, eos_id) + text
        row = [bos_id] + text[:width - 2] + [eos_id]
        ids[i, :len(row)] = torch.tensor(row, dtype=ids.dtype)
    return ids, (ids != pad_id).long()


def zeroes_omega(policy: str) -> bool:
    """Whether a pair on its synthetic caption trains with ω = 0 (its noisy caption is gone)."""
    return policy in ("replace", "threshold")
