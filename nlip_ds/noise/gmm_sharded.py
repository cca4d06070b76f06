"""The mixture fit of gmm.py over losses spread across ranks: what a sharded noise state refits with.

With noise.state=sharded every rank's bank holds only the losses of its own sample ids (docs/noise.md, "Sharded
state"), so no rank holds the array that `fit_gmm` takes. `fit_gmm_sharded` runs the same estimator on the
shards and every rank gets the same mixture; each keeps the posterior of its own losses only.

- Robust bounds: the same order statistics as fit_gmm's (inverted-CDF quantiles), found exactly by a radix
  select over the losses' bit patterns. A float maps to an integer key of the same order; a global fixed-bin
  histogram of the key's top 16 bits (one all-reduce of 2^16 counts) names the bin that holds the k-th smallest
  loss, a histogram of the next 16 bits of the keys in that bin names the next, and so on: two levels pin a
  float32 loss (four a float64), exactly, whatever the partition. A value histogram over [min, max] could only
  bracket a quantile; the bit-pattern bins make the last level a single value.
- EM starts from fit_gmm's split (`init`; the median by the same radix select) and, with `epsilon="rank"`,
  ends with fit_gmm's threshold, the (1 - ρ) quantile, selected the same way.
- EM: per iteration one pass over each shard yields the sufficient statistics (softplus sum of the
  log-likelihood, responsibility sums Σr, Σr·x, Σr·x²; the data moments Σx, Σx² once), each summed in fit_gmm's
  fixed order; the shards' partial sums are combined with math.fsum, which rounds exactly, so their order and
  number do not matter. One shard gives fit_gmm's fit bit for bit; any partition gives sums within a few ulps
  of fit_gmm's and posteriors within far less than 1e-9 (tests/test_gmm_sharded.py).

Communication per refit: three all-reduces of 2^16 int64 counts for the bounds of float32 losses (both quantiles
share the first level), one all-gather of a (min, max) pair per rank, and per EM iteration one all-gather of 4
float64 per rank. Memory: fit_gmm's 24 bytes per sample of work buffers, over the local samples only.

In training a process holds one shard (its own). A benchmark may hold many (one per simulated rank) with
`keep_buffers=False`: the normalized losses are then rebuilt in one reused buffer at every pass, so the simulated
cluster costs the losses themselves plus one shard's work buffers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from nlip_ds.distributed import all_gather_tensor, all_reduce_sum, get_world_size
from nlip_ds.noise.gmm import (GMMFit, Pair, _check_args, _Data, _degenerate_fit, _epsilon_into, _fixed_order_sum,
                               _mean_log_likelihood, _normalize, _Params, _params_from_sums, _posterior_into,
                               _responsibility_sums, quantile_rank, split_point)

logger = logging.getLogger(__name__)

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS


@dataclass
class ShardedFit:
    """A fit over shards: the mixture (identical on every rank) and the posterior of each local shard."""

    fit: GMMFit  # posterior None: the posteriors are per shard
    posteriors: list[torch.Tensor | None]  # (n_s,) float64 per local shard, in the shard's order; None if not kept


class _Reducer:
    """Sums over this process's shards and every process: exactly rounded floats, exact counts."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.world = get_world_size()

    def floats(self, per_shard: list[Sequence[float]]) -> list[float]:
        """(shards, m) partial sums -> m sums over all shards of all ranks (math.fsum: order-free)."""
        local = torch.tensor(per_shard, dtype=torch.float64).to(self.device)
        rows = all_gather_tensor(local).cpu() if self.world > 1 else local.cpu()
        return [math.fsum(column) for column in rows.T.tolist()]

    def counts(self, local: torch.Tensor) -> torch.Tensor:
        """int64 counts summed over ranks (local: already summed over this process's shards)."""
        return all_reduce_sum(local.to(self.device)).cpu() if self.world > 1 else local

    def extremes(self, per_shard: list[Pair]) -> Pair:
        local = torch.tensor(per_shard, dtype=torch.float64).to(self.device)
        rows = all_gather_tensor(local).cpu() if self.world > 1 else local.cpu()
        return float(rows[:, 0].min()), float(rows[:, 1].max())


