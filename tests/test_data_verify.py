"""`nlip-ds data inspect --verify` (issue 18): damaged shards are found, named and counted by the loader's
reasons; plain `inspect` warns when what it could read disagrees with index.json."""
from __future__ import annotations

import json

import pytest

from nlip_ds.data import shards
from nlip_ds.data.samples import SKIP_REASONS
from nlip_ds.data.verify import tar_truncated, verify_split

from conftest import png_bytes


def _sample(i: int, image: bytes | None = None, caption: str | None = "a red square") -> dict[str, bytes]:
    members = {"png": png_bytes(size=(64, 64)) if image is None else image,
               "json": shards.json_bytes({"sample_id": i, "noise_type": "clean"})}
    if caption is not None:
        members["txt"] = caption.encode()
    return members


def _dataset(root, per_shard=10, num_shards=3, damage=None) -> "Path":
    """root/train/ with `num_shards` shards of `per_shard` samples and an index; damage(i) -> members or None."""
    with shards.ShardWriter(root / "train", "train", per_shard) as writer:
        for i in range(per_shard * num_shards):
            sample = (damage(i) if damage else None) or _sample(i)
            writer.write(shards.sample_key(i), sample)
    return root / "train"


def _cut(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_intact_dataset_verifies(tmp_path, cli):
    split = _dataset(tmp_path)
    report = verify_split(shards.split_shards(split)["train"])
    assert report["damaged_shards"] == 0 and report["read"] == report["usable"] == report["index_samples"] == 30
    assert all(not s["truncated"] for s in report["shards"])
    status, out, _ = cli("data", "inspect", tmp_path, "--verify")
    assert status == 0 and "all shards intact" in out and "30 usable of 30 read, index lists 30" in out


def test_truncated_shard_is_reported(tmp_path, cli):
    split = _dataset(tmp_path)
    middle = split / "train-000001.tar"
    _cut(middle, middle.stat().st_size // 3)  # inside a member: the head stays readable
    assert tar_truncated(middle) and not tar_truncated(split / "train-000000.tar")
    report = verify_split(shards.split_shards(split)["train"])
    bad = report["shards"][1]
    assert bad["damaged"] and bad["truncated"] and bad["index"] == 10 and 0 < bad["read"] < 10
    assert bad["skipped"]["short_shard"] == 10 - bad["read"]
    assert set(bad["skipped"]) <= set(SKIP_REASONS)
    assert not report["shards"][0]["damaged"] and not report["shards"][2]["damaged"]
    status, out, _ = cli("data", "inspect", tmp_path, "--verify")
    assert status == 1 and "DAMAGED" in out and "train-000001.tar" in out and "truncated yes" in out
    status, out, _ = cli("data", "inspect", tmp_path, "--verify", "--json")
    assert status == 1 and json.loads(out)["splits"]["train"]["damaged_shards"] == 1


def test_cut_at_member_boundary_is_truncated(tmp_path):
    """No error reading it, every listed member there up to the cut: only the missing end marker tells."""
    split = _dataset(tmp_path, per_shard=4, num_shards=1)
    shard = split / "train-000000.tar"
    import tarfile
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    boundary = members[-1].offset_data + -(-members[-1].size // 512) * 512
    _cut(shard, boundary)
    assert tar_truncated(shard)
    report = verify_split([shard])
    assert report["shards"][0]["damaged"] and report["shards"][0]["read"] == 4


def test_bad_members_counted_by_the_loaders_reasons(tmp_path):
    def damage(i):
        if i == 3:
            return _sample(i, image=b"not an image")
        if i == 5:
            return _sample(i, caption=None)
        if i == 12:
            return _sample(4)  # the id of an earlier sample, under another key
        return None

    split = _dataset(tmp_path, damage=damage)
    report = verify_split(shards.split_shards(split)["train"])
    first, second = report["shards"][0], report["shards"][1]
    assert first["skipped"] == {"undecodable_image": 1, "missing_caption": 1} and first["usable"] == 8
    assert second["skipped"] == {"duplicate_key": 1} and second["read"] == 10 and second["usable"] == 9
    assert not first["truncated"] and not report["shards"][2]["damaged"]
    assert report["skipped"] == {"undecodable_image": 1, "missing_caption": 1, "duplicate_key": 1}


def test_missing_shard_is_damaged(tmp_path, cli):
    split = _dataset(tmp_path)
    (split / "train-000002.tar").unlink()
    report = verify_split([split / f"train-00000{i}.tar" for i in range(3)])
    gone = report["shards"][2]
    assert gone["damaged"] and gone["read"] == 0 and gone["skipped"]["short_shard"] == 10


def test_inspect_warns_when_index_disagrees(tmp_path, cli):
    split = _dataset(tmp_path)
    _cut(split / "train-000002.tar", 3000)
    status, out, err = cli("data", "inspect", tmp_path)
    assert status == 0 and "warning: [train] the index lists 30 samples but" in err and "--verify" in err
    assert len([line for line in err.splitlines() if "warning:" in line]) == 1
    status, _, err = cli("data", "inspect", tmp_path / "train" / "train-000000.tar")
    assert status == 0 and "warning" not in err


@pytest.mark.parametrize("index", [False, True])
def test_shards_without_index_verify_by_reading(tmp_path, shard_tools, index):
    path = shard_tools.tar(tmp_path / "s.tar", [shard_tools.sample(i) for i in range(4)])
    if index:
        (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": "s.tar", "num_samples": 6}]}))
    report = verify_split([path])["shards"][0]
    assert report["read"] == 4 and report["damaged"] == index and report["index"] == (6 if index else None)
