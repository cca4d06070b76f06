"""noise.state=sharded: each rank keeps its slice of the ids, the run's estimate is the replicated one, and its
checkpoint shards resume at the same partition, re-partition to another world size (2 -> 4, 4 -> 2) or refuse."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nlip_ds.config import NoiseConfig
from nlip_ds.distributed import free_port
from nlip_ds.noise.estimator import NoiseEstimator
from nlip_ds.noise.partition import IdPartition

N, IDS, STEPS_PER_EPOCH, EPOCHS = 48, 400, 3, 3


def rank_rows(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What rank `rank` observes at `step`: N rows of a 30%-noisy loss mix, some ids repeated across ranks."""
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, IDS, (N,), generator=g)
    noisy = ids % 10 < 3
    losses = torch.where(noisy, 3.5 + 0.8 * torch.randn(N, generator=g), 1.0 + 0.4 * torch.randn(N, generator=g).abs())
    return ids, losses, noisy.long()


def query(rank: int) -> torch.Tensor:
    return torch.arange(rank, IDS, 3)[:N]  # every rank asks for ids that other ranks own


def run(noise: NoiseEstimator, rows_of_step) -> list:
    refits = []
    for epoch in range(EPOCHS):
        refit = noise.start_epoch(epoch, epoch * STEPS_PER_EPOCH)
        refits.append(None if refit is None else refit.metrics)
        for step in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH):
            noise.observe(*rows_of_step(step))
    return refits


def replicated(world: int) -> NoiseEstimator:
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1), contrastive_batch=N * world)
    run(noise, lambda step: tuple(torch.cat(p) for p in zip(*(rank_rows(step, r) for r in range(world)))))
    return noise


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # the trust test reads the fit's global parameters, so every rank decides alike
        noise = NoiseEstimator(NoiseConfig(warmup_epochs=1, state="sharded"), contrastive_batch=N * world)
        assert noise.partition == IdPartition(rank, world)
        refits = run(noise, lambda step: rank_rows(step, rank))
        eps = noise.weights(query(rank))  # one exchange: the owners answer
        torch.save({"refits": refits, "eps": eps.epsilon, "shared": noise.state_dict(),
                    "shard": noise.shard_state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def sharded_run(request, tmp_path_factory):
    """(world, per-rank outputs of a real gloo run with noise.state=sharded)."""
    world, out = request.param, tmp_path_factory.mktemp(f"sharded{request.param}")
    mp.spawn(_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return world, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def union(shards: list[dict], part: str, keys: tuple[str, ...]) -> dict:
    cols = {k: torch.cat([s[part][k] for s in shards]) for k in keys}
    order = torch.argsort(cols[keys[0]])
    return {k: v[order] for k, v in cols.items()}


BANK_KEYS, EPS_KEYS = ("ids", "losses", "flags", "epochs"), ("ids", "eps")


@pytest.mark.dist
def test_sharded_ranks_hold_slices_of_the_replicated_estimate(sharded_run):
    world, got = sharded_run
    ref = replicated(world)
    ref_state = ref.state_dict()
    for rank, g in enumerate(got):
        assert bool((g["shard"]["bank"]["ids"] % world == rank).all())  # only its own ids
        assert g["shared"]["history"] == got[0]["shared"]["history"]
        assert [h["noise/trusted"] for h in g["shared"]["history"]] == [1.0] * (EPOCHS - 1)
        torch.testing.assert_close(g["eps"], ref.weights(query(rank)).epsilon, rtol=0, atol=1e-6)
    bank = union([g["shard"] for g in got], "bank", BANK_KEYS)
    assert all(torch.equal(bank[k], ref_state["bank"][k]) for k in BANK_KEYS)
    eps = union([g["shard"] for g in got], "noise", EPS_KEYS)
    assert torch.equal(eps["ids"], ref_state["noise"]["ids"])
    torch.testing.assert_close(eps["eps"], ref_state["noise"]["eps"], rtol=0, atol=1e-6)
    for mine, theirs in zip(got[0]["refits"], run(NoiseEstimator(NoiseConfig(warmup_epochs=1)), lambda s: tuple(
            torch.cat(p) for p in zip(*(rank_rows(s, r) for r in range(world)))))):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert mine.keys() == theirs.keys()
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)


def restored(shared: dict, shards: list[dict], partition: IdPartition) -> NoiseEstimator:
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1, state="sharded"), partition)
    by_rank = {s["rank"]: s for s in shards}
    noise.load_state_dict(shared, [by_rank[r] for r in noise.shards_needed(shared)])
    return noise


