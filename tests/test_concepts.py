"""Concept vocabulary (loading, building from captions), the concept cache (refresh, retrieval, prefix,
checkpoint state), and retrieval of the true objects of synthetic images by a briefly trained tiny model."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from nlip_ds.completion.concepts import DEFAULT_VOCABULARY, ConceptCache, load_vocabulary
from nlip_ds.data.vocabulary import build_vocabulary, caption_words, is_file_like

# ------------------------------------------------------------------------------------------------ vocabulary


def test_load_vocabulary_skips_comments_blanks_and_duplicates(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("# objects\ndog\n\n  cat  \ndog\nteddy bear  # a phrase\n")
    assert load_vocabulary(path) == ["dog", "cat", "teddy bear"]


def test_load_vocabulary_names_a_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_vocabulary(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="empty.txt holds no names"):
        load_vocabulary(tmp_path / "empty.txt")


def test_the_default_vocabulary_ships_generic_object_names():
    names = load_vocabulary(None)
    assert names == load_vocabulary(DEFAULT_VOCABULARY)
    assert len(names) > 300 and len(set(names)) == len(names)
    assert {"dog", "car", "pizza", "teddy bear"} <= set(names)


def test_file_like_tokens():
    for token in ("IMG_0042.jpg", "DSC01234.JPG", "download.jpg", "(3).png", "20190304", "http://x.org/a",
                  "www.site.com", "photo_2019.png", "img_1234"):
        assert is_file_like(token), token
    for token in ("dog", "teddy", "close-up", "cat's", "(dog)"):
        assert not is_file_like(token), token


def test_caption_words_drop_stop_words_and_file_names():
    assert caption_words("IMG_0042.jpg: A Dog's bed, by the window!") == [None, None, "dog", "bed", None, None,
                                                                           "window"]


def test_build_vocabulary_counts_orders_and_finds_phrases():
    captions = ["a dog on a bed", "IMG_0042.jpg", "the dog and the cat", "a teddy bear on a bed",
                "teddy bear with a cat http://x.com/a.png", "a photo of my cat", "DSC0001.JPG dog", "zebra"]
    # dog 3, cat 3, bed 2, 'teddy bear' 2 (always together: one name, its words not counted alone), zebra 1
    assert build_vocabulary(captions, top_k=10) == ["cat", "dog", "bed", "teddy bear"]
    assert build_vocabulary(captions, top_k=2) == ["cat", "dog"]
    assert build_vocabulary(captions, top_k=10, min_count=1)[-1] == "zebra"
    assert "teddy bear" not in build_vocabulary(captions, top_k=10, max_words=1)
    assert build_vocabulary(list(reversed(captions)), top_k=10) == ["cat", "dog", "bed", "teddy bear"]


def test_build_vocabulary_does_not_join_words_across_a_file_name():
    captions = ["red IMG_1.jpg car", "red IMG_2.jpg car", "red car"]
    assert build_vocabulary(captions, top_k=5, min_count=1) == ["car", "red"]


def test_builder_recovers_the_synthetic_vocabulary(synth_dir):
    """The synthetic captions name shapes and colours; the only other frequent word is 'dark' (from "on a dark
    background", as frequent as a colour), and the web string "my holiday" leaves 'holiday' (2 in 250)."""
    from nlip_ds.data.tokenizer import training_captions

    concepts = set(load_vocabulary(synth_dir / "concepts.txt"))
    names = build_vocabulary(training_captions(str(synth_dir / "train")), top_k=1000)
    assert set(names[:len(concepts) + 1]) == concepts | {"dark"}
    assert set(names) - concepts <= {"dark", "holiday"}


# ------------------------------------------------------------------------------------------------ the cache


class FakeTokenizer:
    """Encodes a prompt as the indices of its words in a fixed list (enough for refresh and prefix)."""

    pad_id = 0

    def __init__(self, words):
        self.words = ["[PAD]"] + list(words)

    def encode(self, texts, max_length):
        rows = [[self.words.index(w) for w in t.split()][:max_length] for t in texts]
        ids = torch.tensor([r + [0] * (max_length - len(r)) for r in rows])
        return ids, (ids != 0).long()

    def encode_concepts(self, lists, max_length):
        return self.encode([" ".join(c) for c in lists], max_length)


def embedder(vectors: dict[int, list[float]], calls: list):
    """encode_text(ids, mask) -> the vector of each row's last token (unnormalized), recording call sizes."""
    def encode_text(ids, mask):
        calls.append((ids.shape[0], ids.shape[1]))
        last = ids.gather(1, (mask.sum(1, keepdim=True) - 1))[:, 0]
        return torch.tensor([vectors[int(i)] for i in last])
    return encode_text


@pytest.fixture
def cache_and_tokenizer():
    names = ["cat", "dog", "car", "tree", "boat"]
    tok = FakeTokenizer(["a", "photo", "of"] + names)
    vectors = {4: [1, 0, 0], 5: [0, 2, 0], 6: [0, 0, 3], 7: [1, 1, 0], 8: [0, 1, 1]}
    return ConceptCache(names, template="a photo of {}"), tok, vectors


def test_refresh_embeds_in_fixed_chunks_and_normalizes(cache_and_tokenizer):
    cache, tok, vectors = cache_and_tokenizer
    assert not cache.ready
    calls = []
    cache.refresh(embedder(vectors, calls), tok, "cpu", batch_size=2, max_length=16, step=7)
    assert calls == [(2, 4), (2, 4), (1, 4)]  # ceil(5 / 2) calls; padding beyond the longest prompt cut
    assert cache.ready and cache.refreshed_at_step == 7
    expected = torch.nn.functional.normalize(torch.tensor([vectors[i] for i in range(4, 9)], dtype=torch.float),
                                             dim=1)
    torch.testing.assert_close(cache.embeddings, expected)


def test_retrieve_gives_exact_top_k_order_and_clips_k(cache_and_tokenizer):
    cache, tok, vectors = cache_and_tokenizer
    cache.refresh(embedder(vectors, []), tok, "cpu")
    images = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.0, -1.0, -0.5]])
    # cosines row 0: cat .995, tree .774, dog .0995; row 1: car .981, boat .832, dog .196; row 2: cat 0,
    # car -.447, tree -.632
    assert cache.retrieve(images, 3).tolist() == [[0, 3, 1], [2, 4, 1], [0, 2, 3]]
    assert cache.retrieve(images * 5, 3).tolist() == [[0, 3, 1], [2, 4, 1], [0, 2, 3]]  # scale-free
    assert cache.retrieve(images, 99).shape == (3, 5)
    assert cache.names(cache.retrieve(images[:1], 2)) == [["cat", "tree"]]
    # tree and boat tie at 0.816, cat, dog and car at 0.577: each tie goes to the lower index
    assert cache.retrieve(torch.tensor([[1.0, 1.0, 1.0]]), 5).tolist() == [[3, 4, 0, 1, 2]]


