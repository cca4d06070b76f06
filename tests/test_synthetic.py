"""The synthetic generator: determinism, exact noise rates, ground truth that matches the pixels and captions."""
from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nlip_ds.data import synthetic
from nlip_ds.data.cli import main as cli_main
from nlip_ds.data.synthetic import COLORS, SHAPES, SplitSpec, make_scene, noise_types, relation, synthesize


def _samples(split_dir: Path) -> list[dict]:
    """Every sample of a split folder: {"key", "png", "txt", "json" (parsed), "cls"}."""
    out = []
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for key in sorted({name.split(".")[0] for name in members}):
            out.append({"key": key, "png": members[f"{key}.png"], "txt": members[f"{key}.txt"].decode(),
                        "json": json.loads(members[f"{key}.json"]), "cls": members[f"{key}.cls"].decode()})
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthesize(tmp_path / name, 40, seed=seed, shard_size=16)
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a["train/train-000000.tar"] != c["train/train-000000.tar"]


def test_noise_counts_are_exact_and_eval_splits_clean(synth_dir):
    summary = json.loads((synth_dir / "dataset.json").read_text())
    train = [s["json"]["noise_type"] for s in _samples(synth_dir / "train")]
    n = len(train)
    assert n == summary["splits"]["train"]["num_samples"] == 250
    assert train.count("incorrect") == round(0.3 * n) and train.count("incomplete") == round(0.2 * n)
    for split in ("val", "test"):
        assert {s["json"]["noise_type"] for s in _samples(synth_dir / split)} == {"clean"}


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 400), incorrect=st.floats(0, 1), share=st.floats(0, 1), seed=st.integers(0, 99))
def test_noise_assignment_rates(n, incorrect, share, seed):
    incomplete = (1 - incorrect) * share  # the two rates add up to at most 1
    types = noise_types(SplitSpec("train", n, 0, incorrect, incomplete, seed, 32))
    assert len(types) == n
    assert types.count("incorrect") == round(incorrect * n)
    assert types.count("incomplete") == min(round(incomplete * n), n - round(incorrect * n))
    assert abs(types.count("incomplete") - incomplete * n) <= 1


def test_ground_truth_matches_captions(synth_dir):
    samples = _samples(synth_dir / "train")
    clean_captions = {s["json"]["clean_caption"] for s in samples}
    for s in samples:
        meta = s["json"]
        assert s["key"] == f"{meta['sample_id']:09d}"
        assert meta["label"] == SHAPES.index(meta["objects"][0].split()[1]) == int(s["cls"])
        assert all(obj in meta["clean_caption"] for obj in meta["objects"])  # every object is described
        if meta["noise_type"] == "clean":
            assert s["txt"] == meta["clean_caption"]
        elif meta["noise_type"] == "incorrect":
            assert s["txt"] != meta["clean_caption"] and s["txt"] in clean_captions
        else:
            objects = meta["objects"]
            assert any(s["txt"].count(o) < objects.count(o) for o in objects)  # an object is left out


def test_ids_unique_across_splits_and_consecutive(synth_dir):
    ids = {split: [s["json"]["sample_id"] for s in _samples(synth_dir / split)] for split in ("train", "val", "test")}
    assert ids["train"] == list(range(250))
    assert ids["val"] == list(range(250, 290)) and ids["test"] == list(range(290, 330))


def test_vocabulary_files(synth_dir):
    assert len(SHAPES) >= 8 and len(COLORS) >= 8
    assert (synth_dir / "classes.txt").read_text().splitlines() == list(SHAPES)
    assert (synth_dir / "concepts.txt").read_text().splitlines() == list(SHAPES) + list(COLORS)
    index = json.loads((synth_dir / "train" / "index.json").read_text())
    assert index["num_samples"] == 250 and [s["num_samples"] for s in index["shards"]] == [30] * 8 + [10]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10 ** 6), size=st.sampled_from([16, 32, 64]))
def test_scene_layout(seed, size):
    scene = make_scene(random.Random(seed), size)
    objs = scene.objects
    assert 1 <= len(objs) <= 3
    assert all(objs[0].size > o.size for o in objs[1:])  # the class object is the unique largest
    for o in objs:
        assert o.size / 2 <= o.x <= size - o.size / 2 and o.size / 2 <= o.y <= size - o.size / 2
    for a in objs:
        for b in objs:
            if a is not b:
                gap = (a.size + b.size) / 2
                assert abs(a.x - b.x) >= gap or abs(a.y - b.y) >= gap


def test_images_are_rgb_and_objects_visible(tmp_path):
    synthesize(tmp_path, 12, image_size=48, val_samples=0, test_samples=0)
    for s in _samples(tmp_path / "train"):
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "RGB" and img.size == (48, 48)
        bright = (np.asarray(img).max(axis=2) > 130).mean()  # object colours are bright, backgrounds dark
        assert bright > 0.02
    assert not (tmp_path / "val").exists()


def test_relation_words():
    a, b = synthetic.Obj("circle", "red", 10, 16, 5), synthetic.Obj("square", "blue", 8, 16, 25)
    assert relation(a, b) == "above" and relation(b, a) == "below"
    c = synthetic.Obj("star", "green", 8, 2, 24)
    assert relation(c, b) == "to the left of" and relation(b, c) == "to the right of"


def test_web_strings_are_not_descriptive():
    rng = random.Random(0)
    words = set(SHAPES) | set(COLORS)
    for _ in range(50):
        assert not words & set(re.findall(r"[a-z]+", synthetic.web_string(rng).lower()))


@pytest.mark.parametrize("kwargs", [dict(incorrect_rate=1.2), dict(incorrect_rate=0.7, incomplete_rate=0.4),
                                    dict(image_size=8), dict(shard_size=0)])
def test_bad_arguments_refused(tmp_path, kwargs):
    with pytest.raises(ValueError):
        synthesize(tmp_path, 10, **kwargs)


def test_existing_dataset_kept_or_refused(tmp_path):
    synthesize(tmp_path, 10)
    shard = tmp_path / "train" / "train-000000.tar"
    before = shard.stat().st_mtime_ns
    synthesize(tmp_path, 10)  # same parameters: nothing to do
    assert shard.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize(tmp_path, 12)
    summary = synthesize(tmp_path, 12, overwrite=True)
    assert summary["splits"]["train"]["num_samples"] == 12


def test_cli_synth(tmp_path, capsys):
    assert cli_main(["data", "synth", "--out", str(tmp_path / "d"), "--num-samples", "20", "--shard-size", "8",
                     "--incorrect-rate", "0.5", "--incomplete-rate", "0"]) == 0
    out = capsys.readouterr().out
    assert "incorrect 10" in out and "train-{000000..000002}.tar" in out
    assert cli_main(["data", "synth", "--out", str(tmp_path / "d"), "--num-samples", "20",
                     "--incorrect-rate", "2"]) == 2
    assert "error:" in capsys.readouterr().err
