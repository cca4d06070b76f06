"""The tokenizer: training, the saved folder transformers loads, fixed-length encoding, decoding."""
from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlip_ds.data.synthetic import COLORS, SHAPES
from nlip_ds.data.tokenizer import (CONCEPT_SEPARATOR, Tokenizer, ensure_tokenizer, load_tokenizer,
                                    train_tokenizer)

WORDS = ["a", "the", "photo", "of", "small", "large", "above", "below", *SHAPES, *COLORS]
CORPUS = [f"a {c} {s} above the {s2}" for c in COLORS for s in SHAPES for s2 in SHAPES[:2]] + [
    "a photo of a small circle", "a large square below"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "t", vocab_size=200))


def test_special_token_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4, 5)
    assert 6 < tok.vocab_size <= 200


def test_encode_layout(tok):
    ids, mask = tok.encode(["A Red Circle", "a photo of a small blue heart above the square"], 8)
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == torch.long
    assert ids[0, 0] == tok.bos_id and ids[0, 4] == tok.eos_id and (ids[0, 5:] == tok.pad_id).all()
    assert mask[0].tolist() == [1] * 5 + [0] * 3
    assert ids[1, -1] == tok.eos_id and mask[1].all()  # truncated, [EOS] kept
    assert tok.decode(ids) == ["a red circle", "a photo of a small blue"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join), min_size=1, max_size=5))
def test_round_trip(tok, texts):
    ids, mask = tok.encode(texts, 40)
    assert tok.decode(ids) == texts
    assert mask.sum(1).tolist() == [len(tok.hf.tokenize(t)) + 2 for t in texts]


def test_unknown_and_decode_stops_at_eos(tok):
    ids, _ = tok.encode(["zebra"], 6)
    assert tok.unk_id in ids[0].tolist()
    red = tok.encode(["red"], 3)[0][0, 1].item()
    assert tok.decode([[tok.bos_id, red, tok.eos_id, red, red]]) == ["red"]
    assert tok.decode(torch.tensor([[tok.bos_id, tok.eos_id, red]])) == [""]


def test_encode_concepts(tok):
    ids, mask = tok.encode_concepts([["red circle", "blue square"], []], 8)
    assert ids.shape == (2, 8)
    assert tok.decode(ids[:1]) == ["red circle, blue square"]
    assert tok.bos_id not in ids[0].tolist() and tok.eos_id not in ids[0].tolist()
    assert (ids[1] == tok.pad_id).all() and not mask[1].any()
    assert mask[0].sum() == len(tok.hf.tokenize(CONCEPT_SEPARATOR.join(["red circle", "blue square"])))


def test_transformers_loads_the_folder(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = tok.save(tmp_path / "saved")
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                  "special_tokens_map.json"}
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(folder))
        assert hf("a red star")["input_ids"] == tok.encode(["a red star"], 5)[0][0].tolist()
        assert hf.pad_token_id == 0 and hf.eos_token == "[EOS]"


def test_pickles_for_loader_workers(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone.encode(["a red star"], 6)[0], tok.encode(["a red star"], 6)[0])


def test_ensure_trains_once_then_loads(synth_dir, tmp_path):
    target = tmp_path / "tok"
    tok = ensure_tokenizer(None, str(synth_dir / "train"), target, vocab_size=300)
    stamp = (target / "tokenizer.json").stat().st_mtime_ns
    again = ensure_tokenizer(str(target), str(synth_dir / "train"), tmp_path / "unused", vocab_size=300)
    assert (target / "tokenizer.json").stat().st_mtime_ns == stamp and not (tmp_path / "unused").exists()
    assert again.vocab_size == tok.vocab_size
    ids, _ = tok.encode(["a photo of a red circle"], 10)
    assert tok.unk_id not in ids[0].tolist()  # prompt words occur in the synthetic captions


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no training shards"):
        ensure_tokenizer(None, None, tmp_path / "x")
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer.encode(None, ["x"], 1)
