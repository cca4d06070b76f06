"""Two-component 1-D Gaussian mixture over per-sample losses: NLIP's noise estimator.

Why a hand-written EM rather than scikit-learn: every rank refits once per epoch over every sample seen (tens of
millions of losses), and every rank must get the same ε bit for bit, whatever the world size. So the fit

- runs in float64 on the CPU, allocates its work buffers once and does every pass over the data in place;
- sums in an order fixed by the input length alone (row sums over fixed `_CHUNK`-element blocks, one thread per
  block, combined with math.fsum): a plain `torch.sum` over a large CPU tensor splits the work by thread count,
  so it rounds differently with a different number of threads;
- starts from a deterministic initialization, never from random restarts.

The estimator (docs/method.md, "Noise estimator"), step by step:

1. Non-finite losses are left out of the fit and counted (`GMMFit.n_dropped`); their posterior is the prior
   weight of the noisy component, i.e. "no evidence either way". An input with no finite loss raises ValueError.
2. Robust min-max normalization: lo and hi are the `clip_quantiles` (0.5th and 99.5th percentiles) under the
   inverted-CDF definition (numpy's `method="inverted_cdf"`: an order statistic, no interpolation), and a loss l
   maps to clip((l - lo) / (hi - lo), 0, 1). If lo == hi (over 99% tied losses) the full min/max range is used;
   if min == max too (all losses equal) the fit is degenerate: one component, noise rate 0, posterior 0.
3. Initialization: one M-step on a hard split of the normalized losses (component 0 below, component 1 at or
   above the split point). `init="midrange"` splits at 0.5, the midpoint of the robust range: both sides are
   non-empty because 0 and 1 are attained. `init="median"` splits at the losses' median (the inverted-CDF 0.5
   quantile, normalized). The two start EM in different basins when a long tail stretches the range: on the
   digits at 50% shuffled captions the midrange start mostly ends with a noisy component on the tail (rate
   0.10-0.43) and the median start with one that holds the pairs near the chance loss too (rate 0.25-0.45, the
   truth 0.5), at about the same likelihood (docs/noise.md, "Rank assignment").
4. EM as scikit-learn's GaussianMixture(covariance_type="full") does it in 1-D: reg_covar added to each
   variance, stop after the first iteration whose mean log-likelihood changed by less than `tol` (or after
   `max_iter`), then one last E-step under the final parameters gives the posterior.
5. Component 1 is the high-mean one (swapped if EM crossed them): its weight is the noise rate ρ. With
   `epsilon="posterior"` its posterior is ε, made non-decreasing in the loss (`_epsilon_into`): a Gaussian's
   tail must not call the highest losses clean. With `epsilon="rank"` ε is 1 for the losses above the
   inverted-CDF (1 - ρ) quantile and 0 for the rest: the ρ·N highest losses are called noisy, whatever the
   components' shapes say about each one.

Speed: the log posterior odds of component 1 are a quadratic a·x² + b·x + c in the normalized loss x, so an
E-step is a few in-place passes (the quadratic, a sigmoid, a logaddexp) and an M-step three fixed-order sums.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import torch

from nlip_ds.choices import GMM_EPSILONS as EPSILONS, GMM_INITS as INITS  # steps 3 and 5 below

logger = logging.getLogger(__name__)

# Summation block. Below torch's parallel grain size (32768 elements), so each block is reduced by one thread
# and the rounding depends on the data length only, not on the thread count.
_CHUNK = 1 << 14
_SAMPLE = 1 << 16  # strided sample that brackets a quantile before the exact selection
_EPS = float(torch.finfo(torch.float64).eps)
_LOG_2PI = math.log(2.0 * math.pi)

Pair = tuple[float, float]


def _fixed_order_sum(t: torch.Tensor) -> float:
    """Sum of a contiguous 1-D float64 tensor, rounded identically for every thread count."""
    m = t.numel() // _CHUNK
    blocks = t[: m * _CHUNK].view(m, _CHUNK).sum(dim=1)  # (m,), one thread per row
    tail = t[m * _CHUNK:].sum()  # fewer than _CHUNK elements: serial
    return math.fsum([*blocks.tolist(), tail.item()])


def _log(w: float) -> float:
    return math.log(w) if w > 0.0 else -math.inf


@dataclass(frozen=True)
class _Params:
    """Mixture parameters on the normalized scale; index 1 is the noisy (high-mean) component."""

    means: Pair
    variances: Pair
    weights: Pair

    def log_odds_coefficients(self) -> tuple[float, float, float]:
        """(a, b, c) with log w1·N(x | mu1, var1) - log w0·N(x | mu0, var0) = a·x² + b·x + c."""
        (m0, m1), (v0, v1), (w0, w1) = self.means, self.variances, self.weights
        a = 0.5 / v0 - 0.5 / v1
        b = m1 / v1 - m0 / v0
        c = _log(w1) - _log(w0) - 0.5 * math.log(v1 / v0) + 0.5 * m0 * m0 / v0 - 0.5 * m1 * m1 / v1
        return a, b, c

    def ordered(self) -> "_Params":
        if self.means[0] <= self.means[1]:
            return self
        return _Params(self.means[::-1], self.variances[::-1], self.weights[::-1])


@dataclass
class _Data:
    """The normalized losses, their fixed-order moments and the EM work buffers (all (n,) float64)."""

    x: torch.Tensor
    sum_x: float
    sum_xx: float
    z: torch.Tensor  # log posterior odds, then softplus of them, then M-step products
    resp: torch.Tensor  # posterior of component 1

    @classmethod
    def build(cls, x: torch.Tensor) -> "_Data":
        z = torch.mul(x, x, out=torch.empty_like(x))
        return cls(x, _fixed_order_sum(x), _fixed_order_sum(z), z, torch.empty_like(x))

    @property
    def n(self) -> int:
        return self.x.numel()


def _posterior_into(x: torch.Tensor, params: _Params, z: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    """Posterior of component 1 into `resp`; leaves the log odds in `z`."""
    a, b, c = params.log_odds_coefficients()
    torch.mul(x, a, out=z).add_(b).mul_(x).add_(c)  # (n,) Horner: (a·x + b)·x + c
    return torch.sigmoid(z, out=resp)


def _epsilon_into(x: torch.Tensor, params: _Params, z: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    """ε into `resp`: the posterior of component 1, made non-decreasing in the loss.

    With unequal variances the log odds a·x² + b·x + c turn back beyond their vertex x* = -b / (2a): when the
    noisy component is the narrower one (a < 0), the highest losses fall in the clean component's wider tail and
    would be called clean; when it is the wider one (a > 0), the lowest losses would be called noisy. Measured on
    the digits at 50% shuffled captions, that turn took the AUC of ε down to 0.45-0.52 at epochs 3-8 while the
    losses themselves ranked the pairs at AUC 0.64-0.78 (docs/noise.md, "ε rises with the loss"). So x is
    clamped to the monotone side of the vertex first: a pair never gets a lower ε than a pair with a smaller
    loss. Where the mixture is monotone over [0, 1] this is the plain posterior."""
    a, b, _ = params.log_odds_coefficients()
    if a < 0.0:
        torch.clamp(x, max=-b / (2.0 * a), out=resp)
    elif a > 0.0:
        torch.clamp(x, min=-b / (2.0 * a), out=resp)
    else:
        resp.copy_(x)
    return _posterior_into(resp, params, z, resp)  # reads resp before the sigmoid writes it


def _e_step(data: _Data, params: _Params) -> float:
    """Posterior of component 1 into data.resp; returns the mean log-likelihood under `params`."""
    _posterior_into(data.x, params, data.z, data.resp)
    # log p(x) = log w0·N0(x) + softplus(log odds); the first term's mean needs only the data moments.
    softplus = torch.logaddexp(data.z, torch.zeros((), dtype=data.z.dtype), out=data.z)
    return _mean_log_likelihood(params, data.n, data.sum_x, data.sum_xx, _fixed_order_sum(softplus))


def _mean_log_likelihood(params: _Params, n: int, sum_x: float, sum_xx: float, sum_softplus: float) -> float:
    """Mean log-likelihood from the data moments and the sum of softplus(log odds) under `params`."""
    m0, v0, w0 = params.means[0], params.variances[0], params.weights[0]
    mean_sq_dev0 = (sum_xx - 2.0 * m0 * sum_x) / n + m0 * m0
    mean_log_first = _log(w0) - 0.5 * (_LOG_2PI + math.log(v0)) - 0.5 * mean_sq_dev0 / v0
    return mean_log_first + sum_softplus / n


def _responsibility_sums(data: _Data) -> tuple[float, float, float]:
    """(sum r, sum r·x, sum r·x²) of the responsibilities in data.resp (uses data.z as scratch)."""
    n1_raw = _fixed_order_sum(data.resp)
    rx = torch.mul(data.resp, data.x, out=data.z)
    s1 = _fixed_order_sum(rx)
    return n1_raw, s1, _fixed_order_sum(rx.mul_(data.x))


def _m_step(data: _Data, reg_covar: float) -> _Params:
    """Weights, means and variances from the responsibilities in data.resp (scikit-learn's M-step)."""
    return _params_from_sums(data.n, data.sum_x, data.sum_xx, *_responsibility_sums(data), reg_covar)


def _params_from_sums(n: int, sum_x: float, sum_xx: float, n1_raw: float, s1: float, q1: float,
                      reg_covar: float) -> _Params:
    """scikit-learn's M-step from the sufficient statistics: the data moments and the responsibility sums."""
    nk = (n - n1_raw + 10 * _EPS, n1_raw + 10 * _EPS)
    sums, squares = (sum_x - s1, s1), (sum_xx - q1, q1)
    means = tuple(s / k for s, k in zip(sums, nk))
    variances = tuple(max(q / k - m * m, 0.0) + reg_covar for q, m, k in zip(squares, means, nk))
    weights = tuple(k / (nk[0] + nk[1]) for k in nk)
    return _Params(means, variances, weights)


def _run_em(data: _Data, split: float, reg_covar: float, tol: float, max_iter: int) -> tuple[_Params, int, bool]:
    """EM from the hard split at `split` (normalized); returns the final parameters, the iteration count and
    convergence."""
    data.resp.copy_(data.x >= split)
    params = _m_step(data, reg_covar)
    previous = -math.inf
    for n_iter in range(1, max_iter + 1):
        log_likelihood = _e_step(data, params)
        params = _m_step(data, reg_covar)
        if abs(log_likelihood - previous) < tol:
            return params, n_iter, True
        previous = log_likelihood
    return params, max_iter, False


def _kth_smallest(values: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) of (n,) values, exactly.

    A full kthvalue copies and partitions all n values (1.5 s at 100M). Instead, bracket the answer between two
    order statistics of a strided sample (about 4 standard deviations of the sample rank either side), count
    the values below the bracket and select inside it: a few cheap passes. If the bracket misses (a sample
    unrepresentative of the data, e.g. periodic input), fall back to the full kthvalue.
    """
    n = values.numel()
    stride = n // _SAMPLE
    if stride < 8:
        return float(values.kthvalue(k).values)
    sample = values[::stride].sort().values  # (m,)
    m, q = sample.numel(), k / n
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo, hi = (sample[min(max(int(q * m + d), 0), m - 1)] for d in (-margin, margin))
    below = int((values < lo).sum())
    inside = values[(values >= lo) & (values <= hi)]  # (about 2·margin·stride,)
    if below < k <= below + inside.numel():
        return float(inside.kthvalue(k - below).values)
    logger.debug("fit_gmm: quantile bracket missed (k=%d of %d); full kthvalue", k, n)
    return float(values.kthvalue(k).values)


def _order_statistic(values: torch.Tensor, q: float) -> float:
    """The q-quantile under the inverted-CDF definition: the ceil(q·n)-th smallest value (at least the 1st)."""
    return _kth_smallest(values, quantile_rank(q, values.numel()))


def quantile_rank(q: float, n: int) -> int:
    """The 1-based rank of the inverted-CDF q-quantile among n values: ceil(q·n), at least 1."""
    return min(max(math.ceil(q * n), 1), n)


def split_point(init: str, median: float | None, bounds: Pair) -> float:
    """EM's first split on the normalized scale: 0.5 (midrange) or the normalized raw `median` (median)."""
    if init == "midrange":
        return 0.5
    return float(_normalize(torch.tensor([median], dtype=torch.float64), bounds)[0])


def _robust_bounds(values: torch.Tensor, clip_quantiles: Pair) -> Pair:
    """(lo, hi) of the normalization; the full range when the quantiles tie."""
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()  # kthvalue on half precision is slow and order-preserving casts lose nothing
    lo, hi = (_order_statistic(values, q) for q in clip_quantiles)
    if hi > lo:
        return lo, hi
    lo_t, hi_t = torch.aminmax(values)
    return float(lo_t), float(hi_t)


def _normalize(values: torch.Tensor, bounds: Pair) -> torch.Tensor:
    """clip((l - lo) / (hi - lo), 0, 1) as a new (n,) float64 CPU tensor (span 1 when lo == hi)."""
    lo, hi = bounds
    x = values.detach().to(device="cpu", dtype=torch.float64, copy=True).reshape(-1)
    return x.sub_(lo).div_(hi - lo if hi > lo else 1.0).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class GMMFit:
    """A fitted two-component mixture of normalized losses. Component 1 (high mean) is the noisy one."""

    means: Pair  # on the normalized [0, 1] scale
    variances: Pair  # reg_covar included
    weights: Pair
    bounds: Pair  # (lo, hi): raw-loss normalization bounds
    n_iter: int
    converged: bool
    log_likelihood: float  # mean log-likelihood of the normalized losses under the final parameters
    n_samples: int  # finite losses the fit used
    n_dropped: int  # non-finite losses left out
    # (N,) float64, ε of each input loss in input order; None on a fit restored from a state dict.
    posterior: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def noise_rate(self) -> float:
        return self.weights[1]

    @property
    def separation(self) -> float:
        """|mu1 - mu0| / sqrt(var0 + var1): about 2 or more for a clearly bimodal loss distribution."""
        return abs(self.means[1] - self.means[0]) / math.sqrt(self.variances[0] + self.variances[1])

    def normalize(self, losses: torch.Tensor) -> torch.Tensor:
        """Raw losses (any shape) -> (n,) float64 on the fit's normalized scale."""
        return _normalize(torch.as_tensor(losses), self.bounds)

    def noise_probability(self, losses: torch.Tensor) -> torch.Tensor:
        """The posterior ε (epsilon="posterior") of new raw losses (any shape) -> (n,) float64 CPU; non-finite
        losses get the prior noise rate. A rank assignment is not reproduced: its threshold is not kept."""
        raw = torch.as_tensor(losses).detach().reshape(-1).cpu()
        x = self.normalize(raw)
        params = _Params(self.means, self.variances, self.weights)
        eps = _epsilon_into(x, params, torch.empty_like(x), torch.empty_like(x))
        return torch.where(torch.isfinite(raw), eps, self.noise_rate)

    def component_densities(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted density w_k·N(x | mu_k, var_k) of each component at normalized x (n,) -> (n, 2) float64."""
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, 1)
        mean, var, weight = (torch.tensor(p, dtype=torch.float64)
                             for p in (self.means, self.variances, self.weights))
        return weight * torch.exp(-0.5 * (x - mean) ** 2 / var) / torch.sqrt(2.0 * math.pi * var)

    def state_dict(self) -> dict:
        """Parameters only (ε per sample lives in harmonize.NoiseState); loads with weights_only=True."""
        params = (*self.means, *self.variances, *self.weights, *self.bounds, self.log_likelihood)
        return {"params": torch.tensor(params, dtype=torch.float64), "n_iter": self.n_iter,
                "converged": self.converged, "n_samples": self.n_samples, "n_dropped": self.n_dropped}

    @classmethod
    def from_state_dict(cls, state: dict) -> "GMMFit":
        p = [float(v) for v in state["params"]]
        return cls((p[0], p[1]), (p[2], p[3]), (p[4], p[5]), (p[6], p[7]), int(state["n_iter"]),
                   bool(state["converged"]), p[8], int(state["n_samples"]), int(state["n_dropped"]))


def _degenerate_fit(value: float, n: int, n_dropped: int, reg_covar: float) -> GMMFit:
    """All finite losses are equal: a single clean component, ε = 0."""
    logger.warning("fit_gmm: all %d finite losses equal %g; no noise estimate (ε = 0)", n, value)
    return GMMFit((0.0, 0.0), (reg_covar, reg_covar), (1.0, 0.0), (value, value), 0, True,
                  -0.5 * (_LOG_2PI + math.log(reg_covar)), n, n_dropped)


def _check_args(losses: torch.Tensor, reg_covar: float, tol: float, max_iter: int, clip_quantiles: Pair,
                init: str = "midrange", epsilon: str = "posterior") -> None:
    if init not in INITS or epsilon not in EPSILONS:
        raise ValueError(f"fit_gmm: init must be one of {INITS} and epsilon one of {EPSILONS}, got {init!r} and "
                         f"{epsilon!r}")
    if not losses.is_floating_point():
        raise ValueError(f"fit_gmm: losses must be a floating-point tensor, got {losses.dtype}")
    if losses.numel() == 0:
        raise ValueError("fit_gmm: losses is empty; the noise estimator needs at least one loss")
    if not 0.0 <= clip_quantiles[0] < clip_quantiles[1] <= 1.0:
        raise ValueError(f"fit_gmm: clip_quantiles must satisfy 0 <= lo < hi <= 1, got {clip_quantiles}")
    if reg_covar <= 0.0 or tol <= 0.0 or max_iter < 1:
        raise ValueError(f"fit_gmm: need reg_covar > 0, tol > 0, max_iter >= 1 "
                         f"(got {reg_covar}, {tol}, {max_iter})")


def _finite_part(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the finite losses, their mask or None when all are finite); raises when none is finite."""
    finite = torch.isfinite(raw)
    if bool(finite.all()):
        return raw, None
    n_dropped = raw.numel() - int(finite.sum())
    if n_dropped == raw.numel():
        raise ValueError(f"fit_gmm: all {raw.numel()} losses are non-finite (NaN or inf)")
    logger.warning("fit_gmm: dropped %d non-finite losses of %d", n_dropped, raw.numel())
    return raw[finite], finite


def _full_posterior(resp: torch.Tensor, finite: torch.Tensor | None, prior: float) -> torch.Tensor:
    """Scatter the fitted posteriors back to input order; non-finite entries get the prior."""
    if finite is None:
        return resp
    out = torch.full(finite.shape, prior, dtype=torch.float64)
    out[finite] = resp
    return out


def fit_gmm(losses: torch.Tensor, *, reg_covar: float = 5e-4, tol: float = 1e-2, max_iter: int = 100,
            clip_quantiles: Pair = (0.005, 0.995), init: str = "midrange", epsilon: str = "posterior") -> GMMFit:
    """Fit NLIP's two-component mixture to per-sample losses (N,) and return it with ε per loss (init and
    epsilon: steps 3 and 5 of the module docstring).

    Deterministic: the same losses in the same order give the same fit, bit for bit, on every call and in
    every process with the same torch thread count; across thread counts the result differs by at most a few
    ulps (module docstring). The caller passes losses ordered by sample id (LossBank.losses_since does).
    """
    raw = torch.as_tensor(losses).detach().reshape(-1).cpu()
    _check_args(raw, reg_covar, tol, max_iter, clip_quantiles, init, epsilon)
    values, finite = _finite_part(raw)
    n_dropped = raw.numel() - values.numel()
    bounds = _robust_bounds(values, clip_quantiles)
    if bounds[0] == bounds[1]:
        fit = _degenerate_fit(bounds[0], values.numel(), n_dropped, reg_covar)
        return _with_posterior(fit, torch.zeros(values.numel(), dtype=torch.float64), finite)
    data = _Data.build(_normalize(values, bounds))
    median = _order_statistic(values, 0.5) if init == "median" else None
    params, n_iter, converged = _run_em(data, split_point(init, median, bounds), reg_covar, tol, max_iter)
    params = params.ordered()
    log_likelihood = _e_step(data, params)
    if epsilon == "rank":
        threshold = _order_statistic(values, 1.0 - params.weights[1])
        data.resp.copy_(values > threshold)
    else:
        _epsilon_into(data.x, params, data.z, data.resp)
    if not converged:
        logger.warning("fit_gmm: EM did not converge in %d iterations (tol %g)", max_iter, tol)
    fit = GMMFit(params.means, params.variances, params.weights, bounds, n_iter, converged, log_likelihood,
                 values.numel(), n_dropped)
    return _with_posterior(fit, data.resp, finite)


def _with_posterior(fit: GMMFit, resp: torch.Tensor, finite: torch.Tensor | None) -> GMMFit:
    posterior = _full_posterior(resp, finite, fit.noise_rate)
    logger.debug("fit_gmm: %s", fit)
    return replace(fit, posterior=posterior)
