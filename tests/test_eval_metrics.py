"""Evaluation metrics against tiny cases computed by hand: retrieval with ties, zero-shot with 3 classes,
caption scores, the linear probe."""
import math

import pytest
import torch

from nlip_ds.eval import captioning
from nlip_ds.eval.linear_probe import linear_probe
from nlip_ds.eval.retrieval import i2t_ranks, multi_caption_retrieval, retrieval_metrics, t2i_ranks
from nlip_ds.eval.zeroshot import (class_embeddings, load_class_names, load_templates, per_class_accuracy,
                                   zeroshot_accuracy)


def _pair_with_scores(scores: list[list[float]]):
    """Image and text embeddings whose similarity matrix image @ text.T is exactly `scores` (N, C)."""
    s = torch.tensor(scores, dtype=torch.float64)
    return torch.eye(s.shape[0], dtype=torch.float64), s.T.contiguous()


# ------------------------------------------------------------------------------------------------ retrieval

# 3 images, 4 captions: captions 0 and 1 describe image 0, caption 2 image 1, caption 3 image 2.
SCORES = [[0.5, 0.9, 0.9, 0.1],   # image 0: its best caption (0.9) ties with caption 2 of image 1 -> rank 1
          [0.5, 0.3, 0.8, 0.8],   # image 1: its caption (0.8) ties with caption 3 -> rank 1
          [0.7, 0.1, 0.0, 0.95]]  # image 2: its caption scores highest -> rank 0
OWNER = torch.tensor([0, 0, 1, 2])


def test_i2t_ranks_count_ties_against_the_image():
    image, text = _pair_with_scores(SCORES)
    assert i2t_ranks(image, text, OWNER).tolist() == [1, 1, 0]


def test_t2i_ranks_count_ties_against_the_caption():
    # caption 0: image 0 scores 0.5, image 1 ties (0.5), image 2 is higher (0.7) -> rank 2
    # caption 1: 0.9 beats 0.3 and 0.1 -> 0; caption 2: image 0 (0.9) beats image 1 (0.8) -> 1; caption 3 -> 0
    image, text = _pair_with_scores(SCORES)
    assert t2i_ranks(image, text, OWNER).tolist() == [2, 0, 1, 0]


def test_recall_at_k_from_the_ranks():
    image, text = _pair_with_scores(SCORES)
    out = multi_caption_retrieval(image, text, OWNER)
    assert out["i2t_r1"] == pytest.approx(1 / 3)
    assert out["t2i_r1"] == pytest.approx(2 / 4)
    assert out["i2t_r5"] == out["t2i_r5"] == out["i2t_r10"] == out["t2i_r10"] == 1.0


def test_two_captions_of_one_image_tying_do_not_cost_a_rank():
    image, text = _pair_with_scores([[0.9, 0.9, 0.2], [0.1, 0.1, 0.3]])
    assert i2t_ranks(image, text, torch.tensor([0, 0, 1])).tolist() == [0, 0]


def test_a_collapsed_model_retrieves_nothing():
    # All embeddings equal: every wrong item ties with the match, so all 11 of them rank above it.
    same = torch.nn.functional.normalize(torch.ones(12, 4), dim=-1)
    out = retrieval_metrics(same, same.clone())
    assert out == {f"{d}_r{k}": 0.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_recall_boundaries_at_5_and_10():
    # One caption per image; image i's own caption is preceded by exactly i wrong captions.
    n = 12
    scores = torch.zeros(n, n)
    for i in range(n):
        scores[i, i] = 1.0
        scores[i, [(i + 1 + j) % n for j in range(i)]] = 2.0
    image, text = torch.eye(n), scores.T.contiguous()
    ranks = i2t_ranks(image, text, torch.arange(n))
    assert ranks.tolist() == list(range(n))
    out = multi_caption_retrieval(image, text, torch.arange(n))
    assert (out["i2t_r1"], out["i2t_r5"], out["i2t_r10"]) == pytest.approx((1 / 12, 5 / 12, 10 / 12))


def test_an_image_without_a_caption_is_refused():
    image, text = _pair_with_scores([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    with pytest.raises(ValueError, match="an image has no caption"):
        multi_caption_retrieval(image, text, torch.tensor([0, 0]))


# ------------------------------------------------------------------------------------------------ zero-shot

# 3 classes along the axes; 5 images. Image 3 ties classes 1 and 2 (goes to class 1, the lower index).
CLASSES = torch.eye(3)
IMAGES = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.0, 0.5, 0.5], [0.1, 0.1, 0.8]])
LABELS = torch.tensor([0, 1, 1, 2, 2])  # predictions 0, 1, 0, 1, 2 -> 3 of 5 right


def test_zeroshot_top1_with_three_classes():
    out = zeroshot_accuracy(IMAGES, CLASSES, LABELS)
    assert out == {"zeroshot_top1": pytest.approx(3 / 5)}  # no top-5 with fewer than 5 classes


