"""Health metrics of the noise estimator, as flat "noise/*" dicts for the metrics sink.

Why here and without scikit-learn: the train loop logs them after every refit on rank 0, and scikit-learn is
a test-only dependency. Detection metrics need ground truth, which only synthetic data carries; flags are int
tensors with 1 = noisy, 0 = clean and -1 = unknown (unknown samples are left out of every detection metric).
"""
from __future__ import annotations

import logging
import math

import torch

from nlip_ds.noise.gmm import GMMFit

logger = logging.getLogger(__name__)


def _labeled(scores: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float64, labels bool) of the samples whose flag is known."""
    if scores.shape != flags.shape:
        raise ValueError(f"noise metrics: scores {tuple(scores.shape)} and flags {tuple(flags.shape)} differ")
    known = flags >= 0
    return scores[known].detach().cpu().double(), flags[known].cpu() > 0


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of (n,) values, tied values sharing the mean of their ranks -> (n,) float64."""
    sorted_values, order = torch.sort(values, stable=True)
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # last 1-based rank of each tie group
    group_rank = ends - (counts.double() - 1.0) / 2.0
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(group_rank, counts)
    return ranks


def detection_auc(scores: torch.Tensor, flags: torch.Tensor) -> float:
    """ROC AUC of `scores` (n,) for detecting flag 1 among flags in {0, 1} (Mann-Whitney U, ties count 1/2).

    NaN when the known flags hold only one class (the AUC is undefined)."""
    scores, noisy = _labeled(scores, flags)
    n_pos, n_neg = int(noisy.sum()), int((~noisy).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(_average_ranks(scores)[noisy].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def detection_precision_recall(scores: torch.Tensor, flags: torch.Tensor,
                               threshold: float = 0.5) -> tuple[float, float]:
    """Precision and recall of "noisy" = score > threshold; 0.0 where the denominator is 0 (as scikit-learn)."""
    scores, noisy = _labeled(scores, flags)
    predicted = scores > threshold
    true_pos = int((predicted & noisy).sum())
    n_predicted, n_noisy = int(predicted.sum()), int(noisy.sum())
    return (true_pos / n_predicted if n_predicted else 0.0), (true_pos / n_noisy if n_noisy else 0.0)


def _fit_metrics(fit: GMMFit) -> dict[str, float]:
    return {
        "noise/rate": fit.noise_rate,
        "noise/mean_clean": fit.means[0], "noise/mean_noisy": fit.means[1],
        "noise/var_clean": fit.variances[0], "noise/var_noisy": fit.variances[1],
        "noise/separation": fit.separation,
        "noise/n_iter": float(fit.n_iter), "noise/converged": float(fit.converged),
        "noise/log_likelihood": fit.log_likelihood,
        "noise/loss_lo": fit.bounds[0], "noise/loss_hi": fit.bounds[1],
        "noise/n_samples": float(fit.n_samples), "noise/n_dropped": float(fit.n_dropped),
    }


def fit_summary(fit: GMMFit, eps: torch.Tensor, flags: torch.Tensor | None = None,
                scores: torch.Tensor | None = None) -> dict[str, float]:
    """Flat dict of floats: the fit's parameters (means and variances on the normalized [0, 1] scale; loss_lo
    and loss_hi map it back to raw losses), the mean ε, and with ground truth the detection metrics: precision
    and recall of ε > 0.5, and the AUC of `scores` (default ε) for ranking noisy pairs above clean ones."""
    out = _fit_metrics(fit)
    out["noise/mean_eps"] = float(eps.double().mean()) if eps.numel() else math.nan
    if flags is None or not bool((flags >= 0).any()):
        return out
    precision, recall = detection_precision_recall(eps, flags)
    known = flags[flags >= 0]
    out.update({"noise/auc": detection_auc(eps if scores is None else scores, flags),
                "noise/precision": precision, "noise/recall": recall,
                "noise/true_rate": float((known > 0).double().mean())})
    return out