def test_prefix_uses_the_tokenizers_concept_encoding(cache_and_tokenizer):
    cache, tok, vectors = cache_and_tokenizer
    cache.refresh(embedder(vectors, []), tok, "cpu")
    ids, mask = cache.prefix(torch.tensor([[1, 0], [4, 2]]), tok, max_length=3)
    expected_ids, expected_mask = tok.encode_concepts([["dog", "cat"], ["boat", "car"]], 3)
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)


def test_retrieval_before_the_first_refresh_is_refused(cache_and_tokenizer):
    cache, tok, _ = cache_and_tokenizer
    with pytest.raises(RuntimeError, match="refresh"):
        cache.retrieve(torch.zeros(1, 3), 2)
    with pytest.raises(RuntimeError, match="refresh"):
        cache.prefix(torch.zeros(1, 2, dtype=torch.long), tok, 4)


def test_state_dict_round_trip_and_vocabulary_mismatch(cache_and_tokenizer):
    cache, tok, vectors = cache_and_tokenizer
    empty = ConceptCache(cache.vocabulary, cache.template)
    empty.load_state_dict(cache.state_dict())  # saved before any refresh: stays empty
    assert not empty.ready
    cache.refresh(embedder(vectors, []), tok, "cpu", step=3)
    restored = ConceptCache(cache.vocabulary, cache.template)
    restored.load_state_dict(cache.state_dict())
    assert restored.ready and restored.refreshed_at_step == 3
    assert torch.equal(restored.embeddings, cache.embeddings)
    other = ConceptCache(["cat", "dog", "bus"], cache.template)
    with pytest.raises(ValueError, match="vocabulary .*differs.* entry 2"):
        other.load_state_dict(cache.state_dict())
    retemplated = ConceptCache(cache.vocabulary, "a drawing of {}")
    retemplated.load_state_dict(cache.state_dict())
    assert not retemplated.ready


def test_cache_refuses_bad_construction():
    with pytest.raises(ValueError, match="unique"):
        ConceptCache(["a", "a"])
    with pytest.raises(ValueError, match="template"):
        ConceptCache(["a"], template="a photo")


# ------------------------------------------------------------------------------------------------ the CLI


