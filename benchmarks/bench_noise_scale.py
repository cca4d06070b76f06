"""The noise state at web scale: noise.state=replicated (every rank holds every sample) against sharded (each rank
its id-mod-world slice), with W ranks simulated in one process over 1e8 and 1e9 synthetic losses of known noise.

    python benchmarks/bench_noise_scale.py                          # 1e8 over 8 and 64 ranks, 1e9 over 64
    python benchmarks/bench_noise_scale.py --runs 1e8:8             # one size

Per run (N losses, W simulated ranks; docs/noise.md, "Sharded state"):

- memory per rank: the state a rank keeps between refits, measured on real structures (rank 0's LossBank and
  NoiseState, built from its ids; the replicated ones from all N ids), plus the refit's work buffers (24 bytes per
  fitted sample: fit_gmm's three float64 arrays, over N or N/W samples). The replicated state is built at
  N <= --replicated-max and scaled by its measured bytes per id above that (a 1e9 replicated bank does not fit in
  this machine's memory; marked "scaled").
- refit: the sharded fit (nlip_ds/noise/gmm_sharded.py) over all W simulated shards at once, one process. The
  shards are generated one at a time (float32, N x 4 bytes in all: 4 GB at 1e9) and the fit runs with
  keep_buffers=False, which rebuilds the normalized losses of each shard at every pass in one reused buffer: the
  simulated cluster never needs more than the losses plus one shard's work buffers. "refit s/rank (simulated)" is
  that fit's wall time over W, which includes the rebuilds a real rank skips; "refit s/rank (kept buffers)" times
  the fit as a real rank runs it (keep_buffers=True) over 2 shards of the same size and divides by 2. Against
  it, "today" is fit_gmm over all N losses, which every rank runs in the replicated design (run when N <=
  --replicated-max). The fit must agree: the estimated noise rate against the true one, and at N <=
  --replicated-max the largest |ε difference| on rank 0's shard against fit_gmm.
- checkpoint bytes per rank: torch.save of rank 0's shard state (bank and ε); replicated, every rank saves all N
  (the union of the W shards: W times as many bytes, computed).
- the host cost per step: writing a step's all-gathered rows (W x 256) into a prefilled bank, and the ε lookup
  (replicated: a rank's own 256 ids in a table of N; sharded: the owner's side of the exchange over all W x 256
  ids, of which it looks up its own, in a table of N/W). On a GPU the lookup runs on the device; here on the CPU.
- communication per step and per refit at 8, 64 and 512 ranks: benchmarks/comm_model.py's `noise` table.

Wall times depend on the machine's load: the script prints the load average before and after each run. It runs
torch on --threads threads (default 1): a refit is one rank's work on its own cores, and on an oversubscribed
machine torch's thread pool slows the many short passes of EM by 10x or more.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.comm_model import ROOT, noise_table  # noqa: E402
from nlip_ds.noise.bank import LossBank  # noqa: E402
from nlip_ds.noise.estimator import owned_epsilon  # noqa: E402
from nlip_ds.noise.gmm import fit_gmm  # noqa: E402
from nlip_ds.noise.gmm_sharded import fit_gmm_sharded  # noqa: E402
from nlip_ds.noise.harmonize import NoiseState  # noqa: E402
from nlip_ds.noise.partition import IdPartition  # noqa: E402

NOISE_RATE, TOL, REG_COVAR = 0.3, 1e-4, 5e-4  # noise.tol's default
WORK_BYTES = 24  # fit_gmm's float64 x, z and resp per fitted sample
CHUNK = 1 << 22
STEP_ROWS_PER_RANK = 256


def shard_losses(n: int, seed: int) -> tuple[torch.Tensor, int]:
    """(n,) float32 losses of one rank's shard and how many are noisy: clean low and tight, noisy high and wide."""
    g = torch.Generator().manual_seed(seed)
    noisy = torch.rand(n, generator=g) < NOISE_RATE
    clean_loss = torch.randn(n, generator=g).abs_().mul_(0.4).add_(1.0)
    losses = torch.randn(n, generator=g).mul_(0.8).add_(3.5)
    losses = torch.where(noisy, losses, clean_loss)
    return losses, int(noisy.sum())


def load() -> str:
    return "load average %.1f %.1f %.1f" % os.getloadavg()


