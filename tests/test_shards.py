"""Shards from user data: JSONL and image-folder conversion with bad items, the report, inspect, the CLI."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from nlip_ds.data import shards
from nlip_ds.data.cli import main as cli_main


def _image(path: Path, fmt: str, color=(10, 200, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 9), color).save(path, format=fmt)
    return path.read_bytes()


@pytest.fixture
def pairs(tmp_path):
    """A JSONL with good lines (png, jpg, webp, bmp) and every kind of bad line; returns (path, expectations)."""
    src = tmp_path / "src"
    kept = {0: _image(src / "a.png", "PNG"), 2: _image(src / "img" / "b.jpg", "JPEG"),
            9: _image(src / "c.webp", "WEBP")}
    _image(src / "d.bmp", "BMP")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    lines = [json.dumps({"image": "a.png", "caption": "  a green box "}),           # 0 kept
             "",                                                                   # 1 blank: ignored
             json.dumps({"image": "img/b.jpg", "caption": "ünïcode ✓"}),           # 2 kept
             "{oops",                                                              # 3 malformed
             json.dumps({"image": "missing.png", "caption": "x"}),                 # 4 missing image
             json.dumps({"image": "broken.png", "caption": "x"}),                  # 5 unreadable image
             json.dumps({"image": "a.png", "caption": " \t"}),                     # 6 empty caption
             json.dumps({"caption": "no image"}),                                  # 7 malformed
             json.dumps({"image": "d.bmp", "caption": "bitmap"}),                  # 8 kept as PNG
             json.dumps({"image": str(src / "c.webp"), "caption": "absolute"})]    # 9 kept
    raw = "\n".join(lines).encode() + b'\n{"image": "a.png", "caption": "bad \xff byte"}\n'  # 10 non-UTF-8
    path = src / "pairs.jsonl"
    path.write_bytes(raw)
    return path, kept


def test_jsonl_round_trip_with_bad_lines(pairs, tmp_path, shard_tools):
    path, kept = pairs
    report = shards.convert_jsonl(path, tmp_path / "out", shard_size=2)
    assert report["num_samples"] == 4
    assert report["skipped_by_reason"] == {"empty_caption": 1, "malformed_line": 2, "missing_image": 1,
                                           "non_utf8_caption": 1, "unreadable_image": 1}
    assert [s["item"] for s in report["skipped"]] == [f"line {n}" for n in (4, 5, 6, 7, 8, 11)]
    assert report.pop("report_path") == str((tmp_path / "out" / "report.json").resolve())
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    members = {}
    for shard in ("train-000000.tar", "train-000001.tar"):
        members.update(shard_tools.members(tmp_path / "out" / "train" / shard))
    assert members["000000000.png"] == kept[0] and members["000000002.jpg"] == kept[2]
    assert members["000000009.webp"] == kept[9]
    assert Image.open(io.BytesIO(members["000000008.png"])).size == (12, 9)  # BMP re-encoded as PNG
    assert members["000000000.txt"] == b"a green box" and members["000000002.txt"].decode() == "ünïcode ✓"
    assert json.loads(members["000000002.json"]) == {"sample_id": 2, "source": "img/b.jpg"}
    index = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    assert index == {"shards": [{"name": "train-000000.tar", "num_samples": 2},
                                {"name": "train-000001.tar", "num_samples": 2}], "num_samples": 4}


def test_ids_offset_and_split_name(pairs, tmp_path):
    path, _ = pairs
    report = shards.convert_jsonl(path, tmp_path / "out", split="val", start_id=1000)
    assert report["report_path"].endswith("report-val.json")
    summary = shards.inspect(tmp_path / "out" / "val")
    assert sorted(e["sample_id"] for e in summary["splits"]["val"]["examples"]) == [1000, 1002, 1008]


def test_writes_only_inside_out_dir(pairs, tmp_path):
    path, _ = pairs
    before = {p for p in tmp_path.rglob("*")}
    shards.convert_jsonl(path, tmp_path / "out")
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(tmp_path / "out" in p.parents or p == tmp_path / "out" for p in new)
    with pytest.raises(ValueError, match="outside"):
        shards.convert_jsonl(path, tmp_path / "out2", report="../escape.json")
    assert not (tmp_path / "out2").exists()  # refused before any work
    with pytest.raises(ValueError, match="split name"):
        shards.convert_jsonl(path, tmp_path / "out3", split="../escape")
    assert not (tmp_path / "escape.json").exists() and not (tmp_path / "escape").exists()


def test_existing_shards_refused_then_overwritten(pairs, tmp_path):
    path, _ = pairs
    shards.convert_jsonl(path, tmp_path / "out", shard_size=1)
    with pytest.raises(FileExistsError):
        shards.convert_jsonl(path, tmp_path / "out")
    shards.convert_jsonl(path, tmp_path / "out", shard_size=10, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out" / "train").glob("*.tar")) == ["train-000000.tar"]


def test_image_folder_with_sidecars(tmp_path, shard_tools):
    root = tmp_path / "photos"
    _image(root / "x" / "one.png", "PNG")
    (root / "x" / "one.txt").write_text("first photo")
    _image(root / "two.jpg", "JPEG")  # no sidecar
    _image(root / "zz.png", "PNG")
    (root / "zz.txt").write_bytes(b"\xff\xfe broken")
    _image(root / "y.png", "PNG")
    (root / "y.txt").write_text("why")
    report = shards.convert_image_folder(root, tmp_path / "out")
    assert report["num_samples"] == 2
    assert report["skipped_by_reason"] == {"missing_caption": 1, "non_utf8_caption": 1}
    members = shard_tools.members(tmp_path / "out" / "train" / "train-000000.tar")
    assert members["000000001.txt"] == b"first photo"  # sorted: two.jpg, x/one.png, y.png, zz.png
    assert json.loads(members["000000002.json"])["source"] == "y.png"


def test_writer_is_deterministic(tmp_path):
    for name in ("a", "b"):
        with shards.ShardWriter(tmp_path / name, "train", 3) as writer:
            for i in range(5):
                writer.write(shards.sample_key(i), {"txt": f"caption {i}".encode(), "png": b"x" * i})
    for shard in ("train-000000.tar", "train-000001.tar", "index.json"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_inspect_synthetic(synth_dir):
    summary = shards.inspect(synth_dir, max_examples=2)
    assert list(summary["splits"]) == ["train", "val", "test"]
    train = summary["splits"]["train"]
    assert train["num_samples"] == 250 and train["num_shards"] == 9
    assert train["noise_types"] == {"clean": 125, "incomplete": 50, "incorrect": 75}
    assert len(train["examples"]) == 2 and 1 <= train["caption_words"]["min"] <= train["caption_words"]["max"]
    text = shards.format_inspect(summary)
    assert "[train] 250 samples in 9 shards" in text and "incorrect 75 (30.0%)" in text


def test_inspect_pattern_counts_read_errors(synth_dir, tmp_path):
    broken = tmp_path / "broken-000001.tar"
    broken.write_bytes((synth_dir / "val" / "val-000000.tar").read_bytes()[:20000])  # cut inside a member
    pattern = f"{synth_dir}/val/val-000000.tar::{broken}"
    summary = shards.inspect(pattern)["splits"]["shards"]
    assert summary["read_errors"] == {"unreadable_tar": 1} and 30 < summary["num_samples"] < 60


def test_expand_pattern(synth_dir):
    sources = shards.expand_pattern(f"{synth_dir}/train/train-{{000000..000002}}.tar::{synth_dir}/val")
    assert [len(s) for s in sources] == [3, 2]
    with pytest.raises(FileNotFoundError, match="train-000098.tar"):
        shards.expand_pattern(f"{synth_dir}/train/train-{{000098..000099}}.tar")
    counts = shards.shard_counts(sources[0])
    assert [c.num_samples for c in counts] == [30, 30, 30]


def test_count_samples_without_index(tmp_path, shard_tools):
    shard_tools.tar(tmp_path / "s.tar", [shard_tools.sample(i) for i in range(4)])
    assert shards.shard_counts([tmp_path / "s.tar"])[0].num_samples == 4


def test_cli_shards_and_inspect(pairs, tmp_path, capsys):
    path, _ = pairs
    assert cli_main(["data", "shards", "--input", str(path), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 samples in 1 shards" in out and "malformed_line: 2" in out
    assert cli_main(["data", "inspect", str(tmp_path / "o"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["num_samples"] == 4


@pytest.mark.parametrize("argv", [["shards", "--input", "/nonexistent/p.jsonl", "--out", "o"],
                                  ["shards", "--image-folder", "/nonexistent", "--out", "o"],
                                  ["inspect", "/nonexistent/dir"]])
def test_cli_bad_paths_give_clean_errors(argv, capsys):
    assert cli_main(["data", *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "/nonexistent" in err and "Traceback" not in err
