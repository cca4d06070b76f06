"""Noise-harmonization weights: ε per sample id from the last fit, which estimator.py turns into ω = λ·ε.

Why a table keyed by sample id: the fit runs once per epoch over the whole bank, but ω is needed every step for
the few samples of a micro-batch, on whatever device they live on. `NoiseState` keeps the ids of the last fit in
ascending order with their ε (float32, 12 bytes per sample) and answers a lookup with one `searchsorted` on the
query's device (the table is copied to that device once per fit), so the train step never syncs with the host.
Ids never fitted, and every id before the first fit, get ε = 0: plain CLIP loss.

The default `soft_target` form of L_NITC lives in the fused contrastive op (ops/contrastive.py), which takes ω.
`penalty_term` is the `penalty` alternative (docs/method.md, "Losses"): L_ITC + μ·mean_i ω_i·s_ii.
"""
from __future__ import annotations

import logging

import torch

from nlip_ds.noise.gmm import GMMFit

logger = logging.getLogger(__name__)


def _check_sorted_unique(ids: torch.Tensor) -> None:
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("NoiseState: sample ids must be distinct and ascending (LossBank.losses_since order)")


class NoiseState:
    """The latest GMM fit and ε for every sample id it covered."""

    def __init__(self):
        self.fit: GMMFit | None = None
        self._ids = torch.empty(0, dtype=torch.long)  # (k,) ascending
        self._eps = torch.empty(0, dtype=torch.float32)  # (k,)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def fitted(self) -> bool:
        return self.fit is not None

    def __len__(self) -> int:
        return self._ids.numel()

    def update(self, fit: GMMFit, sample_ids: torch.Tensor) -> None:
        """Adopt `fit`, whose posterior is ε of `sample_ids` (k,) in ascending order (the fit's input order)."""
        if fit.posterior is None or fit.posterior.shape != sample_ids.shape:
            raise ValueError(f"NoiseState.update: need the fit's posterior for each of the {sample_ids.numel()} "
                             f"ids, got {None if fit.posterior is None else tuple(fit.posterior.shape)}")
        ids = sample_ids.detach().cpu().long()
        _check_sorted_unique(ids)
        self.fit, self._ids, self._eps = fit, ids, fit.posterior.detach().cpu().float()
        self._tables.clear()

    def clear(self) -> None:
        """Back to no fit: ε = 0 (the CLIP loss) for every id."""
        self.__init__()

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = (self._ids.to(device), self._eps.to(device))
        return self._tables[device]

    def epsilon_for(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """(n,) ids -> (n,) float32 ε on the ids' device; 0 for ids the last fit did not cover."""
        ids, eps = self._table(sample_ids.device)
        if ids.numel() == 0:
            return torch.zeros(sample_ids.shape, dtype=torch.float32, device=sample_ids.device)
        query = sample_ids.long()
        pos = torch.searchsorted(ids, query).clamp_(max=ids.numel() - 1)  # (n,)
        return torch.where(ids[pos] == query, eps[pos], 0.0)

    def state_dict(self) -> dict:
        """Plain tensors and numbers (loads with torch.load(weights_only=True))."""
        fit = {} if self.fit is None else self.fit.state_dict()
        return {"ids": self._ids.clone(), "eps": self._eps.clone(), "fit": fit}

    def load_state_dict(self, state: dict) -> None:
        ids, eps = state["ids"].long(), state["eps"].float()
        if ids.shape != eps.shape:
            raise ValueError(f"NoiseState.load_state_dict: ids {tuple(ids.shape)} vs eps {tuple(eps.shape)}")
        _check_sorted_unique(ids)
        fit = GMMFit.from_state_dict(state["fit"]) if state["fit"] else None
        self.fit, self._ids, self._eps = fit, ids, eps
        self._tables.clear()


def penalty_term(img_local: torch.Tensor, txt_local: torch.Tensor, omega: torch.Tensor,
                 mu: float) -> torch.Tensor:
    """μ·mean_i ω_i·s_ii, the extra term of the `penalty` nitc mode (add it to the plain CLIP loss).

    img_local, txt_local: (n, d) L2-normalized embeddings of this rank's pairs, so s_ii = v_i·t_i is their
    cosine similarity; omega: (n,) = λ·ε (treated as a constant). Minimizing the term lowers the similarity of
    likely-noisy pairs in proportion to ω, so they are aligned less tightly. Returns a scalar that carries
    gradients to both embeddings; the mean is over this rank's pairs (equal n on every rank makes the engine's
    gradient average the global mean).
    """
    s_ii = (img_local * txt_local).sum(dim=-1)  # (n,)
    return mu * (omega.detach().to(s_ii.dtype) * s_ii).mean()