def test_data_concepts_command_writes_the_vocabulary(synth_dir, tmp_path, capsys):
    from nlip_ds.cli import main

    out = tmp_path / "concepts.txt"
    assert main(["data", "concepts", "--shards", str(synth_dir / "train"), "--out", str(out), "--top-k", "17"]) == 0
    names = load_vocabulary(out)
    assert set(names) == set(load_vocabulary(synth_dir / "concepts.txt")) | {"dark"}
    printed = capsys.readouterr().out
    assert "read 250 captions" in printed and f"wrote 17 concept names to {out}" in printed
    assert main(["data", "concepts", "--shards", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'none'} does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ trained model


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """100 steps of the tiny model (batch 32, one process) on 400 clean synthetic pairs: about a minute on 2
    cores. Clean captions because this measures retrieval, not noise robustness."""
    from nlip_ds.data.synthetic import synthesize

    base = tmp_path_factory.mktemp("concepts_run")
    data = base / "data"
    synthesize(data, 400, incorrect_rate=0.0, incomplete_rate=0.0, val_samples=0, test_samples=160,
               shard_size=100, seed=5)
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
           f"data.train={data / 'train'}", f"data.test={data / 'test'}", "data.val=null",
           f"data.tokenizer={base / 'tokenizer'}", f"train.output_dir={base / 'run'}", "data.workers=0",
           "train.micro_batch_size=32", "train.max_steps=100", "train.epochs=100", "noise.enabled=false",
           "eval.enabled=false", "monitor.progress=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="2", PYTHONPATH=str(root))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return base / "run", data


def true_objects(split_dir: Path) -> dict[str, list[str]]:
    """'shard:key' -> the object names ("red circle") the synthetic .json stores."""
    objects = {}
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    objects[f"{shard}:{member.name[:-5]}"] = meta["objects"]
    return objects


@pytest.mark.slow
def test_retrieval_finds_the_true_objects(short_run):
    """Top-5 recall of the words of each test image's true objects (its colours and shapes, 16 concepts):
    measured 0.556 and 0.558 in two runs over 160 test images after 100 steps (colours 0.752 and 0.729,
    shapes 0.360), chance 5/16 = 0.3125. The colours carry it: the shapes are still near chance after so
    short a training (150 steps at batch 64 did not lift them either)."""
    from nlip_ds.data.synthetic import COLORS, SHAPES
    from nlip_ds.eval.checkpoint import load_for_eval
    from nlip_ds.eval.data import Problems, image_batches, shard_records

    run, data = short_run
    loaded = load_for_eval(run)
    model, tokenizer = loaded.model, loaded.tokenizer
    cache = ConceptCache(load_vocabulary(data / "concepts.txt"))
    cache.refresh(model.encode_text, tokenizer, "cpu", max_length=model.config.text.context_length)
    truth = true_objects(data / "test")
    hits = {"all": [0, 0], "colour": [0, 0], "shape": [0, 0]}
    for images, kept in image_batches(shard_records(str(data / "test")), model.config.vision.image_size, 64,
                                      Problems()):
        with torch.no_grad():
            top = cache.retrieve(model.encode_image(images), 5)
        found, total = cache.recall(top, [truth[record.where] for record in kept])  # what training logs
        hits["all"] = [hits["all"][0] + found, hits["all"][1] + total]
        for names, record in zip(cache.names(top), kept):
            words = {w for name in truth[record.where] for w in name.split()}
            for kind, wanted in (("colour", words & set(COLORS)), ("shape", words & set(SHAPES))):
                hits[kind][0] += len(wanted & set(names))
                hits[kind][1] += len(wanted)
    assert hits["all"][1] > 200  # 160 images, 1-3 objects of two words each
    recall = {kind: found / total for kind, (found, total) in hits.items()}
    chance = 5 / len(cache)
    assert recall["all"] > chance + 0.13, recall
    assert recall["colour"] > chance + 0.3, recall


def test_recall_counts_the_concepts_that_name_each_images_objects():
    cache = ConceptCache(["red", "circle", "blue", "square", "teddy bear", "bear"])
    top = torch.tensor([[0, 1], [2, 5], [3, 4]])  # red circle | blue bear | square teddy bear
    objects = [["red circle"], ["blue square", "teddy bear"], []]
    # image 0: red and circle, both retrieved (2 of 2); image 1: blue, square, teddy bear and bear ("bear" names
    # part of "teddy bear"), of which blue and bear are retrieved (2 of 4); image 2 has no objects
    assert cache.recall(top, objects) == (4, 6)
    assert cache.recall(top, [[], [], []]) == (0, 0)