def test_zeroshot_per_class_accuracy():
    out = per_class_accuracy(IMAGES, CLASSES, LABELS, ["cat", "dog", "fox"])
    assert out == {"cat": {"top1": 1.0, "count": 1}, "dog": {"top1": 0.5, "count": 2},
                   "fox": {"top1": 0.5, "count": 2}}


def test_zeroshot_top5_with_six_classes():
    classes = torch.eye(6)
    image = torch.tensor([[6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]])  # class ranking 0, 1, 2, 3, 4, 5
    out = zeroshot_accuracy(image, classes, torch.tensor([4, 5]))
    assert out == {"zeroshot_top1": 0.0, "zeroshot_top5": 0.5}


class _LookupText:
    """A tokenizer/model pair whose text embedding of each prompt is a vector fixed in advance."""

    def __init__(self, vectors: dict):
        self.vectors = vectors
        self.prompts = list(vectors)

    def encode(self, texts, max_length):
        ids = torch.tensor([[self.prompts.index(t)] for t in texts])
        return ids, torch.ones_like(ids)

    def encode_text(self, ids, mask):
        return torch.stack([self.vectors[self.prompts[i]] for i in ids[:, 0].tolist()])


def test_class_embeddings_average_the_template_ensemble():
    v = {"a cat": torch.tensor([1.0, 0.0]), "the cat": torch.tensor([0.0, 1.0]),
         "a dog": torch.tensor([0.6, 0.8]), "the dog": torch.tensor([0.6, 0.8])}
    fake = _LookupText(v)
    out = class_embeddings(fake, fake, ["cat", "dog"], ["a {}", "the {}"], 8, "cpu", batch_size=3)
    assert torch.allclose(out, torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5], [0.6, 0.8]]))


def test_class_and_template_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_class_names(tmp_path / "missing.txt")
    (tmp_path / "t.txt").write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ValueError, match=r"t\.txt.*'a photo'"):
        load_templates(tmp_path / "t.txt")
    (tmp_path / "c.txt").write_text("cat\n\ndog\n")
    assert load_class_names(tmp_path / "c.txt") == ["cat", "dog"]


# ------------------------------------------------------------------------------------------------ captions


def test_simple_tokenizer_drops_punctuation_and_case():
    assert captioning.simple_tokenize({0: ["A Red, circle!", "it's -- big"]}) == {0: ["a red circle", "it's big"]}


def test_scores_without_java_fall_back_and_report_meteor_missing(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no `java` to start
    refs = [["a red circle on white"], ["a blue square"], ["a green star"]]
    metrics, notes = captioning.score_captions(refs, ["a red circle", "a blue square", "a green star"])
    assert notes["tokenizer"] == "simple"
    assert "meteor" not in metrics and "java" in notes["missing"]["meteor"]
    # BLEU-1 by hand: every hypothesis word matches (precision 1); 9 hypothesis words against the closest
    # reference lengths 5 + 3 + 3 = 11, so the brevity penalty is exp(1 - 11/9).
    assert metrics["bleu1"] == pytest.approx(math.exp(1 - 11 / 9), rel=1e-6)
    # ROUGE-L (beta 1.2) by hand: image 1 has LCS 3 of 3 hypothesis and 5 reference words; images 2, 3 are exact
    p, r, beta = 1.0, 3 / 5, 1.2
    first = (1 + beta ** 2) * p * r / (r + beta ** 2 * p)
    assert metrics["rouge_l"] == pytest.approx((first + 2) / 3, rel=1e-6)


def test_scores_with_java_match_the_references():
    refs = [["a red circle on white", "a red circle"], ["a blue square in the middle"], ["a small green star"]]
    metrics, notes = captioning.score_captions(refs, ["a red circle.", "a blue square in the middle",
                                                      "A small green star"])
    assert notes == {"tokenizer": "ptb", "missing": {}}
    assert metrics["bleu1"] == pytest.approx(1.0, abs=1e-6)  # PTB drops the full stop and lowercases
    assert 0.5 < metrics["meteor"] <= 1.0
    assert metrics["rouge_l"] == pytest.approx(1.0)


def test_caption_counts_must_match():
    with pytest.raises(ValueError, match="2 captions for 1 reference sets"):
        captioning.score_captions([["a"]], ["a", "b"])


# ------------------------------------------------------------------------------------------------ linear probe


def test_linear_probe_separates_separable_classes_and_ignores_unlabelled():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    y = torch.arange(3).repeat(20)
    x = centres[y] + 0.3 * torch.randn(60, 2, generator=g)
    test_y = y.clone()
    test_y[:5] = -1  # unknown class: left out rather than counted wrong
    assert linear_probe(x, y, x, test_y) == {"linear_probe_top1": 1.0}
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(x, torch.zeros(60, dtype=torch.long), x, y)