# ------------------------------------------------------------------------------------------ exact quantiles


def _order_keys(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Floats -> (int64 keys whose unsigned order over `bits` bits is the floats' order, bits)."""
    if values.dtype == torch.float64:
        raw = values.view(torch.int64)
        flipped = torch.where(raw < 0, raw ^ 0x7FFFFFFFFFFFFFFF, raw)  # negatives: larger magnitude, smaller key
        return flipped ^ torch.iinfo(torch.int64).min, 64  # sign bit toggled: unsigned order
    raw = values.to(torch.float32).view(torch.int32).long()
    return torch.where(raw < 0, raw ^ 0x7FFFFFFF, raw) + (1 << 31), 32


def _key_value(key: int, bits: int) -> float:
    """Inverse of _order_keys for one key."""
    if bits == 64:
        signed = key - (1 << 64) if key >= 1 << 63 else key
        signed ^= -(1 << 63)
        raw = signed ^ 0x7FFFFFFFFFFFFFFF if signed < 0 else signed
        return float(torch.tensor([raw], dtype=torch.int64).view(torch.float64))
    signed = key - (1 << 31)
    raw = signed ^ 0x7FFFFFFF if signed < 0 else signed
    return float(torch.tensor([raw], dtype=torch.int32).view(torch.float32))


def _digit_histogram(keys: torch.Tensor, bits: int, level: int, prefix: int | None) -> torch.Tensor:
    """Counts (2^16,) of the level-th 16-bit digit of the keys whose higher digits equal `prefix`."""
    shift = bits - _DIGIT_BITS * (level + 1)
    if prefix is not None:
        keys = keys[((keys >> (shift + _DIGIT_BITS)) & ((1 << (bits - shift - _DIGIT_BITS)) - 1)) == prefix]
    return torch.bincount((keys >> shift) & (_BINS - 1), minlength=_BINS)


def _select_keys(shards: list[torch.Tensor], ranks: list[int], reducer: _Reducer) -> list[float]:
    """The ranks[i]-th smallest (1-based) of all shards' values, exactly, by a 16-bit-per-level radix select.
    Every rank passes shards of one dtype (float64, or anything float32 holds exactly). The keys (8 bytes per
    value) are built again at each level, one shard at a time, so that they never exist for all shards at once."""
    bits = 64 if shards[0].dtype == torch.float64 else 32
    prefixes: list[int | None] = [None] * len(ranks)
    remaining = list(ranks)
    for level in range(bits // _DIGIT_BITS):
        distinct = sorted(set(prefixes), key=lambda p: -1 if p is None else p)
        local = torch.zeros(len(distinct), _BINS, dtype=torch.long)
        for shard in shards:
            keys, _ = _order_keys(shard)
            for row, prefix in enumerate(distinct):
                local[row] += _digit_histogram(keys, bits, level, prefix)
            del keys
        hists = dict(zip(distinct, reducer.counts(local)))  # prefix -> (2^16,) global counts
        for i, prefix in enumerate(prefixes):
            cum = torch.cumsum(hists[prefix], 0)
            digit = int(torch.searchsorted(cum, torch.tensor(remaining[i])))  # first bin with cum >= rank
            remaining[i] -= int(cum[digit - 1]) if digit else 0
            prefixes[i] = (0 if prefix is None else prefix << _DIGIT_BITS) | digit
    return [_key_value(p, bits) for p in prefixes]


def _robust_bounds(shards: list[torch.Tensor], n: int, clip_quantiles: Pair, reducer: _Reducer) -> Pair:
    """fit_gmm's bounds: the inverted-CDF quantiles over all shards (min/max when they tie)."""
    lo, hi = _select_keys(shards, [quantile_rank(q, n) for q in clip_quantiles], reducer)
    if hi > lo:
        return lo, hi
    extremes = [(float(v.min()), float(v.max())) if v.numel() else (math.inf, -math.inf) for v in shards]
    return reducer.extremes(extremes)


# -------------------------------------------------------------------------------------------------- EM


class _Shard:
    """One shard's finite losses and, while the fit runs, its normalized losses and work buffers."""

    def __init__(self, raw: torch.Tensor):
        raw = torch.as_tensor(raw).detach().reshape(-1).cpu()
        if not raw.is_floating_point():
            raise ValueError(f"fit_gmm_sharded: losses must be floating-point tensors, got {raw.dtype}")
        finite = torch.isfinite(raw)
        self.all_finite = bool(finite.all())
        self.finite = None if self.all_finite else finite  # 1 byte per loss, kept only when needed
        self.values = raw if self.all_finite else raw[finite]
        self.n_raw = raw.numel()
        self.data: _Data | None = None

    def normalized(self, bounds: Pair, scratch: _Data | None) -> _Data:
        """The shard's _Data: kept across passes, or rebuilt into `scratch` (sized for the largest shard)."""
        if self.data is not None:
            return self.data
        n = self.values.numel()
        x = scratch.x[:n]
        x.copy_(self.values).sub_(bounds[0]).div_(bounds[1] - bounds[0]).clamp_(0.0, 1.0)
        return _Data(x, 0.0, 0.0, scratch.z[:n], scratch.resp[:n])

    def posterior(self, resp: torch.Tensor, prior: float) -> torch.Tensor:
        resp = resp.clone() if self.data is None else resp
        if self.all_finite:
            return resp
        out = torch.full((self.n_raw,), prior, dtype=torch.float64)
        out[self.finite] = resp
        return out


class _ShardedEM:
    """EM over shards; every statistic is a sum of per-shard fixed-order sums, combined by the reducer."""

    def __init__(self, shards: list[_Shard], bounds: Pair, split: float, keep_buffers: bool, reducer: _Reducer):
        self.shards, self.bounds, self.split, self.reducer = shards, bounds, split, reducer
        self.scratch = None
        if not keep_buffers:
            largest = max(s.values.numel() for s in shards)
            x, z, resp = (torch.empty(largest, dtype=torch.float64) for _ in range(3))
            self.scratch = _Data(x, 0.0, 0.0, z, resp)
        moments = []
        for shard in shards:
            if keep_buffers:
                shard.data = _Data.build(_normalize(shard.values, bounds))  # Σx and Σx² come with it
                moments.append((shard.data.sum_x, shard.data.sum_xx))
            else:
                d = shard.normalized(bounds, self.scratch)
                moments.append((_fixed_order_sum(d.x), _fixed_order_sum(torch.mul(d.x, d.x, out=d.z))))
        self.sum_x, self.sum_xx = reducer.floats(moments)

    def _pass(self, params: _Params | None, shard: _Shard) -> tuple[float, float, float, float]:
        """(Σ softplus of the log odds, Σr, Σr·x, Σr·x²) of one shard; the first hard split when params is None.
        Leaves the responsibilities in the shard's resp buffer."""
        d = shard.normalized(self.bounds, self.scratch)
        if params is None:
            d.resp.copy_(d.x >= self.split)
            softplus = 0.0
        else:
            _posterior_into(d.x, params, d.z, d.resp)
            softplus = _fixed_order_sum(torch.logaddexp(d.z, torch.zeros((), dtype=d.z.dtype), out=d.z))
        return (softplus, *_responsibility_sums(d))

    def statistics(self, params: _Params | None) -> list[float]:
        return self.reducer.floats([self._pass(params, shard) for shard in self.shards])

    def run(self, n: int, reg_covar: float, tol: float, max_iter: int) -> tuple[_Params, int, bool]:
        """fit_gmm's _run_em over the shards (n: the global number of finite losses)."""
        _, *sums = self.statistics(None)
        params = _params_from_sums(n, self.sum_x, self.sum_xx, *sums, reg_covar)
        previous = -math.inf
        for n_iter in range(1, max_iter + 1):
            softplus, *sums = self.statistics(params)
            log_likelihood = _mean_log_likelihood(params, n, self.sum_x, self.sum_xx, softplus)
            params = _params_from_sums(n, self.sum_x, self.sum_xx, *sums, reg_covar)
            if abs(log_likelihood - previous) < tol:
                return params, n_iter, True
            previous = log_likelihood
        return params, max_iter, False

    def final(self, params: _Params, n: int, prior_of: float, keep_posterior: bool, threshold: float | None
              ) -> tuple[float, list[torch.Tensor | None]]:
        """The mean log-likelihood under the final parameters and each shard's ε: the posterior, or with a rank
        `threshold` 1 above it and 0 elsewhere."""
        partial, posteriors = [], []
        for shard in self.shards:
            partial.append(self._pass(params, shard))
            d = shard.normalized(self.bounds, self.scratch)
            if threshold is None:
                _epsilon_into(d.x, params, d.z, d.resp)
            else:
                d.resp.copy_(shard.values > threshold)
            posteriors.append(shard.posterior(d.resp, prior_of) if keep_posterior else None)
        softplus = self.reducer.floats(partial)[0]
        return _mean_log_likelihood(params, n, self.sum_x, self.sum_xx, softplus), posteriors


def fit_gmm_sharded(shards: Sequence[torch.Tensor], *, reg_covar: float = 5e-4, tol: float = 1e-2,
                    max_iter: int = 100, clip_quantiles: Pair = (0.005, 0.995), device: torch.device | str = "cpu",
                    keep_buffers: bool = True, keep_posterior: bool = True, init: str = "midrange",
                    epsilon: str = "posterior") -> ShardedFit:
    """fit_gmm over the concatenation of every rank's shards; collective on every rank.

    shards: this process's (n_s,) losses (one tensor per shard, in any order; every process passes the same
    number of shards). device: where the collectives run (CUDA under NCCL). keep_buffers=False rebuilds the
    normalized losses at every pass instead of keeping 24 bytes per sample (simulations of many ranks);
    keep_posterior=False returns no posteriors (the mixture alone).
    """
    reducer = _Reducer(device)
    parts = [_Shard(s) for s in shards]
    n_raw, n = (int(t) for t in reducer.counts(torch.tensor(
        [sum(p.n_raw for p in parts), sum(p.values.numel() for p in parts)])))
    _check_args(torch.empty(min(n_raw, 1)), reg_covar, tol, max_iter, clip_quantiles, init, epsilon)
    n_dropped = n_raw - n
    if n == 0:
        raise ValueError(f"fit_gmm: all {n_raw} losses are non-finite (NaN or inf)")
    if n_dropped:
        logger.warning("fit_gmm_sharded: dropped %d non-finite losses of %d", n_dropped, n_raw)
    values = [p.values for p in parts]
    bounds = _robust_bounds(values, n, clip_quantiles, reducer)
    if bounds[0] == bounds[1]:
        fit = _degenerate_fit(bounds[0], n, n_dropped, reg_covar)
        zeros = [torch.zeros(p.n_raw, dtype=torch.float64) if keep_posterior else None for p in parts]
        return ShardedFit(fit, zeros)  # ε = 0 everywhere, as fit_gmm's degenerate fit
    median = _select_keys(values, [quantile_rank(0.5, n)], reducer)[0] if init == "median" else None
    em = _ShardedEM(parts, bounds, split_point(init, median, bounds), keep_buffers, reducer)
    params, n_iter, converged = em.run(n, reg_covar, tol, max_iter)
    params = params.ordered()
    if not converged:
        logger.warning("fit_gmm_sharded: EM did not converge in %d iterations (tol %g)", max_iter, tol)
    threshold = None
    if epsilon == "rank":
        threshold = _select_keys(values, [quantile_rank(1.0 - params.weights[1], n)], reducer)[0]
    log_likelihood, posteriors = em.final(params, n, params.weights[1], keep_posterior, threshold)
    fit = GMMFit(params.means, params.variances, params.weights, bounds, n_iter, converged, log_likelihood, n,
                 n_dropped)
    for part in parts:
        part.data = None
    return ShardedFit(replace(fit, posterior=None), posteriors)