def rank_state(n: int, partition: IdPartition, fit, losses: torch.Tensor) -> tuple[LossBank, NoiseState]:
    """The bank and ε table a rank keeps for the ids it owns (ids 0..n-1), the bank filled from `losses`."""
    bank = LossBank(partition=partition)
    ids = torch.arange(partition.rank, n, partition.world)
    for start in range(0, ids.numel(), CHUNK):
        part = ids[start:start + CHUNK]
        bank.update(part, losses[start:start + CHUNK])  # one process: the all-gather returns the rows as they are
    state = NoiseState()
    # The values do not change the bytes; a zero ε spares the float64 temporaries of noise_probability at 1e8.
    state.update(_with_posterior(fit, torch.zeros(ids.numel(), dtype=torch.float64)), ids)
    return bank, state


def _with_posterior(fit, posterior):
    from dataclasses import replace

    return replace(fit, posterior=posterior)


def saved_bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def state_bytes(bank: LossBank, state: NoiseState) -> int:
    return bank.nbytes() + state._ids.nbytes + state._eps.nbytes


def step_costs(n: int, world: int, fit, repeats: int = 50) -> dict:
    """µs per step to write the W x 256 gathered rows into a bank of n ids and to look ε up, both layouts."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, partition in (("replicated", IdPartition()), ("sharded", IdPartition(0, world))):
        bank = LossBank(partition=partition)
        owned = torch.arange(partition.rank, n, partition.world)
        for start in range(0, owned.numel(), CHUNK):  # in chunks: one update packs 24 bytes per row
            bank.update(owned[start:start + CHUNK], torch.ones(min(CHUNK, owned.numel() - start)))
        state = NoiseState()
        state.update(_with_posterior(fit, torch.full((owned.numel(),), 0.5, dtype=torch.float64)), owned)
        steps = [torch.randint(0, n, (world * STEP_ROWS_PER_RANK,), generator=g) for _ in range(repeats)]
        t = time.perf_counter()
        for ids in steps:
            bank.update(ids, torch.rand(ids.numel(), generator=g))
        write = (time.perf_counter() - t) / repeats
        # Replicated, a rank looks up its own 256 ids; sharded, the owner answers for all W x 256 of the step.
        queries = steps if name == "sharded" else [ids[:STEP_ROWS_PER_RANK] for ids in steps]
        t = time.perf_counter()
        for ids in queries:
            owned_epsilon(state, partition, ids)  # what NoiseEstimator.weights runs on each rank (CPU)
        out[name] = (write * 1e6, (time.perf_counter() - t) / repeats * 1e6)
        del bank, state
    return out


def step_only(n: int, world: int) -> list[str]:
    fit = fit_gmm(shard_losses(1000, seed=0)[0])
    step = step_costs(n, world, fit)
    return [f"## per step, {n:.0e} ids, {world} ranks ({load()}): bank write us {step['replicated'][0]:.0f} "
            f"replicated, {step['sharded'][0]:.0f} sharded; eps lookup us {step['replicated'][1]:.0f} replicated "
            f"(256 ids), {step['sharded'][1]:.0f} sharded ({world} x 256 ids)"]


def run(n: int, world: int, args) -> list[str]:
    per = n // world
    lines = [f"## {n:.0e} losses over {world} simulated ranks ({per:,} per rank); {load()}"]
    t = time.perf_counter()
    shards, noisy = [], 0
    for rank in range(world):
        losses, k = shard_losses(per, seed=rank)
        shards.append(losses)
        noisy += k
    lines.append(f"generated in {time.perf_counter() - t:.0f} s; true noise rate {noisy / (per * world):.4f}")

    t = time.perf_counter()
    sharded = fit_gmm_sharded(shards, reg_covar=REG_COVAR, tol=TOL, keep_buffers=False, keep_posterior=False)
    simulated = time.perf_counter() - t
    fit = sharded.fit
    t = time.perf_counter()
    kept = fit_gmm_sharded(shards[:2], reg_covar=REG_COVAR, tol=TOL, keep_buffers=True, keep_posterior=False)
    kept_per_rank = (time.perf_counter() - t) / 2
    lines.append(f"sharded fit: noise rate {fit.noise_rate:.4f}, {fit.n_iter} EM iterations, "
                 f"{simulated:.0f} s for all {world} ranks; a rank's own fit with kept buffers "
                 f"({kept.fit.n_iter} iterations on 2 shards): {kept_per_rank:.1f} s")

    today_fit_s, eps_diff = None, None
    if n <= args.replicated_max:
        everything = torch.empty(per * world, dtype=torch.float32)
        for rank, losses in enumerate(shards):
            everything[rank::world] = losses  # id = position: shard r holds ids r, r + W, ...
        t = time.perf_counter()
        today = fit_gmm(everything, reg_covar=REG_COVAR, tol=TOL)
        today_fit_s = time.perf_counter() - t
        eps_diff = float((fit.noise_probability(shards[0]) - today.posterior[0::world]).abs().max())
        del everything, today

    bank, state = rank_state(per * world, IdPartition(0, world), fit, shards[0])
    mine = state_bytes(bank, state)
    ckpt = saved_bytes({"bank": bank.state_dict(), "noise": state.state_dict()})
    del bank, state
    if n > args.replicated_max:
        shards.clear()  # before the step timing's banks: the simulated cluster's losses are done with
    if n <= args.replicated_max:
        everything = torch.empty(per * world, dtype=torch.float32)
        for rank, losses in enumerate(shards):
            everything[rank::world] = losses
        bank, state = rank_state(per * world, IdPartition(), fit, everything)
        replicated_bytes, scaled = state_bytes(bank, state), ""
        del bank, state, everything
    else:
        replicated_bytes, scaled = mine * world, " (scaled)"  # bytes per id are layout constants
    shards.clear()
    step = step_costs(min(n, args.step_ids), world, fit)

    gib = 2 ** 30
    lines += ["", "| | replicated (today) | sharded | ratio |", "|---|---|---|---|",
              f"| state per rank GiB | {replicated_bytes / gib:.2f}{scaled} | {mine / gib:.3f} | "
              f"{replicated_bytes / mine:.1f} |",
              f"| refit work buffers per rank GiB | {WORK_BYTES * n / gib:.2f} | {WORK_BYTES * per / gib:.3f} | "
              f"{world} |",
              f"| checkpoint bytes per rank GiB | {ckpt * world / gib:.2f} (computed) | {ckpt / gib:.3f} | "
              f"{world} |",
              f"| refit s per rank | {'%.1f' % today_fit_s if today_fit_s else 'not run'} | "
              f"{kept_per_rank:.1f} kept buffers, {simulated / world:.1f} simulated | "
              f"{'%.1f' % (today_fit_s / kept_per_rank) if today_fit_s else '-'} |",
              f"| bank write per step us (W x 256 rows) | {step['replicated'][0]:.0f} | {step['sharded'][0]:.0f} | "
              f"{step['replicated'][0] / step['sharded'][0]:.1f} |",
              f"| eps lookup per step us (host; 256 vs W x 256 ids) | {step['replicated'][1]:.0f} | "
              f"{step['sharded'][1]:.0f} | "
              f"{step['replicated'][1] / step['sharded'][1]:.1f} |"]
    if eps_diff is not None:
        lines.append(f"\nlargest |eps sharded - eps fit_gmm| on rank 0's shard: {eps_diff:.1e}")
    lines.append(load())
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["1e8:8", "1e8:64", "1e9:64"],
                        help="N:W pairs (losses, simulated ranks)")
    parser.add_argument("--replicated-max", type=float, default=1e8,
                        help="build today's replicated state and fit only up to this many losses")
    parser.add_argument("--step-ids", type=float, default=1e8, help="ids in the banks of the per-step timing")
    parser.add_argument("--config", default=str(ROOT / "configs/vit-b32-yfcc26m.yaml"),
                        help="model whose step the communication table compares with")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--step-only", action="store_true", help="only the per-step host costs of each run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.replicated_max, args.step_ids = int(args.replicated_max), int(args.step_ids)
    print(f"torch threads {torch.get_num_threads()}; {load()}", flush=True)
    for spec in args.runs:
        n, world = spec.split(":")
        n, world = int(float(n)), int(world)
        lines = step_only(min(n, args.step_ids), world) if args.step_only else run(n, world, args)
        print("\n".join(lines) + "\n", flush=True)
    print(noise_table(args.config))


if __name__ == "__main__":
    main()
