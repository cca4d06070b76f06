"""Benchmark fit_gmm against scikit-learn's GaussianMixture on the same normalized losses.

Why: the refit runs on every rank once per epoch over every sample seen, so its cost at 10M-100M losses decides
whether the cluster-wide estimator is affordable; the agreement column shows that the speed does not come from
a different algorithm. scikit-learn gets the same data (fit_gmm's normalization), the same initialization
(the hard split at 0.5 that gmm.py documents, passed as weights_init/means_init/precisions_init) and the same
reg_covar/tol/max_iter, so both run the same EM and the posteriors should agree to rounding.

    python benchmarks/bench_gmm.py                        # 10M and 100M
    python benchmarks/bench_gmm.py --sizes 1000000 --repeats 3

scikit-learn is run once per size (it takes minutes at 100M) and skipped, with the reason printed, when its
estimated peak memory (--sklearn-bytes-per-sample, measured on this machine at 10M) exceeds the given share of
the available memory, or when the size exceeds --sklearn-max-size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nlip_ds.noise.gmm import fit_gmm  # noqa: E402

REG_COVAR, TOL, MAX_ITER = 5e-4, 1e-2, 100


def synthetic_losses(n: int, noise_rate: float = 0.3, seed: int = 0) -> torch.Tensor:
    """(n,) float32 bimodal per-sample losses: clean low and tight, noisy high and wide, shuffled."""
    g = torch.Generator().manual_seed(seed)
    noisy = torch.rand(n, generator=g) < noise_rate
    clean_loss = 1.0 + 0.4 * torch.randn(n, generator=g).abs_()
    noisy_loss = torch.randn(n, generator=g).mul_(0.8).add_(3.5)
    return torch.where(noisy, noisy_loss, clean_loss)


def time_ours(losses: torch.Tensor, repeats: int):
    """(median seconds, fastest seconds, the last fit) over `repeats` fits."""
    times, fit = [], None
    for _ in range(repeats):
        fit = None  # free the previous fit's buffers before timing the next one
        start = time.perf_counter()
        fit = fit_gmm(losses, reg_covar=REG_COVAR, tol=TOL, max_iter=MAX_ITER)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), fit


def documented_init(x: np.ndarray):
    high = x >= 0.5
    sides = [x[~high], x[high]]
    weights = np.array([s.size / x.size for s in sides])
    means = np.array([s.mean() for s in sides])
    variances = np.array([s.var() + REG_COVAR for s in sides])
    return weights, means, variances


def run_sklearn(x: np.ndarray):
    """(seconds for fit + predict_proba, posterior of the high-mean component, n_iter)."""
    from sklearn.mixture import GaussianMixture

    weights, means, variances = documented_init(x)
    gm = GaussianMixture(2, covariance_type="full", reg_covar=REG_COVAR, tol=TOL, max_iter=MAX_ITER,
                         weights_init=weights, means_init=means.reshape(2, 1),
                         precisions_init=(1.0 / variances).reshape(2, 1, 1), init_params="random_from_data",
                         random_state=0)
    start = time.perf_counter()
    gm.fit(x.reshape(-1, 1))
    posterior = gm.predict_proba(x.reshape(-1, 1))[:, int(np.argmax(gm.means_.ravel()))]
    return time.perf_counter() - start, posterior, gm.n_iter_


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def sklearn_skip_reason(n: int, args) -> str | None:
    if n > args.sklearn_max_size:
        return f"size above --sklearn-max-size {args.sklearn_max_size:,}"
    need, have = n * args.sklearn_bytes_per_sample, available_bytes()
    if need > args.sklearn_memory_share * have:
        return (f"needs about {need / 2**30:.1f} GiB, more than {args.sklearn_memory_share:.0%} of the "
                f"{have / 2**30:.1f} GiB available")
    return None


def bench_size(n: int, args) -> dict:
    losses = synthetic_losses(n)
    repeats = args.repeats if n <= 20_000_000 else max(1, args.repeats // 2)
    ours, fastest, fit = time_ours(losses, repeats)
    row = {"n": n, "ours": ours, "fastest": fastest, "repeats": repeats, "n_iter": fit.n_iter,
           "noise_rate": fit.noise_rate}
    reason = sklearn_skip_reason(n, args)
    if reason is not None:
        return {**row, "skipped": reason}
    x = fit.normalize(losses).numpy()
    del losses
    seconds, posterior, sk_iter = run_sklearn(x)
    diff = float(np.abs(posterior - fit.posterior.numpy()).max())
    return {**row, "sklearn": seconds, "sk_iter": sk_iter, "max_diff": diff}


def format_row(r: dict) -> str:
    ours = f"| {r['n']:,} | {r['ours']:.3f} ({r['fastest']:.3f}, {r['repeats']} runs) |"
    if "skipped" in r:
        return f"{ours} skipped: {r['skipped']} | | {r['n_iter']} / - | - |"
    return (f"{ours} {r['sklearn']:.2f} (1 run) | {r['sklearn'] / r['ours']:.0f}x | {r['n_iter']} / {r['sk_iter']} "
            f"| {r['max_diff']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--repeats", type=int, default=5, help="fit_gmm runs per size (halved above 20M)")
    parser.add_argument("--sklearn-max-size", type=int, default=10 ** 9)
    parser.add_argument("--sklearn-bytes-per-sample", type=float, default=200.0)
    parser.add_argument("--sklearn-memory-share", type=float, default=0.6)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; bimodal float32 losses, 30% noisy; reg_covar {REG_COVAR}, tol {TOL}, "
          f"max_iter {MAX_ITER}")
    print("| losses | fit_gmm s: median (fastest, runs) | scikit-learn s | ratio of medians | EM iterations "
          "(ours / sklearn) | max abs posterior diff |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        print(format_row(bench_size(n, args)), flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
