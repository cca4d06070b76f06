"""The caption store sharded by id: each rank keeps its slice, `lookup` answers from the owners, slices resume at
the same partition and re-partition to another world size (2 -> 4, 4 -> 2)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nlip_ds.completion.caption_store import SyntheticCaptionStore
from nlip_ds.distributed import free_port
from nlip_ds.noise.partition import IdPartition

PAD, L = 0, 5


def gathered_rows(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The all-gathered (ids, tokens, kept) of one generating step: every rank puts the same rows."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(-1, 40, (12,), generator=g)  # -1: padding rows
    return ids, torch.randint(1, 50, (12, L), generator=g), torch.rand(12, generator=g) < 0.5


def filled(partition: IdPartition | None = None) -> SyntheticCaptionStore:
    store = SyntheticCaptionStore(L, PAD, partition)
    for step in range(6):
        ids, tokens, kept = gathered_rows(step)
        store.put(ids, tokens, epoch=step // 2, step=step, kept=kept)
    return store


def as_dict(stores: list[SyntheticCaptionStore]) -> dict:
    out = {}
    for store in stores:
        state = store.state_dict()
        for i, sid in enumerate(state["ids"].tolist()):
            assert sid not in out, "an id in two slices"
            out[sid] = (state["tokens"][i].tolist(), int(state["epoch"][i]), int(state["step"][i]),
                        bool(state["kept"][i]))
    return out


def test_replicated_lookup_is_fresh_and_get():
    store = filled()
    ids = torch.arange(-1, 41)
    got = store.lookup(ids)
    present = [int(i) in store for i in ids]
    assert got.present.tolist() == present
    assert got.fresh(3, 2) == [p and f for p, f in zip(present, store.fresh(ids.tolist(), 3, 2))]
    known = [int(i) for i in ids if int(i) in store]
    assert torch.equal(got.tokens[got.present], store.get(known))
    assert bool(got.kept.any()) and not bool((got.kept & ~got.present).any())
    assert got.kept[got.present].tolist() == [bool(store.kept[store._slot[i]]) for i in known]


@pytest.mark.parametrize("world, other", [(2, 4), (4, 2)])
def test_slices_partition_the_store_and_repartition_exactly(world, other):
    whole = as_dict([filled()])
    slices = [filled(IdPartition(r, world)) for r in range(world)]
    assert as_dict(slices) == whole
    for r, s in enumerate(slices):
        assert all(sid % world == r for sid in s.state_dict()["ids"].tolist())
    states = [s.state_dict() for s in slices]
    moved = [SyntheticCaptionStore(L, PAD, IdPartition(r, other)) for r in range(other)]
    for m in moved:
        m.load_shards(states)
    assert as_dict(moved) == whole
    same = SyntheticCaptionStore(L, PAD, IdPartition(1, world))
    same.load_state_dict(states[1])
    assert as_dict([same]) == as_dict([slices[1]])
    back = SyntheticCaptionStore(L, PAD)  # a replicated run reads every slice
    back.load_shards([m.state_dict() for m in moved])
    assert as_dict([back]) == whole


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        store = filled(IdPartition(rank, world))
        got = store.lookup(torch.arange(rank, 40 + rank))  # every rank asks for ids the others own
        torch.save(dict(got._asdict()), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_gloo_lookup_answers_from_the_owners(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    whole = filled()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        want = whole.lookup(torch.arange(rank, 40 + rank))
        for key in ("present", "epoch", "tokens", "kept"):
            assert torch.equal(got[key], getattr(want, key)), key
        assert bool(got["present"].any()) and not bool(got["present"].all())


@pytest.mark.slow
@pytest.mark.dist
def test_a_sharded_2_rank_completion_run_and_its_resume_match_the_replicated_run(synth_dir, tmp_path):
    """Training with noise-completion: the sharded state (noise and captions, with the caption filter's
    verdicts) trains like the replicated one, saves its caption slices in the rank states and resumes from
    them."""
    import json

    from tests.test_completion import _train_ds

    tok = tmp_path / "tokenizer"
    _train_ds(synth_dir, tmp_path / "replicated", tok, "train.max_steps=14", "eval.enabled=false")
    sharded = tmp_path / "sharded"
    _train_ds(synth_dir, sharded, tok, "train.max_steps=12", "eval.enabled=false", "noise.state=sharded")
    slices = [torch.load(sharded / "checkpoints" / "step12" / f"rank_state_0000{r}.pt", weights_only=True)["captions"]
              for r in range(2)]
    assert all(bool((s["ids"] % 2 == r).all()) for r, s in enumerate(slices))
    _train_ds(synth_dir, sharded, tok, "train.max_steps=14", "train.resume=latest", "eval.enabled=false",
              "noise.state=sharded")

    def logged(run):
        out = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            out.setdefault(m["step"], {}).update(m)
        return out

    want, got = logged(tmp_path / "replicated"), logged(sharded)
    assert sum(len(s["ids"]) for s in slices) == got[12]["completion/stored_captions"] > 0
    for step, m in want.items():
        if "train/loss" in m:
            assert got[step]["train/loss"] == pytest.approx(m["train/loss"], rel=1e-5, abs=1e-6), step
        if "completion/generated" in m:
            assert got[step]["completion/generated"] == m["completion/generated"], step
            assert got[step]["completion/stored_captions"] == m["completion/stored_captions"], step
            assert got[step].get("completion/kept") == m.get("completion/kept"), step  # none before a caption
