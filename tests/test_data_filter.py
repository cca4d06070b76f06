"""`nlip-ds data filter` (issue 18): the copy holds the pairs at or above the threshold, byte for byte, with
re-captioned pairs' captions replaced, a valid index, and the counts recorded."""
from __future__ import annotations

import json

import pytest

from nlip_ds.data import shards
from nlip_ds.data.scores import write_table

from conftest import png_bytes, read_members

N = 12


def _clean(i: int) -> float:
    return i / (N - 1)  # 0.0 ... 1.0


@pytest.fixture
def audited(tmp_path):
    """root/train with N pairs in shards of 5, and a scores file that covers all but the last pair."""
    with shards.ShardWriter(tmp_path / "data" / "train", "train", 5) as writer:
        for i in range(N):
            writer.write(shards.sample_key(i), {"png": png_bytes(color=(i, 0, 0)), "txt": f"caption {i}".encode(),
                                                "json": shards.json_bytes({"sample_id": i, "noise_type": "clean"})})
    paths = [tmp_path / "data" / "train" / f"train-00000{i // 5}.tar" for i in range(N - 1)]
    columns = {"sample_id": list(range(N - 1)), "shard": [str(p) for p in paths],
               "key": [shards.sample_key(i) for i in range(N - 1)], "clean_prob": [_clean(i) for i in range(N - 1)]}
    for fmt in ("parquet", "jsonl"):
        (tmp_path / fmt).mkdir()
        write_table(columns, tmp_path / fmt, fmt)
    return tmp_path


def _out_members(out) -> dict[str, bytes]:
    members = {}
    for s in json.loads((out / "train" / "index.json").read_text())["shards"]:
        members.update(read_members(out / "train" / s["name"]))
    return members


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_keeps_pairs_at_or_above_the_threshold(audited, cli, fmt):
    out = audited / "out"
    status, stdout, _ = cli("data", "filter", "--scores", audited / fmt / f"scores.{fmt}", "--data",
                            audited / "data" / "train", "--out", out, "--min-clean", "0.5", "--shard-size", "4")
    assert status == 0 and "kept 5 (0 re-captioned), dropped 6, unscored 1" in stdout
    members = _out_members(out)
    kept = sorted({name.split(".")[0] for name in members})
    assert kept == [shards.sample_key(i) for i in range(N - 1) if _clean(i) >= 0.5]
    original = read_members(audited / "data" / "train" / "train-000001.tar")
    for name in (f"{shards.sample_key(6)}.{e}" for e in ("png", "txt", "json")):
        assert members[name] == original[name]
    index = json.loads((out / "train" / "index.json").read_text())
    assert index["num_samples"] == 5 and [s["num_samples"] for s in index["shards"]] == [4, 1]
    record = json.loads((out / "filter.json").read_text())
    assert (record["kept"], record["dropped"], record["unscored"], record["recaptioned"]) == (5, 6, 1, 0)
    status, _, _ = cli("data", "inspect", out / "train", "--verify")
    assert status == 0


def test_recaptions_low_pairs_that_have_a_caption(audited, cli):
    captions = audited / "captions.jsonl"
    lines = [{"key": shards.sample_key(i), "shard": str(audited / "data" / "train" / "train-000000.tar"),
              "concepts": [], "caption": f"model caption {i}"} for i in (0, 1, 3)]
    captions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = audited / "out"
    status, stdout, _ = cli("data", "filter", "--scores", audited / "jsonl" / "scores.jsonl", "--data",
                            audited / "data" / "train", "--out", out, "--min-clean", "0.6",
                            "--recaption-below", "0.25", "--captions", captions)
    assert status == 0, stdout
    members = _out_members(out)
    keys = sorted({name.split(".")[0] for name in members})
    # 0, 1 re-captioned (below 0.25, captioned); 2 below 0.25 but no caption: dropped; 3 is 0.27: dropped
    assert keys == [shards.sample_key(i) for i in (0, 1, 7, 8, 9, 10)]
    assert members[f"{shards.sample_key(1)}.txt"] == b"model caption 1"
    meta = json.loads(members[f"{shards.sample_key(1)}.json"])
    assert meta == {"sample_id": 1, "original_caption": "caption 1", "original_noise_type": "clean"}
    record = json.loads((out / "filter.json").read_text())
    assert (record["kept"], record["recaptioned"], record["dropped"], record["unscored"]) == (6, 2, 5, 1)


@pytest.mark.parametrize("args, message", [
    (["--min-clean", "1.5"], "--min-clean"),
    (["--recaption-below", "0.3"], "go together"),
    (["--recaption-below", "0.3", "--captions", "/nonexistent/c.jsonl"], "/nonexistent/c.jsonl"),
])
def test_bad_options_are_one_error_line(audited, cli, args, message):
    status, _, err = cli("data", "filter", "--scores", audited / "jsonl" / "scores.jsonl", "--data",
                         audited / "data" / "train", "--out", audited / "out", *args)
    assert status == 2 and message in err and "Traceback" not in err
    assert not (audited / "out").exists()


def test_scores_without_the_needed_columns_are_refused(audited, cli):
    write_table({"key": ["x"], "loss": [1.0]}, audited, "jsonl")
    status, _, err = cli("data", "filter", "--scores", audited / "scores.jsonl", "--data",
                         audited / "data" / "train", "--out", audited / "out")
    assert status == 2 and "lacks column(s) ['shard', 'clean_prob']" in err
