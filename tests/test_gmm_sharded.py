"""fit_gmm_sharded: fit_gmm's fit from shards, exact bounds, independence of the partition, real gloo ranks."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nlip_ds.distributed import free_port
from nlip_ds.noise.gmm import fit_gmm
from nlip_ds.noise.gmm_sharded import _select_keys, _Reducer, fit_gmm_sharded
from tests.test_gmm import CASES, bimodal, sklearn_posterior

TOL = 1e-9  # the agreement bound on the posteriors


def split(losses: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Shards as the sharded state holds them: id mod world (ids = positions)."""
    return [losses[rank::world] for rank in range(world)]


def joined(posteriors: list[torch.Tensor], world: int, n: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float64)
    for rank, p in enumerate(posteriors):
        out[rank::world] = p
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_shard_is_fit_gmm_bit_for_bit(name):
    losses = CASES[name]
    ref, got = fit_gmm(losses, tol=1e-4), fit_gmm_sharded([losses], tol=1e-4)
    assert (got.fit.means, got.fit.variances, got.fit.weights, got.fit.bounds, got.fit.n_iter) == \
        (ref.means, ref.variances, ref.weights, ref.bounds, ref.n_iter)
    assert got.fit.log_likelihood == ref.log_likelihood
    assert torch.equal(got.posteriors[0], ref.posterior)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("world", [2, 7])
@pytest.mark.parametrize("keep_buffers", [True, False])
def test_any_partition_agrees_with_fit_gmm_within_1e_9(name, world, keep_buffers):
    losses = CASES[name]
    ref = fit_gmm(losses, tol=1e-4)
    got = fit_gmm_sharded(split(losses, world), tol=1e-4, keep_buffers=keep_buffers)
    assert got.fit.bounds == ref.bounds and got.fit.n_iter == ref.n_iter
    assert (joined(got.posteriors, world, losses.numel()) - ref.posterior).abs().max() < TOL
    np.testing.assert_allclose(got.fit.means + got.fit.variances + got.fit.weights,
                               ref.means + ref.variances + ref.weights, rtol=1e-12, atol=1e-15)


def test_uneven_and_empty_shards():
    losses = CASES["noise30"]
    shards = [losses[:10], losses[10:10], losses[10:15000], losses[15000:]]
    got = fit_gmm_sharded(shards, tol=1e-4)
    assert (torch.cat(got.posteriors) - fit_gmm(losses, tol=1e-4).posterior).abs().max() < TOL


@pytest.mark.parametrize("tol,max_iter", [(1e-2, 100), (1e-9, 1000)])
def test_matches_sklearn(tol, max_iter):
    losses = CASES["noise30"]
    got = fit_gmm_sharded(split(losses, 4), tol=tol, max_iter=max_iter)
    x = got.fit.normalize(losses).numpy()
    expected, gm = sklearn_posterior(x, tol, max_iter)
    assert got.fit.n_iter == gm.n_iter_
    assert np.abs(joined(got.posteriors, 4, losses.numel()).numpy() - expected).max() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_select_is_the_exact_order_statistic(dtype):
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(3000, generator=g) * 1e3, torch.tensor([0.0, -0.0, 1e-30, -1e-30]),
                        torch.full((500,), 2.5), torch.randint(-5, 5, (500,), generator=g).float()]).to(dtype)
    values = values[torch.randperm(values.numel(), generator=g)]
    ordered = values.sort().values
    ranks = [1, 2, 17, 500, 2001, 3500, values.numel()]
    got = _select_keys(split(values, 3), ranks, _Reducer("cpu"))
    assert got == [float(ordered[k - 1]) for k in ranks]


def test_non_finite_losses_are_dropped_and_get_the_prior():
    losses = bimodal(4000, 0.3, seed=9)
    losses[[3, 100, 2001]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    ref = fit_gmm(losses)
    got = fit_gmm_sharded(split(losses, 3))
    assert got.fit.n_dropped == ref.n_dropped == 3 and got.fit.n_samples == ref.n_samples
    assert (joined(got.posteriors, 3, losses.numel()) - ref.posterior).abs().max() < TOL


def test_equal_and_mostly_tied_losses_follow_fit_gmm():
    equal = torch.full((100,), 2.0)
    got = fit_gmm_sharded(split(equal, 2))
    assert got.fit.bounds == (2.0, 2.0) and got.fit.noise_rate == 0.0
    assert all(bool((p == 0).all()) for p in got.posteriors)
    tied = torch.cat([torch.full((995,), 1.0), torch.linspace(0.0, 5.0, 5)])
    assert fit_gmm_sharded(split(tied, 2)).fit.bounds == fit_gmm(tied).bounds == (0.0, 5.0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="empty"):
        fit_gmm_sharded([torch.empty(0), torch.empty(0)])
    with pytest.raises(ValueError, match="non-finite"):
        fit_gmm_sharded([torch.tensor([float("nan")]), torch.tensor([float("inf")])])
    with pytest.raises(ValueError, match="floating-point"):
        fit_gmm_sharded([torch.arange(4)])


# ------------------------------------------------------------------------------------------- gloo ranks


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        losses = CASES["noise30"].clone()
        losses[7] = float("nan")
        got = fit_gmm_sharded([losses[rank::world]], tol=1e-4)
        torch.save({"posterior": got.posteriors[0], "params": got.fit.state_dict()["params"],
                    "n_iter": got.fit.n_iter}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_fit_the_concatenated_losses(tmp_path, world):
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    losses = CASES["noise30"].clone()
    losses[7] = float("nan")
    ref = fit_gmm(losses, tol=1e-4)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert all(torch.equal(g["params"], got[0]["params"]) for g in got)  # one mixture on every rank
    assert all(g["n_iter"] == ref.n_iter for g in got)
    np.testing.assert_allclose(got[0]["params"].numpy(), ref.state_dict()["params"].numpy(), rtol=1e-12)
    posterior = joined([g["posterior"] for g in got], world, losses.numel())
    assert (posterior - ref.posterior).abs().max() < TOL


@pytest.mark.parametrize("init,epsilon", [("median", "posterior"), ("midrange", "rank"), ("median", "rank")])
@pytest.mark.parametrize("world", [1, 3])
def test_median_start_and_rank_epsilon_follow_fit_gmm(init, epsilon, world):
    """The median and the rank threshold come from the same exact radix select as the bounds: one shard is
    fit_gmm bit for bit, any partition gives the same mixture within rounding and, under rank, the same ε."""
    losses = CASES["noise30"]
    ref = fit_gmm(losses, tol=1e-4, init=init, epsilon=epsilon)
    got = fit_gmm_sharded(split(losses, world), tol=1e-4, init=init, epsilon=epsilon)
    eps = joined(got.posteriors, world, losses.numel())
    assert got.fit.bounds == ref.bounds and got.fit.n_iter == ref.n_iter
    if world == 1:
        assert (got.fit.means, got.fit.variances, got.fit.weights) == (ref.means, ref.variances, ref.weights)
        assert torch.equal(eps, ref.posterior)
    elif epsilon == "rank":
        assert torch.equal(eps, ref.posterior)
    else:
        assert (eps - ref.posterior).abs().max() < TOL
