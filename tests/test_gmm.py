"""fit_gmm: agreement with scikit-learn, determinism, and the documented handling of awkward inputs."""
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from nlip_ds.noise.gmm import GMMFit, fit_gmm

REG = 5e-4


def bimodal(n: int, noise_rate: float, seed: int = 0) -> torch.Tensor:
    """Per-sample-loss-like data: clean losses low and tight, noisy ones high and wide, shuffled."""
    g = torch.Generator().manual_seed(seed)
    k = int(n * noise_rate)
    clean = 1.0 + 0.4 * torch.randn(n - k, generator=g).abs()
    noisy = 3.5 + 0.8 * torch.randn(k, generator=g)
    losses = torch.cat([clean, noisy])
    return losses[torch.randperm(n, generator=g)]


def unimodal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.distributions.Gamma(4.0, 2.0).sample((n,)) + 0.01 * torch.rand(n, generator=g)


def documented_init(x: np.ndarray, split: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The initialization gmm.py documents: one M-step on the hard split of the normalized losses at `split`
    (0.5 for init="midrange")."""
    sides = [x[x < split], x[x >= split]]
    weights = np.array([s.size / x.size for s in sides])
    means = np.array([s.mean() for s in sides])
    variances = np.array([s.var() + REG for s in sides])
    return weights, means, variances


def sklearn_posterior(x: np.ndarray, tol: float, max_iter: int, split: float = 0.5
                      ) -> tuple[np.ndarray, GaussianMixture]:
    weights, means, variances = documented_init(x, split)
    gm = GaussianMixture(2, covariance_type="full", reg_covar=REG, tol=tol, max_iter=max_iter,
                         weights_init=weights, means_init=means.reshape(2, 1),
                         precisions_init=(1.0 / variances).reshape(2, 1, 1), init_params="random_from_data")
    gm.fit(x.reshape(-1, 1))
    return monotone_posterior(gm, x), gm


def monotone_posterior(gm: GaussianMixture, x: np.ndarray) -> np.ndarray:
    """scikit-learn's posterior of the high-mean component made non-decreasing in x, as ε is documented: a
    running maximum from the left where that component is the narrower one (its tail would call the highest
    losses clean), a running minimum from the right where it is the wider one. Evaluated over x and a fine grid
    of [0, 1] together, so the envelope does not depend on where the samples fall."""
    high = int(np.argmax(gm.means_.ravel()))
    points = np.concatenate([x, np.linspace(0.0, 1.0, 100_001)])
    order = np.argsort(points, kind="stable")
    p = gm.predict_proba(points.reshape(-1, 1))[:, high][order]
    if gm.covariances_.ravel()[high] < gm.covariances_.ravel()[1 - high]:
        p = np.maximum.accumulate(p)
    else:
        p = np.minimum.accumulate(p[::-1])[::-1]
    envelope = np.empty_like(p)
    envelope[order] = p
    return envelope[:x.size]


CASES = {
    "noise5": bimodal(20_000, 0.05, seed=1),
    "noise30": bimodal(20_000, 0.30, seed=2),
    "noise60": bimodal(20_000, 0.60, seed=3),
    "unimodal": unimodal(5_000, seed=4),
    "odd_size": bimodal(1_025, 0.2, seed=5),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("tol,max_iter", [(1e-2, 100), (1e-9, 1000)])
def test_matches_sklearn(name, tol, max_iter):
    losses = CASES[name]
    fit = fit_gmm(losses, tol=tol, max_iter=max_iter)
    x = fit.normalize(losses).numpy()
    expected, gm = sklearn_posterior(x, tol, max_iter)
    assert fit.n_iter == gm.n_iter_ and fit.converged == gm.converged_
    assert np.abs(fit.posterior.numpy() - expected).max() < 1e-3
    order = np.argsort(gm.means_.ravel())
    np.testing.assert_allclose(fit.means, gm.means_.ravel()[order], atol=1e-6)
    np.testing.assert_allclose(fit.weights, gm.weights_[order], atol=1e-6)
    np.testing.assert_allclose(fit.variances, gm.covariances_.ravel()[order], rtol=1e-6)
    assert fit.means[0] <= fit.means[1]


def test_epsilon_never_falls_as_the_loss_rises():
    """A Gaussian mixture's posterior turns back in the tail of the wider component. A model that has learned
    little spreads the clean pairs' losses widely while most noisy pairs sit in a tight cluster near chance, with
    a tail above it; the plain posterior then calls that tail, the pairs with the largest losses of all, clean.
    ε is clamped to the monotone side of the turn."""
    g = torch.Generator().manual_seed(11)
    clean = 2.0 + 0.8 * torch.randn(3000, generator=g)
    cluster, tail = 3.4 + 0.05 * torch.randn(2400, generator=g), 3.5 + 0.5 * torch.randn(600, generator=g).abs()
    losses = torch.cat([clean, cluster, tail])
    fit = fit_gmm(losses, tol=1e-4)
    assert fit.variances[1] < fit.variances[0]  # the noisy component is the narrow one
    x = fit.normalize(losses).numpy()
    _, gm = sklearn_posterior(x, 1e-4, 100)
    plain = gm.predict_proba(x.reshape(-1, 1))[:, int(np.argmax(gm.means_.ravel()))]
    top = losses > 3.8  # above the cluster: noisy pairs of the tail (and a few clean ones)
    assert plain[top.numpy()].mean() < 0.5  # the plain posterior calls them clean
    eps = fit.posterior
    assert eps[top].min() >= eps[3000:5400].median() and eps[top].mean() > 0.9
    order = torch.argsort(losses, stable=True)
    assert (eps[order].diff() >= 0).all()
    assert torch.equal(fit.noise_probability(losses), eps)


def test_estimates_the_noise_rate():
    for rate in (0.05, 0.3, 0.6):
        fit = fit_gmm(bimodal(50_000, rate, seed=7))
        assert abs(fit.noise_rate - rate) < 0.03, (rate, fit.noise_rate)
        assert fit.separation > 2.0


@pytest.mark.parametrize("q", [(0.005, 0.995), (0.1, 0.9), (0.0, 1.0)])
@pytest.mark.parametrize("n", [1, 7, 200, 1001])
def test_bounds_are_inverted_cdf_quantiles(q, n):
    losses = bimodal(n, 0.3, seed=n)
    fit = fit_gmm(losses, clip_quantiles=q)
    expected = np.quantile(losses.numpy(), q, method="inverted_cdf")
    if expected[0] == expected[1]:
        expected = [losses.min().item(), losses.max().item()]
    np.testing.assert_array_equal(fit.bounds, np.asarray(expected, dtype=np.float32))


def large_inputs() -> dict[str, torch.Tensor]:
    """Big enough for the sampled quantile bracket (n >= 8 * 2^16), including inputs that defeat it."""
    n = 600_001
    periodic = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 2.0
    periodic[:: n // 2 ** 16] = 0.0  # the strided sample sees only zeros
    return {"shuffled": bimodal(n, 0.3), "sorted": bimodal(n, 0.3).sort().values,
            "ties": torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(1)).float(),
            "periodic": periodic}


@pytest.mark.parametrize("name", ["shuffled", "sorted", "ties", "periodic"])
def test_sampled_quantile_bracket_is_exact(name, caplog):
    losses = large_inputs()[name]
    with caplog.at_level("DEBUG", logger="nlip_ds.noise.gmm"):
        fit = fit_gmm(losses)
    expected = np.quantile(losses.numpy(), (0.005, 0.995), method="inverted_cdf")
    np.testing.assert_array_equal(fit.bounds, expected)
    assert ("bracket missed" in caplog.text) == (name == "periodic")


def test_two_calls_identical():
    losses = bimodal(100_000, 0.3)
    a, b = fit_gmm(losses), fit_gmm(losses)
    assert a == b and torch.equal(a.posterior, b.posterior)


def test_thread_count_does_not_change_the_fit():
    losses = bimodal(300_001, 0.3)  # large enough for torch to split work across threads
    threads = torch.get_num_threads()
    try:
        fits = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            fits.append(fit_gmm(losses))
    finally:
        torch.set_num_threads(threads)
    for fit in fits[1:]:
        assert fit.n_iter == fits[0].n_iter
        assert (fit.posterior - fits[0].posterior).abs().max() < 1e-12
        np.testing.assert_allclose(fit.means, fits[0].means, rtol=0, atol=1e-14)


CHILD = """
import sys, torch
from nlip_ds.noise.gmm import fit_gmm
torch.set_num_threads(int(sys.argv[1]))
torch.save(fit_gmm(torch.load(sys.argv[2])).posterior, sys.argv[3])
"""


def test_bitwise_identical_in_another_process(tmp_path):
    losses = bimodal(200_000, 0.3)
    torch.save(losses, tmp_path / "losses.pt")
    threads = torch.get_num_threads()
    repo = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", CHILD, str(threads), str(tmp_path / "losses.pt"),
                    str(tmp_path / "post.pt")], check=True, env={**os.environ, "PYTHONPATH": repo})
    assert torch.equal(torch.load(tmp_path / "post.pt"), fit_gmm(losses).posterior)


def test_input_order_does_not_matter_beyond_rounding():
    losses = bimodal(50_000, 0.3)
    perm = torch.randperm(losses.numel(), generator=torch.Generator().manual_seed(0))
    a, b = fit_gmm(losses), fit_gmm(losses[perm])
    assert (a.posterior[perm] - b.posterior).abs().max() < 1e-10


def test_outliers_do_not_stretch_the_scale():
    losses = bimodal(20_000, 0.3)
    clean_fit = fit_gmm(losses)
    spiked = losses.clone()
    spiked[:5] = torch.tensor([1e6, 1e8, 5e4, 1e7, 3e5])
    fit = fit_gmm(spiked)
    assert fit.bounds[1] < 20.0
    assert abs(fit.noise_rate - clean_fit.noise_rate) < 0.01
    np.testing.assert_allclose(fit.means, clean_fit.means, atol=0.02)
    assert (fit.posterior[:5] > 0.99).all()


def test_all_equal_losses_give_a_clean_degenerate_fit():
    fit = fit_gmm(torch.full((100,), 2.5))
    assert fit.noise_rate == 0.0 and fit.n_iter == 0 and fit.converged
    assert torch.equal(fit.posterior, torch.zeros(100, dtype=torch.float64))
    assert torch.equal(fit.noise_probability(torch.tensor([0.0, 2.5, 100.0])), torch.zeros(3, dtype=torch.float64))


def test_mostly_tied_losses_fall_back_to_the_full_range():
    losses = torch.cat([torch.full((995,), 1.0), torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0])])
    fit = fit_gmm(losses)
    assert fit.bounds == (1.0, 9.0)
    assert (fit.posterior[:995] < 0.01).all() and (fit.posterior[995:] > 0.99).all()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9])
def test_tiny_inputs(n):
    fit = fit_gmm(torch.arange(n, dtype=torch.float32) ** 2)
    assert fit.posterior.shape == (n,)
    assert torch.isfinite(fit.posterior).all() and (fit.posterior >= 0).all() and (fit.posterior <= 1).all()
    assert math.isfinite(fit.log_likelihood)
    if n >= 2:  # the largest loss is the most likely to be noisy
        assert fit.posterior[-1] == fit.posterior.max()


def test_non_finite_losses_are_dropped_and_get_the_prior():
    losses = bimodal(10_000, 0.3)
    bad = torch.tensor([3, 50, 999])
    dirty = losses.clone()
    dirty[bad] = torch.tensor([math.nan, math.inf, -math.inf])
    keep = torch.ones(losses.numel(), dtype=torch.bool)
    keep[bad] = False
    fit, reference = fit_gmm(dirty), fit_gmm(losses[keep])
    assert fit.n_dropped == 3 and fit.n_samples == losses.numel() - 3
    assert torch.equal(fit.posterior[keep], reference.posterior)
    assert torch.equal(fit.posterior[bad], torch.full((3,), fit.noise_rate, dtype=torch.float64))
    assert torch.equal(fit.noise_probability(dirty), fit.posterior)


@pytest.mark.parametrize("losses,message", [
    (torch.empty(0), "empty"),
    (torch.full((4,), math.nan), "non-finite"),
    (torch.arange(5), "floating-point"),
])
def test_bad_inputs_raise(losses, message):
    with pytest.raises(ValueError, match=message):
        fit_gmm(losses)


@pytest.mark.parametrize("kwargs", [{"clip_quantiles": (0.9, 0.1)}, {"reg_covar": 0.0}, {"tol": -1.0},
                                    {"max_iter": 0}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        fit_gmm(bimodal(100, 0.3), **kwargs)


def test_noise_probability_reproduces_the_posterior():
    losses = bimodal(30_000, 0.3)
    fit = fit_gmm(losses)
    assert torch.equal(fit.noise_probability(losses), fit.posterior)
    assert torch.equal(fit.noise_probability(losses.double().reshape(100, 300)), fit.posterior)


def test_max_iter_reached_is_reported():
    fit = fit_gmm(bimodal(5_000, 0.3), tol=1e-12, max_iter=1)
    assert fit.n_iter == 1 and not fit.converged


def test_state_dict_round_trip():
    losses = bimodal(10_000, 0.3)
    fit = fit_gmm(losses)
    buffer = io.BytesIO()
    torch.save(fit.state_dict(), buffer)
    buffer.seek(0)
    restored = GMMFit.from_state_dict(torch.load(buffer, weights_only=True))
    assert restored == fit and restored.posterior is None
    assert torch.equal(restored.noise_probability(losses), fit.posterior)


def test_component_densities_integrate_to_the_weights():
    fit = fit_gmm(bimodal(10_000, 0.3))
    grid = torch.linspace(-2.0, 3.0, 50_001, dtype=torch.float64)
    mass = torch.trapezoid(fit.component_densities(grid), grid, dim=0)
    np.testing.assert_allclose(mass.numpy(), fit.weights, atol=1e-6)


DIGITS = Path(__file__).parent / "data" / "digits_shuffle50_epoch6_losses.pt"


def digits_losses() -> tuple[torch.Tensor, torch.Tensor]:
    """Real per-sample losses with ground truth: a refit of a CLIP-loss run on the digits at 50% shuffled
    captions (the file's "source" says which), 1,197 pairs, half of them noisy."""
    record = torch.load(DIGITS, weights_only=True)
    return record["losses"], record["flags"]


def test_the_median_start_finds_the_pairs_near_the_chance_loss():
    """The shuffled pairs' losses sit near ln(32) = 3.47 with a tail above. Split at the middle of the range, EM
    gives the noisy component the tail alone; split at the median, the near-chance pairs too, at an equal
    likelihood (docs/noise.md, "Rank assignment")."""
    losses, _ = digits_losses()
    midrange, median = fit_gmm(losses, tol=1e-4), fit_gmm(losses, tol=1e-4, init="median")
    assert midrange.noise_rate < 0.2 and 0.3 < median.noise_rate < 0.5  # the truth: 0.5
    assert abs(median.log_likelihood - midrange.log_likelihood) < 0.005 * abs(midrange.log_likelihood)


def test_median_start_matches_sklearn_from_the_same_split():
    losses = CASES["noise30"]
    fit = fit_gmm(losses, tol=1e-9, max_iter=1000, init="median")
    x = fit.normalize(losses).numpy()
    expected, gm = sklearn_posterior(x, 1e-9, 1000, split=float(np.quantile(x, 0.5, method="inverted_cdf")))
    assert fit.n_iter == gm.n_iter_
    assert np.abs(fit.posterior.numpy() - expected).max() < 1e-3


@pytest.mark.parametrize("init", ["midrange", "median"])
def test_rank_epsilon_calls_the_rate_times_n_highest_losses_noisy(init):
    losses, flags = digits_losses()
    soft, hard = fit_gmm(losses, tol=1e-4, init=init), fit_gmm(losses, tol=1e-4, init=init, epsilon="rank")
    assert (hard.means, hard.variances, hard.weights) == (soft.means, soft.variances, soft.weights)
    assert set(hard.posterior.unique().tolist()) <= {0.0, 1.0}
    noisy = hard.posterior == 1
    assert abs(int(noisy.sum()) - hard.noise_rate * losses.numel()) <= 1  # no ties among these losses
    assert losses[noisy].min() > losses[~noisy].max()  # the highest ones
    if init == "median":  # the digits' run: most of the shuffled pairs out, few clean ones
        recall, dropped_clean = float(noisy[flags == 1].double().mean()), float(noisy[flags == 0].double().mean())
        assert recall > 0.6 and dropped_clean < 0.2, (recall, dropped_clean)


def test_rank_epsilon_keeps_non_finite_losses_at_the_prior():
    losses = bimodal(2_000, 0.3)
    losses[[3, 500]] = torch.tensor([math.nan, math.inf])
    fit = fit_gmm(losses, epsilon="rank")
    assert fit.posterior[3] == fit.posterior[500] == fit.noise_rate
    finite = torch.isfinite(losses)
    assert set(fit.posterior[finite].unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("kwargs,name", [({"init": "mean"}, "init"), ({"epsilon": "hard"}, "epsilon")])
def test_unknown_init_or_epsilon_is_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fit_gmm(bimodal(100, 0.3), **kwargs)
