"""LossBank: latest-wins storage in both layouts, epochs, checkpoints, and a real 2-rank gloo run."""
import io
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nlip_ds.distributed import free_port
from nlip_ds.noise.bank import LossBank
from nlip_ds.noise.gmm import fit_gmm


def contents(bank: LossBank, since: int = 0) -> dict[int, tuple[float, int]]:
    ids, losses, flags = bank.losses_since(since)
    assert torch.equal(ids, ids.sort().values), "losses_since must return ascending ids"
    return {i: (loss, flag) for i, loss, flag in zip(ids.tolist(), losses.tolist(), flags.tolist())}


def f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


@pytest.mark.parametrize("layout", ["dense", "compact", "auto"])
def test_latest_wins_across_and_within_updates(layout):
    bank = LossBank(layout=layout)
    bank.update(torch.arange(5), torch.arange(5.0), torch.tensor([0, 1, 0, 1, 0]))
    bank.update(torch.tensor([3, 1, 3]), torch.tensor([30.0, 10.0, 31.0]))  # id 3 twice: the later row wins
    assert contents(bank) == {0: (0.0, 0), 1: (10.0, -1), 2: (2.0, 0), 3: (31.0, -1), 4: (4.0, 0)}
    assert len(bank) == 5


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_matches_a_dict_over_random_updates(layout):
    rng = random.Random(0)
    bank, expected = LossBank(capacity=8, layout=layout), {}
    for step in range(60):
        bank.set_epoch(step // 20)
        n = rng.randint(1, 3000)
        ids = [rng.randrange(20_000) if layout == "dense" else rng.randrange(2 ** 53) for _ in range(n)]
        losses = [rng.random() * 5 for _ in range(n)]
        flags = [rng.choice([-1, 0, 1]) for _ in range(n)]
        bank.update(torch.tensor(ids), torch.tensor(losses), torch.tensor(flags))
        for i, loss, flag in zip(ids, losses, flags):
            expected[i] = (f32(loss), flag, step // 20)
    assert bank.layout == layout
    for since in (0, 1, 2):
        assert contents(bank, since) == {i: v[:2] for i, v in expected.items() if v[2] >= since}


def test_dense_growth_doubles():
    bank = LossBank(capacity=4, layout="dense")
    bank.update(torch.tensor([0, 1]), torch.ones(2))
    assert bank.nbytes() == 9 * 4
    bank.update(torch.tensor([5]), torch.ones(1))  # needs 6 slots: doubled to 8
    assert bank.nbytes() == 9 * 8
    bank.update(torch.tensor([40]), torch.ones(1))  # needs 41 slots: more than double
    assert bank.nbytes() == 9 * 41
    assert contents(bank) == {0: (1.0, -1), 1: (1.0, -1), 5: (1.0, -1), 40: (1.0, -1)}


def test_compact_storage_is_17_bytes_per_sample():
    bank = LossBank(layout="compact")
    bank.update(torch.tensor([2 ** 52, 7, 2 ** 40]), torch.ones(3))
    assert len(bank) == 3 and bank.nbytes() == 17 * 3


def test_auto_switches_to_compact_for_sparse_ids():
    bank = LossBank()
    bank.update(torch.arange(100), torch.arange(100.0))
    assert bank.layout == "dense"
    bank.update(torch.tensor([2 ** 40, 5]), torch.tensor([-1.0, -5.0]))
    assert bank.layout == "compact"
    expected = {i: (float(i), -1) for i in range(100)} | {5: (-5.0, -1), 2 ** 40: (-1.0, -1)}
    assert contents(bank) == expected


def test_losses_since_selects_by_epoch_of_last_update():
    bank = LossBank()
    bank.update(torch.arange(6), torch.zeros(6))
    bank.set_epoch(1)
    bank.update(torch.tensor([4, 2]), torch.ones(2))
    assert contents(bank, 1) == {2: (1.0, -1), 4: (1.0, -1)}
    assert len(contents(bank, 0)) == 6 and contents(bank, 2) == {}


@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("into", ["auto", "dense", "compact"])
def test_state_dict_round_trip(layout, into):
    bank = LossBank(layout=layout)
    bank.update(torch.tensor([3, 9, 1]), torch.tensor([0.5, 1.5, 2.5]), torch.tensor([1, 0, -1]))
    bank.set_epoch(2)
    bank.update(torch.tensor([9]), torch.tensor([7.0]))
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = LossBank(layout=into)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.layout == (layout if into == "auto" else into)
    assert restored.epoch == 2 and len(restored) == 3
    for since in (0, 2):
        assert contents(restored, since) == contents(bank, since)
    restored.update(torch.tensor([1]), torch.tensor([8.0]))  # still a working bank
    assert contents(restored, 2) == {1: (8.0, -1), 9: (7.0, -1)}


def test_padding_rows_are_dropped():
    bank = LossBank(pad_to=8)
    bank.update(torch.tensor([4, 2, 0]), torch.tensor([1.0, 2.0, 3.0]))
    assert contents(bank) == {0: (3.0, -1), 2: (2.0, -1), 4: (1.0, -1)}
    with pytest.raises(ValueError, match="pad_to"):
        bank.update(torch.arange(9), torch.zeros(9))


@pytest.mark.parametrize("ids,losses,flags", [
    (torch.arange(3), torch.zeros(4), None),
    (torch.arange(3), torch.zeros(3, 1), None),
    (torch.arange(3), torch.zeros(3), torch.zeros(2)),
])
def test_mismatched_shapes_raise(ids, losses, flags):
    with pytest.raises(ValueError, match=r"\(n,\)"):
        LossBank().update(ids, losses, flags)


@pytest.mark.parametrize("bad", [torch.tensor([-3]), torch.tensor([2 ** 53 + 2]), torch.tensor([1.5])])
def test_out_of_range_ids_raise(bad):
    with pytest.raises(ValueError, match="2\\^53"):
        LossBank().update(bad, torch.zeros(1))


# ---------------------------------------------------------------------------------------------- two ranks

STEPS = 6


def rank_rows(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What rank `rank` feeds at `step`: 16 rows, some ids shared with the other rank in the same step."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 64, (16,), generator=g)
    ids[0] = 100 + step  # on both ranks: rank 1's row must win
    if step == 4:
        ids[1] = 2 ** 45 + rank  # a sparse id switches the auto bank to compact mid-run
    return ids, torch.rand(16, generator=g) * 4, torch.randint(-1, 2, (16,), generator=g)


def feed(bank: LossBank, rows_of_step) -> None:
    for step in range(STEPS):
        bank.set_epoch(step // 3)
        bank.update(*rows_of_step(step))


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bank = LossBank(capacity=16)
        feed(bank, lambda step: rank_rows(step, rank))
        ids, losses, _ = bank.losses_since(1)
        torch.save({"bank": bank.state_dict(), "layout": bank.layout, "posterior": fit_gmm(losses).posterior},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_gloo_ranks_hold_the_bank_of_a_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    single = LossBank(capacity=16)
    feed(single, lambda step: tuple(torch.cat(parts) for parts in zip(rank_rows(step, 0), rank_rows(step, 1))))
    expected = single.state_dict()
    _, single_losses, _ = single.losses_since(1)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["layout"] == single.layout == "compact"
        assert got["bank"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got["bank"][key], value) if torch.is_tensor(value) else got["bank"][key] == value
        assert torch.equal(got["posterior"], fit_gmm(single_losses).posterior)
    assert contents(single)[100] == (f32(rank_rows(0, 1)[1][0].item()), rank_rows(0, 1)[2][0].item())
