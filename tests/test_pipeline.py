"""The loader: exact-epoch coverage across simulated ranks and workers, resampling, skip-and-count, resume."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlip_ds.data import pipeline
from nlip_ds.data.pipeline import LoaderSpec, build_loader, plan_exact
from nlip_ds.data.shards import Shard

B, T, PX = 16, 24, 32


def _loader(cfg, tok, split="train", train=True, **kw):
    kw = {"image_size": PX, "batch_size": B, "context_length": T, "seed": 7, **kw}
    return build_loader(cfg, split, tokenizer=tok, train=train, **kw)


def _epoch(loader) -> list[dict]:
    return list(loader)


def _ids(batches, pads=False) -> list[int]:
    return [i for b in batches for i, p in zip(b["sample_id"].tolist(), b["pad"].tolist()) if p == pads]


def _ground_truth(synth_dir, split="train") -> dict[int, dict]:
    """sample id -> json metadata, read from the shards independently of the loader."""
    import tarfile

    out = {}
    for shard in sorted((synth_dir / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    out[meta["sample_id"]] = meta
    return out


@pytest.mark.parametrize("train", [True, False])
def test_exact_epoch_two_ranks_two_workers(data_cfg, synth_tokenizer, train):
    ranks = [_loader(data_cfg(), synth_tokenizer, train=train, rank=r, world_size=2, workers=2) for r in (0, 1)]
    epochs = [_epoch(loader) for loader in ranks]
    real = Counter(i for batches in epochs for i in _ids(batches))
    assert sorted(real) == list(range(250)) and set(real.values()) == {1}  # every id exactly once
    sizes = [[len(b["sample_id"]) for b in batches] for batches in epochs]
    assert sizes[0] == sizes[1] and len(sizes[0]) == ranks[0].num_batches == ranks[1].num_batches
    assert all(s == B for s in sizes[0][:-1]) and 0 < sizes[0][-1] <= B  # only the last batch is short
    pads = [_ids(batches, pads=True) for batches in epochs]
    assert sum(map(len, pads)) == 2 * ranks[0].plan().rank_samples - 250 > 0  # 9 shards on 2 ranks: pads
    for loader, batches, rank_pads in zip(ranks, epochs, pads):
        assert set(rank_pads) <= set(_ids(batches))  # a rank repeats its own samples
        assert loader.stats()["extra_pads"] == 0 and loader.stats()["pad_samples"] == len(rank_pads)


def test_batch_fields_match_ground_truth(data_cfg, synth_tokenizer, synth_dir):
    truth = _ground_truth(synth_dir)
    batch = next(iter(_loader(data_cfg(), synth_tokenizer)))
    assert batch["image"].shape == (B, 3, PX, PX) and batch["image"].dtype == torch.uint8  # normalized on device
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (B, T)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["pad"].dtype == torch.bool and not batch["pad"].any()
    codes = {"clean": 0, "incorrect": 1, "incomplete": 2}
    for i, sid in enumerate(batch["sample_id"].tolist()):
        meta = truth[sid]
        assert batch["label"][i] == meta["label"] and batch["noise_type"][i] == codes[meta["noise_type"]]
        assert batch["objects"][i] == meta["objects"]
        decoded = synth_tokenizer.decode(batch["input_ids"][i:i + 1])[0].replace(" ", "")
        assert len(decoded) > 3 and batch["caption"][i].lower().replace(" ", "").startswith(decoded)
    assert batch["image"].float().std() > 10  # not constant


def test_eval_order_is_the_shard_order(data_cfg, synth_tokenizer):
    batches = _epoch(_loader(data_cfg(), synth_tokenizer, split="val", train=False))
    assert _ids(batches) == list(range(250, 290))


def test_same_seed_epoch_rank_same_batches_and_epochs_differ(data_cfg, synth_tokenizer):
    def run(epoch, workers):
        loader = _loader(data_cfg(), synth_tokenizer, rank=1, world_size=2, workers=workers)
        loader.set_epoch(epoch)
        return _epoch(loader)

    a, b = run(3, 2), run(3, 2)
    assert all(torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] for x, y in zip(a, b))
    assert _ids(a) == _ids(b)
    assert _ids(run(4, 2)) != _ids(a)
    assert sorted(_ids(run(4, 2))) == sorted(_ids(run(4, 0)))  # the rank's share does not depend on workers


def test_workers_refused_when_shards_are_too_few(data_cfg, synth_tokenizer):
    with pytest.raises(ValueError, match=r"2 shards cannot feed 2 ranks x 2 workers.*at least 4"):
        _loader(data_cfg(), synth_tokenizer, split="val", train=False, world_size=2, workers=2)


def test_unset_split_refused(data_cfg, synth_tokenizer):
    with pytest.raises(ValueError, match="data.val is not set"):
        _loader(data_cfg(val=None), synth_tokenizer, split="val")


def test_resampled_mode(data_cfg, synth_dir, synth_tokenizer):
    cfg = data_cfg(resampled=True, samples_per_epoch=200)
    loaders = [_loader(cfg, synth_tokenizer, rank=r, world_size=2, workers=2) for r in (0, 1)]
    epochs = [_epoch(loader) for loader in loaders]
    for loader, batches in zip(loaders, epochs):
        assert loader.num_batches == 200 // (2 * B) == len(batches)
        assert all(len(b["sample_id"]) == B and not b["pad"].any() for b in batches)
    ids = _ids(epochs[0]) + _ids(epochs[1])
    assert set(ids) <= set(range(250)) and len(set(ids)) < len(ids)  # drawn with replacement
    assert _ids(_epoch(loaders[0])) == _ids(epochs[0])  # deterministic


def test_resampled_source_weights(data_cfg, synth_dir, synth_tokenizer):
    pattern = f"{synth_dir}/train/train-{{000000..000003}}.tar::{synth_dir}/train/train-{{000004..000008}}.tar"
    cfg = data_cfg(train=pattern, resampled=True, samples_per_epoch=96, train_weights=[0.0, 1.0])
    assert min(_ids(_epoch(_loader(cfg, synth_tokenizer, workers=0)))) >= 120  # source 2 holds ids 120..249
    with pytest.raises(ValueError, match="1 weights for 2"):
        _loader(data_cfg(train=pattern, resampled=True, samples_per_epoch=96, train_weights=[1.0]),
                synth_tokenizer)


@pytest.fixture
def corrupt_dir(tmp_path, shard_tools):
    """Three shards: intact (ids 0-5), one with an undecodable image, a missing caption and a bad JSON
    (ids 10-15), and one truncated inside a member (ids 20-29), with an index.json giving full counts."""
    shard_tools.tar(tmp_path / "d-000000.tar", [shard_tools.sample(i) for i in range(6)])
    bad = [shard_tools.sample(i) for i in range(10, 16)]
    bad[1]["png"] = b"\x89PNG\r\n\x1a\n garbage"
    del bad[2]["txt"]
    bad[3]["json"] = b"{not json"
    shard_tools.tar(tmp_path / "d-000001.tar", bad)
    big = [dict(shard_tools.sample(i), png=shard_tools.png(size=(64, 64))) for i in range(20, 30)]
    full = shard_tools.tar(tmp_path / "full.tar", big).read_bytes()
    (tmp_path / "d-000002.tar").write_bytes(full[:len(full) // 2 + 700])  # not on a 512-byte block boundary
    index = {"shards": [{"name": f"d-00000{i}.tar", "num_samples": n} for i, n in enumerate((6, 6, 10))],
             "num_samples": 22}
    (tmp_path / "index.json").write_text(json.dumps(index))
    return tmp_path


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_tar_and_image_skipped_and_counted(corrupt_dir, data_cfg, synth_tokenizer, workers):
    cfg = data_cfg(train=f"{corrupt_dir}/d-{{000000..000002}}.tar", max_skip_rate=1.0)
    loader = _loader(cfg, synth_tokenizer, batch_size=4, workers=workers, train=False)
    batches = _epoch(loader)
    real = _ids(batches)
    assert len(real) == len(set(real)) and set(range(6)) | {10, 14, 15} <= set(real)
    assert not {11, 12, 13} & set(real)
    assert len(batches) == loader.num_batches == math.ceil(22 / 4)  # shortfall filled with pads
    skipped = loader.stats()["skipped"]
    assert skipped["undecodable_image"] == 1 and skipped["missing_caption"] == 1
    assert skipped["bad_metadata"] == 1 and skipped["corrupt_tar"] == 1
    assert loader.stats()["pad_samples"] == 22 - len(real)


def test_skip_rate_limit(corrupt_dir, data_cfg, synth_tokenizer):
    cfg = data_cfg(train=f"{corrupt_dir}/d-000001.tar", max_skip_rate=0.2)
    with pytest.raises(RuntimeError, match="above data.max_skip_rate=0.2"):
        _epoch(_loader(cfg, synth_tokenizer, batch_size=4, train=False))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_next_sample(data_cfg, synth_tokenizer, workers):
    def make():
        loader = _loader(data_cfg(), synth_tokenizer, rank=0, world_size=2, workers=workers)
        loader.set_epoch(2)
        return loader

    full = _epoch(make())
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint files)
    del it
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the train loop calls it at the start of the epoch: the position is kept
    rest = _epoch(resumed)
    assert len(head) + len(rest) == len(full) == resumed.num_batches
    for a, b in zip(head + rest, full):
        assert torch.equal(a["sample_id"], b["sample_id"]) and torch.equal(a["image"], b["image"])
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pad"], b["pad"])


def test_resume_does_not_decode_consumed_samples(data_cfg, synth_tokenizer, monkeypatch):
    loader = _loader(data_cfg(), synth_tokenizer)
    it = iter(loader)
    for _ in range(8):
        next(it)
    state = loader.state_dict()
    del it
    calls = []
    real_decode = pipeline.decode_sample
    monkeypatch.setattr(pipeline, "decode_sample", lambda *a: calls.append(1) or real_decode(*a))
    resumed = _loader(data_cfg(), synth_tokenizer)
    resumed.load_state_dict(state)
    remaining = sum(len(b["sample_id"]) for b in resumed)
    assert remaining == 250 - 8 * B
    assert len(calls) == remaining  # the 128 consumed samples were read past, not decoded


def test_resume_with_skipped_samples_keeps_counts(corrupt_dir, data_cfg, synth_tokenizer):
    cfg = data_cfg(train=f"{corrupt_dir}/d-{{000000..000002}}.tar", max_skip_rate=1.0)
    full = _loader(cfg, synth_tokenizer, batch_size=4, train=False)
    expected_ids, expected_stats = _ids(_epoch(full)), full.stats()
    first = _loader(cfg, synth_tokenizer, batch_size=4, train=False)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    del it
    resumed = _loader(cfg, synth_tokenizer, batch_size=4, train=False)
    resumed.load_state_dict(state)
    assert _ids(head) + _ids(_epoch(resumed)) == expected_ids
    assert resumed.stats() == expected_stats


def test_state_checks(data_cfg, synth_tokenizer):
    loader = _loader(data_cfg(), synth_tokenizer, rank=0, world_size=2)
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["batches"] == 0
    other = _loader(data_cfg(), synth_tokenizer, rank=0, world_size=1)
    with pytest.raises(ValueError, match="world_size 1 vs 2"):
        other.load_state_dict(state)
    loader.load_state_dict(dict(state, epoch=5, batches=2))
    loader.set_epoch(6)  # another epoch: the restored position is dropped
    assert loader.state_dict()["epoch"] == 6 and loader.state_dict()["batches"] == 0


def _spec(counts, world, workers, batch):
    shards = tuple(Shard(path=f"s{i}.tar", num_samples=n) for i, n in enumerate(counts))
    return lambda rank: LoaderSpec(
        split="train", sources=(shards,), weights=(1.0,), tokenizer=None, image_size=8, batch_size=batch,
        context_length=4, train=True, seed=1, shuffle_buffer=0, crop_scale_min=0.5, max_pixels=10 ** 6,
        max_skip_rate=0.0, resampled=False, samples_per_epoch=None, rank=rank, world_size=world,
        workers=workers)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), world=st.integers(1, 4), workers=st.integers(0, 3), batch=st.integers(1, 9),
       epoch=st.integers(0, 5))
def test_exact_plan_covers_every_shard_once_with_equal_ranks(data, world, workers, batch, epoch):
    counts = data.draw(st.lists(st.integers(1, 40), min_size=world * max(1, workers), max_size=20))
    spec = _spec(counts, world, workers, batch)
    plans = [plan_exact(spec(r), epoch) for r in range(world)]
    read = [s.path for p in plans for shards in p.worker_shards for s in shards]
    assert sorted(read) == sorted(f"s{i}.tar" for i in range(len(counts)))
    assert len({p.rank_samples for p in plans}) == 1 and len({p.num_batches for p in plans}) == 1
    for p in plans:
        own = sum(s.num_samples for shards in p.worker_shards for s in shards)
        assert own + sum(p.pads) == p.rank_samples and min(p.pads) >= 0
        assert p.num_batches == math.ceil(p.rank_samples / batch)


@pytest.mark.parametrize("resampled", [False, True])
def test_unreadable_data_stops_with_an_error_instead_of_hanging(tmp_path, data_cfg, synth_tokenizer, resampled):
    (tmp_path / "x-000000.tar").write_bytes(b"this is not a tar file" * 40)
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": "x-000000.tar", "num_samples": 5}],
                                                     "num_samples": 5}))
    cfg = data_cfg(train=str(tmp_path), resampled=resampled, samples_per_epoch=8, max_skip_rate=1.0)
    with pytest.raises(RuntimeError, match="no readable sample"):
        _epoch(_loader(cfg, synth_tokenizer, batch_size=4))
