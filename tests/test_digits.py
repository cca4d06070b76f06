"""The real-data benchmark's dataset: scikit-learn's digits as captioned pairs with noisy-correspondence noise."""
import json
import tarfile

import pytest

pytest.importorskip("sklearn")

from nlip_ds.data import digits  # noqa: E402


def _train_meta(folder):
    metas = []
    for shard in sorted((folder / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas += [(json.loads(tar.extractfile(m).read()), tar.extractfile(m.name[:-4] + "txt").read().decode())
                      for m in tar.getmembers() if m.name.endswith(".json")]
    return metas


def test_shuffle_noise_permutes_captions_among_the_chosen_pairs(tmp_path):
    summary = digits.build(tmp_path, noise_rate=0.5, noise_kind="shuffle", seed=3)
    metas = _train_meta(tmp_path)
    assert len(metas) == summary["splits"]["train"]["num_samples"] == 1197
    noisy = [(m, text) for m, text in metas if m["noise_type"] == "incorrect"]
    # about half the pairs were drawn; the few whose caption index did not change count as clean
    assert 0.45 * len(metas) <= len(noisy) <= 0.5 * len(metas)
    assert all(m["clean_caption"] == text for m, text in metas if m["noise_type"] == "clean")
    # a permutation: the multiset of captions is that of the clean captions
    assert sorted(text for _, text in metas) == sorted(m["clean_caption"] for m, _ in metas)
    assert summary["splits"]["test"]["noise_types"]["incorrect"] == 0
    assert (tmp_path / "classes.txt").read_text().split() == list(digits.NAMES)


def test_incomplete_noise_writes_web_strings_and_the_split_depends_on_the_seed_only(tmp_path):
    digits.build(tmp_path / "a", noise_rate=0.2, noise_kind="incomplete", seed=0)
    digits.build(tmp_path / "b", noise_rate=0.0, seed=0)
    a, b = _train_meta(tmp_path / "a"), _train_meta(tmp_path / "b")
    assert [m["source_index"] for m, _ in a] == [m["source_index"] for m, _ in b]
    noisy = [text for m, text in a if m["noise_type"] == "incomplete"]
    assert len(noisy) == round(0.2 * len(a))
    assert not any(name in text for text in noisy for name in digits.NAMES)


def test_captions_name_their_digit():
    import random

    rng = random.Random(0)
    for label in range(10):
        text = digits.caption(label, rng)
        assert digits.NAMES[label] in text and " a eight" not in text


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="noise_rate"):
        digits.build(tmp_path, noise_rate=1.5)
    with pytest.raises(ValueError, match="noise_kind"):
        digits.build(tmp_path, noise_kind="swap")
