"""Noise-detection metrics, fit_summary and the fit histogram image."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from nlip_ds.noise.gmm import fit_gmm
from nlip_ds.noise.metrics import detection_auc, detection_precision_recall, fit_summary
from nlip_ds.noise.plots import render_fit_histogram


@pytest.mark.parametrize("scores,flags,auc", [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),
    ([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1], 0.875),  # the tie between a clean and a noisy pair counts 1/2
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),
    ([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0], 1.0),
    ([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1], 0.0),
    # (noisy, clean) pairs: 0.3 vs 0.3 -> 1/2, 0.3 vs 0.7 -> 0, then twice (0.7 vs 0.3 -> 1, 0.7 vs 0.7 -> 1/2)
    ([0.3, 0.3, 0.7, 0.7, 0.7], [0, 1, 0, 1, 1], (0.5 + 0.0 + 1.0 + 0.5 + 1.0 + 0.5) / 6),
])
def test_auc_hand_computed(scores, flags, auc):
    assert detection_auc(torch.tensor(scores), torch.tensor(flags)) == pytest.approx(auc, abs=1e-12)


def test_auc_ignores_unknown_flags():
    scores = torch.tensor([0.2, 0.5, 0.5, 0.9, 100.0, -100.0])
    flags = torch.tensor([0, 0, 1, 1, -1, -1])
    assert detection_auc(scores, flags) == pytest.approx(0.875)


def test_auc_matches_sklearn_with_many_ties():
    g = torch.Generator().manual_seed(0)
    flags = torch.randint(0, 2, (5000,), generator=g)
    scores = torch.round((torch.rand(5000, generator=g) + 0.3 * flags) * 20) / 20  # ~26 distinct values
    assert detection_auc(scores, flags) == pytest.approx(roc_auc_score(flags.numpy(), scores.numpy()), abs=1e-12)


def test_auc_undefined_for_one_class():
    assert math.isnan(detection_auc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])))
    assert math.isnan(detection_auc(torch.tensor([0.1, 0.9]), torch.tensor([0, -1])))


def test_precision_recall_at_one_half():
    scores = torch.tensor([0.9, 0.6, 0.4, 0.7, 0.5, 0.99])
    flags = torch.tensor([1, 0, 1, 1, 0, -1])
    precision, recall = detection_precision_recall(scores, flags)  # predicted noisy: 0.9, 0.6, 0.7 (not 0.5)
    assert (precision, recall) == pytest.approx((2 / 3, 2 / 3))
    assert detection_precision_recall(torch.tensor([0.1, 0.2]), torch.tensor([1, 0])) == (0.0, 0.0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        detection_auc(torch.rand(3), torch.tensor([0, 1]))


def synthetic(n: int = 20_000, rate: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flags = (torch.rand(n, generator=g) < rate).long()
    losses = torch.where(flags > 0, 3.5 + 0.8 * torch.randn(n, generator=g), 1.0 + 0.4 * torch.rand(n, generator=g))
    return losses, flags


def test_fit_summary_with_ground_truth():
    losses, flags = synthetic()
    flags[:100] = -1
    fit = fit_gmm(losses)
    summary = fit_summary(fit, fit.posterior, flags)
    assert all(isinstance(v, float) for v in summary.values())
    assert summary["noise/rate"] == fit.noise_rate and summary["noise/mean_noisy"] == fit.means[1]
    assert summary["noise/var_clean"] == fit.variances[0] and summary["noise/n_iter"] == fit.n_iter
    assert summary["noise/true_rate"] == pytest.approx(float((flags[100:] > 0).double().mean()))
    assert summary["noise/auc"] > 0.97 and summary["noise/precision"] > 0.9 and summary["noise/recall"] > 0.9
    assert abs(summary["noise/rate"] - summary["noise/true_rate"]) < 0.03


@pytest.mark.parametrize("flags", [None, "unknown"])
def test_fit_summary_without_ground_truth(flags):
    losses, _ = synthetic()
    fit = fit_gmm(losses)
    flags = None if flags is None else torch.full((losses.numel(),), -1)
    summary = fit_summary(fit, fit.posterior, flags)
    assert {"noise/rate", "noise/mean_clean", "noise/mean_noisy", "noise/var_clean", "noise/var_noisy",
            "noise/separation", "noise/n_iter"} <= summary.keys()
    assert not {"noise/auc", "noise/precision", "noise/recall", "noise/true_rate"} & summary.keys()


@pytest.mark.parametrize("with_flags", [True, False])
def test_histogram_image(tmp_path, with_flags):
    losses, flags = synthetic(5_000)
    losses[0] = math.nan
    flags[:50] = -1
    fit = fit_gmm(losses)
    image = render_fit_histogram(fit, losses, flags if with_flags else None, size=(5.0, 3.0), dpi=80,
                                 path=tmp_path / "fit.png")
    assert image.shape == (240, 400, 3) and image.dtype == np.uint8
    assert image.std() > 10  # something was drawn
    from PIL import Image
    with Image.open(tmp_path / "fit.png") as png:
        assert png.size == (400, 240)