@pytest.mark.dist
def test_resume_same_partition_and_repartition(sharded_run):
    world, got = sharded_run
    shared, shards = got[0]["shared"], [g["shard"] for g in got]
    # Same partition: each rank reads its own shard only, and saves it back unchanged.
    for rank in range(world):
        noise = restored(shared, shards, IdPartition(rank, world))
        assert noise.shards_needed(shared) == [rank]
        again = noise.shard_state_dict()
        assert all(torch.equal(again["bank"][k], shards[rank]["bank"][k]) for k in BANK_KEYS)
        assert all(torch.equal(again["noise"][k], shards[rank]["noise"][k]) for k in EPS_KEYS)
        assert noise.state_dict() == shared
    # Another world size (2 -> 4 or 4 -> 2), then back: every id lands with its new owner, exactly.
    other = 4 if world == 2 else 2
    moved = [restored(shared, shards, IdPartition(r, other)) for r in range(other)]
    moved_shards = [m.shard_state_dict() for m in moved]
    for r, m in enumerate(moved_shards):
        assert bool((m["bank"]["ids"] % other == r).all())
    for part, keys in (("bank", BANK_KEYS), ("noise", EPS_KEYS)):
        before, after = union(shards, part, keys), union(moved_shards, part, keys)
        assert all(torch.equal(before[k], after[k]) for k in keys)
    back = [restored(moved[0].state_dict(), moved_shards, IdPartition(r, world)).shard_state_dict()
            for r in range(world)]
    for b, s in zip(back, shards):
        assert all(torch.equal(b["bank"][k], s["bank"][k]) for k in BANK_KEYS)
        torch.testing.assert_close(b["noise"]["eps"], s["noise"]["eps"], rtol=0, atol=0)
    # A replicated run reads every shard into one whole state.
    whole = NoiseEstimator(NoiseConfig(warmup_epochs=1))
    whole.load_state_dict(shared, shards)
    full = whole.state_dict()
    bank = union(shards, "bank", BANK_KEYS)
    assert all(torch.equal(full["bank"][k], bank[k]) for k in BANK_KEYS)


@pytest.mark.dist
def test_a_missing_shard_is_refused(sharded_run):
    world, got = sharded_run
    shared, shards = got[0]["shared"], [g["shard"] for g in got]
    noise = NoiseEstimator(NoiseConfig(state="sharded"), IdPartition(0, world + 1))
    with pytest.raises(ValueError, match=f"holds {world} shards.*needs shards"):
        noise.load_state_dict(shared, shards[1:])


def test_an_unsharded_checkpoint_resumes_into_a_sharded_state():
    ref = replicated(2)
    state = ref.state_dict()
    parts = [NoiseEstimator(NoiseConfig(warmup_epochs=1, state="sharded"), IdPartition(r, 3)) for r in range(3)]
    for rank, noise in enumerate(parts):
        assert noise.shards_needed(state) == []
        noise.load_state_dict(state)
        ids = noise.shard_state_dict()["bank"]["ids"]
        assert bool((ids % 3 == rank).all())
        mine = torch.arange(rank, IDS, 3)
        assert torch.equal(noise.estimate.epsilon_for(mine), ref.estimate.epsilon_for(mine))
    assert sum(len(p.bank) for p in parts) == len(ref.bank)


def test_a_single_process_sharded_state_is_the_replicated_one():
    world1 = [NoiseEstimator(NoiseConfig(warmup_epochs=1, state=s)) for s in ("replicated", "sharded")]
    for noise in world1:
        run(noise, lambda step: rank_rows(step, 0))
    a, b = (n.state_dict() for n in world1)
    assert world1[1].shard_state_dict() is None and a.keys() == b.keys()
    assert torch.equal(a["noise"]["eps"], b["noise"]["eps"]) and a["history"] == b["history"]


@pytest.mark.slow
@pytest.mark.dist
def test_kill9_then_resume_of_a_sharded_2_rank_run_matches_the_uninterrupted_run(synth_dir, tmp_path):
    """The run-level path: each rank saves its shard in its rank state and reads it back on resume."""
    from tests.test_checkpoints import _finish, _kill_between_checkpoints, _launch, _losses

    tok, full, killed = tmp_path / "tokenizer", tmp_path / "full", tmp_path / "killed"
    logs = [tmp_path / f"{name}.log" for name in ("full", "killed", "resumed")]
    _finish(_launch(synth_dir, tok, full, logs[0], "noise.state=sharded"), logs[0])
    ckpt_step, killed_at = _kill_between_checkpoints(_launch(synth_dir, tok, killed, logs[1], "noise.state=sharded"),
                                                     killed)
    out = _finish(_launch(synth_dir, tok, killed, logs[2], "noise.state=sharded", "train.resume=latest"), logs[2])
    assert f"resumed from {killed / 'checkpoints'}" in out
    from nlip_ds.run.checkpoint import read_latest

    ckpt = killed / "checkpoints" / read_latest(killed / "checkpoints")  # the resumed run's last save
    shards = [torch.load(ckpt / f"rank_state_0000{r}.pt", weights_only=True)["noise"] for r in (0, 1)]
    assert [s["rank"] for s in shards] == [0, 1] and all(bool((s["bank"]["ids"] % 2 == s["rank"]).all())
                                                         for s in shards)
    want, got = _losses(full), _losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, 15))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}"
    refits = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines() if "noise/rate" in line]
    assert refits, "the run should refit at least once"


def test_audit_reads_the_estimate_of_a_sharded_save_from_the_rank_states(tmp_path):
    from nlip_ds.eval.audit import _sharded_estimate
    from nlip_ds.run.checkpoint import rank_state_name

    for rank in range(2):
        ids = torch.arange(rank, 10, 2)
        torch.save({"noise": {"noise": {"ids": ids, "eps": ids / 10.0}}}, tmp_path / rank_state_name(rank))
    got = _sharded_estimate(tmp_path, 2)
    assert dict(zip(got["ids"].tolist(), got["eps"].tolist())) == {i: pytest.approx(i / 10) for i in range(10)}
