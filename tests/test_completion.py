"""Noise-completion in the training loop: policies, caption store, the estimator's original-caption loss, the
Completer on a hand-made batch, lockstep generation on a real 2-rank ZeRO-3 engine, and 2-rank training runs
with completion that checkpoint, resume and log the counters and the text panel."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nlip_ds.completion import policy as P
from nlip_ds.completion.caption_store import SyntheticCaptionStore
from nlip_ds.completion.completer import PANEL_ROWS, Completer, generation_seed
from nlip_ds.config import ConfigError, load_config
from nlip_ds.distributed import free_port
from nlip_ds.ops.contrastive import fused_contrastive_loss_ref

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- policies


def test_replace_picks_about_epsilon_and_exactly_the_seeded_rows():
    n = 20000
    ids = torch.arange(n) * 7 + 3
    eps = torch.full((n,), 0.3)
    picked = P.select("replace", eps, ids, 0, 3)
    assert abs(picked.float().mean().item() - 0.3) < 0.015
    draw = P.uniform_draw(ids, 0, 3)
    assert 0.0 <= draw.min() and draw.max() < 1.0
    assert torch.histc(draw.float(), bins=10, min=0, max=1).sub(n / 10).abs().max() < 0.05 * n  # uniform
    varied = torch.rand(n)
    assert torch.equal(P.select("replace", varied, ids, 0, 3), draw < varied.double())  # exactly u < eps
    assert torch.equal(picked, P.select("replace", eps, ids, 0, 3))  # seeded: the same rows again
    perm = torch.randperm(n)
    assert torch.equal(P.select("replace", eps[perm], ids[perm], 0, 3), picked[perm])  # per id, any order
    assert (picked != P.select("replace", eps, ids, 0, 4)).float().mean() > 0.2  # a new draw each epoch
    assert (picked != P.select("replace", eps, ids, 1, 3)).float().mean() > 0.2  # and per seed
    assert not P.select("replace", torch.zeros(n), ids, 0, 3).any()
    assert P.select("replace", torch.ones(n), ids, 0, 3).all()
    assert torch.equal(P.select("concat", eps, ids, 0, 3), picked)  # concat picks as replace does


def test_threshold_picks_exactly_epsilon_above_one_half():
    eps = torch.tensor([0.0, 0.49, 0.5, 0.5001, 0.9, 1.0])
    picked = P.select("threshold", eps, torch.arange(6), 0, 0)
    assert picked.tolist() == [False, False, False, True, True, True]
    with pytest.raises(ValueError, match="not one of"):
        P.select("nope", eps, torch.arange(6), 0, 0)


BOS, EOS, PAD = 1, 2, 0
SPECIAL = {BOS, EOS, PAD, 3}


def _rows(policy, original, synthetic):
    return P.caption_rows(policy, torch.tensor(original), torch.tensor(synthetic), bos_id=BOS, eos_id=EOS,
                          pad_id=PAD, special=SPECIAL)


def test_replace_and_concat_build_captions_cut_to_the_context():
    original = [[BOS, 10, 11, EOS, PAD, PAD]]
    ids, mask = _rows("replace", original, [[20, 21, 22, EOS, PAD]])
    assert ids.tolist() == [[BOS, 20, 21, 22, EOS, PAD]] and mask.tolist() == [[1, 1, 1, 1, 1, 0]]
    ids, _ = _rows("replace", original, [[20, 21, 22, 23, 24]])  # cut at max_tokens: no [EOS] generated
    assert ids.tolist() == [[BOS, 20, 21, 22, 23, EOS]]
    ids, mask = _rows("concat", original, [[20, 21, 22, EOS, PAD]])  # original + synthetic, truncated
    assert ids.tolist() == [[BOS, 10, 11, 20, 21, EOS]] and mask.tolist() == [[1] * 6]
    ids, _ = _rows("concat", [[BOS, 10, EOS, PAD, PAD, PAD, PAD, PAD]], [[20, EOS, PAD]])
    assert ids.tolist() == [[BOS, 10, 20, EOS, PAD, PAD, PAD, PAD]]
    assert P.zeroes_omega("replace") and P.zeroes_omega("threshold") and not P.zeroes_omega("concat")


# ---------------------------------------------------------------------------------------------- caption store


def test_caption_store_freshness_padding_rows_and_state():
    bank = SyntheticCaptionStore(max_tokens=4, pad_id=PAD)
    bank.put(torch.tensor([5, -1, 9]), torch.tensor([[7, 8, EOS], [1, 1, 1], [6, EOS, PAD]]), epoch=2, step=40)
    assert len(bank) == 2 and 5 in bank and -1 not in bank
    assert bank.get([9, 5]).tolist() == [[6, EOS, PAD, PAD], [7, 8, EOS, PAD]]
    assert bank.fresh([5, 9, 4], epoch=3, refresh_every=2) == [True, True, False]
    assert bank.fresh([5], epoch=4, refresh_every=2) == [False]  # regenerated every R epochs
    bank.put(torch.tensor([5]), torch.tensor([[11, 12, 13, 14]]), epoch=4, step=80)
    assert bank.get([5]).tolist() == [[11, 12, 13, 14]] and bank.fresh([5], 5, 2) == [True]
    restored = SyntheticCaptionStore(max_tokens=4, pad_id=PAD)
    restored.load_state_dict(bank.state_dict())
    assert restored.get([5, 9]).tolist() == bank.get([5, 9]).tolist()
    assert restored.lookup(torch.tensor([5, 9, 4])).kept.tolist() == [True, True, False]  # no verdict: kept
    assert restored.fresh([5, 9], 5, 2) == bank.fresh([5, 9], 5, 2) and len(restored) == 2
    with pytest.raises(ValueError, match="completion.max_tokens"):
        SyntheticCaptionStore(max_tokens=6, pad_id=PAD).load_state_dict(bank.state_dict())


@pytest.mark.parametrize("overrides, message", [
    (["completion.enabled=true", "noise.enabled=false"], "completion.enabled: noise-completion picks pairs"),
    (["completion.enabled=true", "completion.max_tokens=40"], "completion.max_tokens: 40 exceeds"),
    (["completion.candidates=4", "completion.strategy=greedy"], "completion.candidates: 4 candidates of the greedy"),
    (["completion.candidates=0"], "completion.candidates: 0 sampled captions and completion.concept_captions=0"),
    (["completion.concept_captions=6", "completion.top_k=5"], "completion.concept_captions: 6 exceeds"),
])
def test_config_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# --------------------------------------------------------------------------- the Completer on a hand-made batch


def _setup(synth_dir, synth_tokenizer, *overrides):
    from nlip_ds.model import NLIPModel
    from nlip_ds.train.task import NLIPTask

    cfg = load_config(None, ["completion.enabled=true", "completion.start_epoch=1", "noise.warmup_epochs=1",
                             f"completion.vocabulary={synth_dir / 'concepts.txt'}", "completion.max_tokens=8",
                             "completion.min_tokens=2", "completion.per_step_budget=2",
                             "completion.filter=false", *overrides])  # the filter has tests of its own
    torch.manual_seed(0)
    task = NLIPTask(NLIPModel.from_config(cfg.model, synth_tokenizer), cfg).eval()  # eval: no dropout
    captions = ["a red circle above a blue square", "IMG_0042.jpg", "my photo", "a small green star"]
    ids, mask = synth_tokenizer.encode(captions, cfg.model.text.context_length)
    batch = {"image": torch.randn(4, 3, 32, 32), "input_ids": ids, "attention_mask": mask, "caption": captions,
             "sample_id": torch.tensor([10, 11, 12, 13])}
    return cfg, task, Completer(cfg, synth_tokenizer), batch


def test_completer_replaces_picked_rows_within_budget_and_reuses_the_bank(synth_dir, synth_tokenizer):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, "completion.policy=threshold",
                                         "completion.per_step_budget=1", "completion.refresh_every_epochs=2")
    eps = torch.tensor([0.0, 0.9, 0.2, 0.7])
    omega = 0.5 * eps
    out, _ = completer.prepare(task.model, SimpleNamespace(epoch=0, step=0), batch, eps, omega)
    assert out is batch and not completer.cache.ready  # stage 0: nothing happens
    out, new_omega = completer.prepare(task.model, SimpleNamespace(epoch=1, step=3), batch, eps, omega)
    assert completer.cache.ready and completer.cache.refreshed_at_step == 3
    assert out["concept_ids"].shape == (4, cfg.model.text.context_length // 2) and out["concept_mask"].any()
    assert completer.generated == 1 and 11 in completer.captions and 13 not in completer.captions  # budget 1: row 1
    assert out["caption_changed"].tolist() == [False, True, False, False]
    expected, _ = P.caption_rows("replace", batch["input_ids"][1:2], completer.captions.get([11]),
                                 bos_id=synth_tokenizer.bos_id,
                                 eos_id=synth_tokenizer.eos_id, pad_id=synth_tokenizer.pad_id,
                                 special=completer.special)
    assert torch.equal(out["input_ids"][1], expected[0])
    assert torch.equal(out["input_ids"][[0, 2, 3]], batch["input_ids"][[0, 2, 3]])
    assert torch.equal(out["orig_input_ids"], batch["input_ids"])
    torch.testing.assert_close(new_omega, torch.tensor([0.0, 0.0, 0.1, 0.35]))  # replaced row: omega 0
    out, _ = completer.prepare(task.model, SimpleNamespace(epoch=1, step=4), batch, eps, omega)
    assert completer.generated == 2 and out["caption_changed"].tolist() == [False, True, False, True]
    step = completer.captions.step.clone()
    completer.prepare(task.model, SimpleNamespace(epoch=2, step=5), batch, eps, omega)
    assert completer.generated == 2  # cached captions reused within R = 2 epochs
    completer.prepare(task.model, SimpleNamespace(epoch=3, step=6), batch, eps, omega)
    assert completer.generated == 3 and not torch.equal(completer.captions.step, step)  # then regenerated
    assert completer.cache.refreshed_at_step == 3  # refresh_concepts_every=50 not yet reached
    completer.prepare(task.model, SimpleNamespace(epoch=3, step=53), batch, eps, omega)
    assert completer.cache.refreshed_at_step == 53

    restored = Completer(cfg, synth_tokenizer)
    restored.load_state_dict(completer.state_dict())
    assert restored.generated == 4 and torch.equal(restored.cache.embeddings, completer.cache.embeddings)
    assert restored.captions.get([11, 13]).tolist() == completer.captions.get([11, 13]).tolist()


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_deterministic_strategies_bank_the_decoders_own_caption(synth_dir, synth_tokenizer, strategy):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, f"completion.strategy={strategy}",
                                         "completion.num_beams=2")
    eps = torch.tensor([1.0, 0.0, 0.0, 1.0])  # probability 1: rows 0 and 3 are picked
    out, _ = completer.prepare(task.model, SimpleNamespace(epoch=1, step=0), batch, eps, 0.5 * eps)
    rows = torch.tensor([0, 3])
    expected = task.model.generate(batch["image"][rows], out["concept_ids"][rows], out["concept_mask"][rows],
                                   strategy=strategy, num_beams=2, min_tokens=2, max_tokens=8)
    banked = completer.captions.get([10, 13])
    assert torch.equal(banked[:, :expected.shape[1]], expected)
    assert (banked[:, expected.shape[1]:] == synth_tokenizer.pad_id).all()


def test_concat_keeps_omega_and_the_original_text(synth_dir, synth_tokenizer):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, "completion.policy=concat")
    eps = torch.tensor([0.0, 1.0, 0.0, 1.0])  # probability 1: always picked
    out, omega = completer.prepare(task.model, SimpleNamespace(epoch=1, step=0), batch, eps, 0.5 * eps)
    assert out["caption_changed"].tolist() == [False, True, False, True]
    torch.testing.assert_close(omega, 0.5 * eps)
    tok = synth_tokenizer
    words = lambda ids: [t for t in ids.tolist() if t not in completer.special]
    for row in (1, 3):
        synthetic = words(completer.captions.get([int(batch["sample_id"][row])])[0])
        expected = (words(batch["input_ids"][row]) + synthetic)[:cfg.model.text.context_length - 2]
        assert words(out["input_ids"][row]) == expected and len(synthetic) >= 2
        assert out["input_ids"][row, 0] == tok.bos_id and tok.eos_id in out["input_ids"][row].tolist()


@pytest.mark.parametrize("policy, k", [("replace", 1), ("concat", 1), ("replace", 3)])
def test_caption_filter_similarity_is_the_models_own_cosine(synth_dir, synth_tokenizer, policy, k):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, f"completion.policy={policy}",
                                         "completion.filter=true", "completion.strategy=nucleus")
    images = batch["image"].repeat_interleave(k, 0)
    tokens = completer.generate(task.model, images, None, None, step=0)  # (4 k, L): each row's k side by side
    got = completer.similarity(task.model, batch["input_ids"], batch["attention_mask"], tokens,
                               task.model.encode_image(batch["image"]).detach())
    assert got.shape == (4, 1 + k)
    trained_on, trained_mask = P.caption_rows(policy, batch["input_ids"].repeat_interleave(k, 0), tokens,
                                              bos_id=synth_tokenizer.bos_id, eos_id=synth_tokenizer.eos_id,
                                              pad_id=synth_tokenizer.pad_id, special=completer.special)
    with torch.no_grad():
        image = task.model.encode_image(batch["image"])
        original = task.model.encode_text(batch["input_ids"], batch["attention_mask"])
        synthetic = task.model.encode_text(trained_on, trained_mask).view(4, k, -1)
    torch.testing.assert_close(got[:, 0], (image * original).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, 1:], (image[:, None] * synthetic).sum(-1), rtol=1e-5, atol=1e-6)


def test_candidates_keep_the_one_closest_to_the_image(synth_dir, synth_tokenizer, monkeypatch):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, "completion.policy=threshold",
                                         "completion.filter=true", "completion.strategy=nucleus",
                                         "completion.candidates=3", "completion.per_step_budget=4",
                                         "completion.filter_to_clean=false")
    eos, pad = synth_tokenizer.eos_id, synth_tokenizer.pad_id
    generated = []

    def generate(model, images, concept_ids, concept_mask, step):
        generated.append(images.shape[0])  # candidate j of every row: tokens (10 + j, 20 + j), [EOS]
        rows = [[10 + j % 3, 20 + j % 3, eos] + [pad] * 5 for j in range(images.shape[0])]
        return torch.tensor(rows)

    def similarity(model, input_ids, attention_mask, tokens, image_features):
        if input_ids.shape[0] == PANEL_ROWS:  # the text panel's rows, 3 candidates each
            return torch.zeros(PANEL_ROWS, 4)
        assert tokens.shape[0] == 3 * input_ids.shape[0] == 6
        # row 1: candidate 1 is the closest and beats the original; row 3: candidate 2 is, and does not
        return torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.5, 0.1, 0.2, 0.4]])

    monkeypatch.setattr(completer, "generate", generate)
    monkeypatch.setattr(completer, "similarity", similarity)
    eps = torch.tensor([0.0, 0.9, 0.2, 0.7])
    out, _ = completer.prepare(task.model, SimpleNamespace(epoch=1, step=0), batch, eps, 0.5 * eps)
    assert generated == [3 * PANEL_ROWS, 6] and completer.generated == 2 and completer.kept == 1
    assert completer.captions.get([11, 13])[:, :3].tolist() == [[11, 21, eos], [12, 22, eos]]
    assert completer.captions.lookup(torch.tensor([11, 13])).kept.tolist() == [True, False]
    assert out["caption_changed"].tolist() == [False, True, False, False]


@pytest.mark.parametrize("sampled", [0, 2])
def test_concept_captions_join_the_candidates_in_the_concept_template(synth_dir, synth_tokenizer, monkeypatch,
                                                                      sampled):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, "completion.policy=threshold",
                                         "completion.filter=true", "completion.strategy=nucleus",
                                         f"completion.candidates={sampled}", "completion.concept_captions=2",
                                         "completion.per_step_budget=4", "completion.filter_to_clean=false")
    eos, pad = synth_tokenizer.eos_id, synth_tokenizer.pad_id
    generated = []

    def generate(model, images, concept_ids, concept_mask, step):
        generated.append(images.shape[0])
        return torch.tensor([[10, 20, eos] + [pad] * 5] * images.shape[0])

    top = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])  # each row's retrieved concepts
    monkeypatch.setattr(completer, "generate", generate)
    monkeypatch.setattr(completer.cache, "retrieve", lambda features, k: top[:, :k])
    judged = []

    def similarity(model, input_ids, attention_mask, tokens, image_features):
        if input_ids.shape[0] == PANEL_ROWS:
            return torch.zeros(PANEL_ROWS, 1 + sampled + 2)
        judged.append(synth_tokenizer.decode(tokens))
        # rows 1 and 3 are picked; row 1's second concept caption is the closest, row 3's first sampled one
        scores = torch.zeros(2, 1 + sampled + 2)
        scores[0, -1], scores[1, 1] = 0.9, 0.8
        return scores

    monkeypatch.setattr(completer, "similarity", similarity)
    eps = torch.tensor([0.0, 0.9, 0.2, 0.7])
    out, _ = completer.prepare(task.model, SimpleNamespace(epoch=1, step=0), batch, eps, 0.5 * eps)
    names = completer.cache.vocabulary
    template = completer.cache.template
    sampled_text = synth_tokenizer.decode(torch.tensor([[10, 20, eos]]))
    assert judged == [sampled_text * sampled + [template.format(names[3]), template.format(names[4])]
                      + sampled_text * sampled + [template.format(names[9]), template.format(names[10])]]
    # no decoding without sampled captions, not even for the text panel
    assert generated == ([sampled * PANEL_ROWS, 2 * sampled] if sampled else [])
    stored = synth_tokenizer.decode(completer.captions.get([11, 13]))
    assert stored[0] == template.format(names[4])
    assert stored[1] == (sampled_text[0] if sampled else template.format(names[9]))
    assert out["caption_changed"].tolist() == [False, True, False, True]
    panels = []  # the text panel shows the candidate the store would pick (all tie here: the first)
    completer.log(SimpleNamespace(log=lambda *a: None, text=lambda tag, text, step: panels.append(text)), step=0)
    rows = panels[0].splitlines()[2:]
    assert len(rows) == PANEL_ROWS and (sampled_text[0] if sampled else template.format(names[0])) in rows[0]


def test_caption_filter_trains_only_on_kept_captions_and_does_not_regenerate_the_others(synth_dir, synth_tokenizer,
                                                                                        monkeypatch):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, "completion.policy=threshold",
                                         "completion.filter=true", "completion.per_step_budget=4",
                                         "completion.filter_to_clean=false")
    judged = []

    def similarity(model, input_ids, attention_mask, tokens, image_features):
        judged.append(input_ids.shape[0])
        if input_ids.shape[0] == PANEL_ROWS:  # the text panel's rows at the concept refresh
            return torch.zeros(PANEL_ROWS, 2)
        # rows 1 and 3 are picked; the synthetic caption of row 1 beats its original, row 3's does not
        return torch.tensor([[0.1, 0.6], [0.5, 0.2]])

    monkeypatch.setattr(completer, "similarity", similarity)
    eps = torch.tensor([0.0, 0.9, 0.2, 0.7])
    out, omega = completer.prepare(task.model, SimpleNamespace(epoch=1, step=0), batch, eps, 0.5 * eps)
    assert judged == [PANEL_ROWS, 2] and completer.generated == 2 and completer.kept == 1
    assert 11 in completer.captions and 13 in completer.captions  # the turned-down caption is stored too
    assert out["caption_changed"].tolist() == [False, True, False, False]
    assert torch.equal(out["input_ids"][3], batch["input_ids"][3])
    torch.testing.assert_close(omega, torch.tensor([0.0, 0.0, 0.1, 0.35]))  # row 3 keeps its omega
    out, _ = completer.prepare(task.model, SimpleNamespace(epoch=1, step=1), batch, eps, 0.5 * eps)
    assert judged == [PANEL_ROWS, 2] and completer.generated == 2  # both fresh: nothing generated or judged
    assert out["caption_changed"].tolist() == [False, True, False, False]
    sink = SimpleNamespace(logged={}, log=lambda metrics, step: sink.logged.update(metrics), text=lambda *a: None)
    completer.log(sink, step=1)
    assert sink.logged["completion/kept"] == 0.5 and sink.logged["completion/replaced"] == 0.25
    restored = Completer(cfg, synth_tokenizer)
    restored.load_state_dict(completer.state_dict())
    assert restored.kept == 1 and restored.captions.lookup(torch.tensor([11, 13])).kept.tolist() == [True, False]
    old = completer.state_dict()  # a checkpoint from before the filter: every caption was trained on
    del old["kept"], old["captions"]["kept"]
    restored.load_state_dict(old)
    assert restored.kept == 2 and restored.captions.lookup(torch.tensor([11, 13])).kept.tolist() == [True, True]


@pytest.mark.parametrize("distinct", [True, False])
def test_distinct_trains_one_pair_per_synthetic_text(synth_dir, synth_tokenizer, distinct):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, "completion.policy=threshold",
                                         "completion.per_step_budget=0", f"completion.distinct={distinct}")
    width = cfg.completion.max_tokens
    texts = ["a red circle", "a blue star", "a red circle"]  # rows 1 and 3 would train on the same text
    ids, _ = synth_tokenizer.encode(texts, width + 1)
    completer.captions.put(torch.tensor([11, 12, 13]), ids[:, 1:], epoch=1, step=0)  # fresh: nothing generated
    eps = torch.tensor([0.0, 0.9, 0.8, 0.7])  # threshold: rows 1, 2 and 3 are picked
    out, omega = completer.prepare(task.model, SimpleNamespace(epoch=1, step=0), batch, eps, 0.5 * eps)
    assert completer.generated == 0
    if distinct:  # row 3 keeps its original caption and its omega
        assert out["caption_changed"].tolist() == [False, True, True, False]
        assert torch.equal(out["input_ids"][3], batch["input_ids"][3])
        torch.testing.assert_close(omega, torch.tensor([0.0, 0.0, 0.0, 0.35]))
    else:
        assert out["caption_changed"].tolist() == [False, True, True, True]
        assert torch.equal(out["input_ids"][1], out["input_ids"][3])
    sink = SimpleNamespace(logged={}, log=lambda metrics, step: sink.logged.update(metrics), text=lambda *a: None)
    completer.log(sink, step=0)
    assert sink.logged.get("completion/duplicates") == (pytest.approx(1 / 3) if distinct else None)


def test_clean_bar_is_the_median_similarity_of_the_pairs_called_clean(synth_dir, synth_tokenizer):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, "completion.filter=true")
    with torch.no_grad():
        image = task.model.encode_image(batch["image"])
        similarity = (task.model.encode_text(batch["input_ids"], batch["attention_mask"]) * image).sum(-1)
    bar = completer.clean_bar(task.model, batch, torch.tensor([0.1, 0.9, 0.3, 0.2]), image)
    torch.testing.assert_close(bar, similarity[[0, 2, 3]].median())
    assert completer.clean_bar(task.model, batch, torch.ones(4), image) == float("inf")  # no clean pair


@pytest.mark.parametrize("bar, kept", [(0.55, [True, False]), (0.7, [False, False])])
def test_the_filter_keeps_a_caption_only_at_or_above_the_clean_bar(synth_dir, synth_tokenizer, monkeypatch, bar,
                                                                    kept):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, "completion.policy=threshold",
                                         "completion.filter=true", "completion.per_step_budget=4")
    assert cfg.completion.filter_to_clean  # the default
    # row 1's caption beats its original (0.6 > 0.1), row 3's does not; the bar decides row 1
    monkeypatch.setattr(completer, "similarity", lambda model, ids, *a: torch.tensor([[0.1, 0.6], [0.5, 0.2]])
                        if ids.shape[0] == 2 else torch.zeros(ids.shape[0], 2))
    monkeypatch.setattr(completer, "clean_bar", lambda *a: torch.tensor(bar))
    eps = torch.tensor([0.0, 0.9, 0.2, 0.7])
    out, _ = completer.prepare(task.model, SimpleNamespace(epoch=1, step=0), batch, eps, 0.5 * eps)
    assert completer.captions.lookup(torch.tensor([11, 13])).kept.tolist() == kept
    assert out["caption_changed"].tolist() == [False, kept[0], False, False]


def test_the_estimator_sees_the_loss_of_the_original_caption_without_concepts(synth_dir, synth_tokenizer):
    cfg, task, completer, batch = _setup(synth_dir, synth_tokenizer, "completion.policy=threshold",
                                         "model.text.concept_dropout=0.0")
    eps = torch.tensor([0.0, 0.9, 0.2, 0.1])  # one replaced row: the others keep their captions
    out, omega = completer.prepare(task.model, SimpleNamespace(epoch=1, step=0), batch, eps, 0.5 * eps)
    assert out["caption_changed"].tolist() == [False, True, False, False] and "concept_ids" in out
    with torch.no_grad():
        seen = task(out, omega, 1 - eps)["per_sample_loss"]
        # the pairs as the data gave them: original captions, no concept prefix; the plain loss is the estimator's
        plain = {k: v for k, v in out.items() if k not in ("orig_input_ids", "orig_attention_mask",
                                                           "caption_changed", "concept_ids", "concept_mask")}
        plain.update(input_ids=out["orig_input_ids"], attention_mask=out["orig_attention_mask"])
        original = task(plain, omega, 1 - eps)["per_sample_loss"]
        out_img, out_txt = task.model.encode_image(out["image"]), task.model.encode_text(
            out["input_ids"], out["attention_mask"], out["concept_ids"], out["concept_mask"])
        _, as_trained = fused_contrastive_loss_ref(out_img, out_txt, out_img, out_txt,
                                                   task.model.logit_scale(), 0)
    torch.testing.assert_close(seen, original)  # every row: the original pair without concepts ...
    assert (seen - as_trained).abs().max() > 1e-4  # ... not the prefixed or synthetic pair that trained


# ------------------------------------------------------------------ lockstep generation on a 2-rank ZeRO-3 engine

LOCKSTEP = r"""
import sys, torch, deepspeed
from types import SimpleNamespace
from nlip_ds import distributed as D
from nlip_ds.completion.completer import Completer
from nlip_ds.config import load_config
from nlip_ds.data.tokenizer import load_tokenizer
from nlip_ds.model import NLIPModel
from nlip_ds.train.zero import held

deepspeed.init_distributed(dist_backend="gloo")
rank = D.get_rank()
cfg = load_config(None, {overrides!r})
tok = load_tokenizer({tok!r})
model = NLIPModel.from_config(cfg.model, tok)
model.load_state_dict(torch.load({weights!r}))
ds = {{"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
       "zero_optimization": {{"stage": 3, "stage3_param_persistence_threshold": 0}}}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=ds)
assert all(p.numel() == 0 for p in engine.module.decoder.parameters())  # partitioned across the two ranks
calls = []
bias = 1e4 if rank == 0 else -1e4  # rank 0 ends every caption as soon as allowed, rank 1 never does
def hook(module, args, out):
    calls.append(1)
    out = out.clone()
    out[..., tok.eos_id] += bias
    return out
engine.module.decoder.register_forward_hook(hook)
inputs = torch.load({inputs!r})[rank]
completer = Completer(cfg, tok{hold})
out = completer.generate(engine.module, *inputs, step=7)
assert torch.equal(out, torch.load({expected!r})[rank]), (out, torch.load({expected!r})[rank])
assert len(calls) == cfg.completion.max_tokens, len(calls)  # both ranks ran every decoder step
# the bank path: rank 0 captions two rows, rank 1 has none and runs one dummy row in step, through the generate
# call and the caption filter's T_e forward
ids, mask = tok.encode(["a red circle", "my photo"], cfg.model.text.context_length)
batch = {{"image": inputs[0], "concept_ids": inputs[1], "concept_mask": inputs[2], "sample_id": torch.tensor([5, 6]),
          "input_ids": ids, "attention_mask": mask}}
with torch.no_grad():
    features = engine.module.encode_image(inputs[0])
assert cfg.completion.filter and cfg.completion.filter_to_clean
completer._caption_into_store(engine.module, batch, [0, 1] if rank == 0 else [], SimpleNamespace(epoch=0, step=7),
                              features, torch.tensor([0.2, 0.9]),  # the clean bar's T_e forward too
                              top=torch.zeros(2, 1, dtype=torch.long))  # retrieved concepts: no concept captions
banks = D.all_gather_object(completer.captions.state_dict())
assert completer.generated == 2 and len(completer.captions) == 2 and 5 in completer.captions and 6 in completer.captions
assert all(torch.equal(b[k], banks[0][k]) for b in banks for k in ("tokens", "ids", "kept"))
if rank == 0:
    assert torch.equal(completer.captions.get([5, 6]), out)  # the same seed, step and rank: the same captions
print("LOCKSTEP-OK", rank, flush=True)
"""


def _eos_bias_hook(bias: float, eos_id: int):
    def hook(module, args, out):
        out = out.clone()
        out[..., eos_id] += bias
        return out
    return hook


@pytest.mark.dist
@pytest.mark.parametrize("hold", ["", ", hold=held"], ids=["per-token-gather", "decoder-held"])
def test_lockstep_generation_on_two_zero3_ranks_matches_one_process(synth_dir, synth_tokenizer, tmp_path, hold):
    pytest.importorskip("deepspeed")
    from nlip_ds.model import NLIPModel

    overrides = ["completion.max_tokens=8", "completion.min_tokens=1",
                 f"completion.vocabulary={synth_dir / 'concepts.txt'}"]
    cfg = load_config(None, overrides)
    tok = synth_tokenizer
    torch.manual_seed(0)
    model = NLIPModel.from_config(cfg.model, tok).eval()
    concepts = [["red", "circle"], ["blue square"]]
    inputs = []
    for rank in range(2):
        ids, mask = tok.encode_concepts(concepts, cfg.model.text.context_length // 2)
        inputs.append((torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank)), ids, mask))
    expected = []
    for rank, bias in enumerate((1e4, -1e4)):  # one process alone, no sync: what each rank must produce
        handle = model.decoder.register_forward_hook(_eos_bias_hook(bias, tok.eos_id))
        gen = torch.Generator().manual_seed(generation_seed(cfg.train.seed, 7, rank))
        with torch.no_grad():
            out = model.generate(*inputs[rank], strategy="nucleus", top_p=cfg.completion.top_p, min_tokens=1,
                                 max_tokens=8, generator=gen)
        handle.remove()
        expected.append(torch.nn.functional.pad(out, (0, 8 - out.shape[1]), value=tok.pad_id))
    assert (expected[0][:, 1] == tok.eos_id).all() and (expected[0][:, 2:] == tok.pad_id).all()  # 1 token
    assert (expected[1] != tok.pad_id).all() and not (expected[1] == tok.eos_id).any()  # all 8 tokens
    paths = {name: str(tmp_path / f"{name}.pt") for name in ("weights", "inputs", "expected")}
    torch.save(model.state_dict(), paths["weights"])
    torch.save(inputs, paths["inputs"])
    torch.save(expected, paths["expected"])
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    script = LOCKSTEP.format(overrides=overrides, tok=str(tok_dir), hold=hold, **paths)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(r),
                                   "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}) for r in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])  # a lockstep bug hangs: the timeout fails it
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, text) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and f"LOCKSTEP-OK {rank}" in text, text[-4000:]


# ------------------------------------------------------------------------- training runs (deepspeed, 2 ranks)


def _train_ds(synth_dir: Path, run_dir: Path, tok_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
           f"data.train={synth_dir / 'train'}", f"data.val={synth_dir / 'val'}", f"data.test={synth_dir / 'test'}",
           f"data.tokenizer={tok_dir}", f"train.output_dir={run_dir}", "train.micro_batch_size=16",
           "data.workers=0", "eval.batch_size=16", "monitor.progress=false", "monitor.log_every=2",
           "train.epochs=2", "noise.warmup_epochs=1", "noise.trust_ratio=10", "noise.max_rate=1",  # every fit:
           # 2 epochs learn too little for the trust test, and these tests are of the mechanics of using epsilon
           "completion.enabled=true", "completion.start_epoch=1",
           f"completion.vocabulary={synth_dir / 'concepts.txt'}", "completion.refresh_concepts_every=6",
           "completion.per_step_budget=2", "completion.max_tokens=8", "completion.min_tokens=2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _completion_state(run_dir: Path, tag: str) -> dict:
    for path in sorted((run_dir / "checkpoints" / tag).glob("*model_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("completion") is not None:
            return state["completion"]
    raise AssertionError(f"no completion state in checkpoint {tag}")


@pytest.fixture(scope="module")
def completion_runs(synth_dir, tmp_path_factory):
    """A 2-rank run with completion stopped at step 12 (epoch 1: 8 steps per epoch), then resumed to step 14."""
    root = tmp_path_factory.mktemp("completion")
    run, tok = root / "run", root / "tokenizer"
    # The filter off: a 2-epoch model's filter may keep no caption, and these tests are of replacing captions.
    # completion.distinct is on by default: its all-gather runs in lockstep on the 2 ranks.
    first = _train_ds(synth_dir, run, tok, "train.max_steps=12", "completion.filter=false")
    metrics_first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    saved = _completion_state(run, "step12")
    _train_ds(synth_dir, run, tok, "train.max_steps=14", "train.resume=latest", "eval.enabled=false",
              "completion.filter=false")
    return run, first, metrics_first, saved


@pytest.mark.slow
@pytest.mark.dist
def test_training_with_completion_logs_counters_and_text_panel(completion_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, first, metrics, saved = completion_runs
    logged = [m for m in metrics if "completion/generated" in m]
    assert logged and logged[-1]["completion/generated"] > 0 and logged[-1]["completion/stored_captions"] > 0
    assert any(0 < m.get("completion/replaced", 0) <= 1 for m in metrics)
    duplicates = [m["completion/duplicates"] for m in logged if "completion/duplicates" in m]
    assert duplicates and all(0 <= d < 1 for d in duplicates)
    recall = [m["completion/concept_recall"] for m in logged if "completion/concept_recall" in m]
    assert recall and all(0 <= r <= 1 for r in recall)  # the synthetic shards carry their object lists
    assert "eval zeroshot_top1" in first.stdout  # the run finished through its evaluation
    acc = EventAccumulator(str(run / "tensorboard" / "nlip"), size_guidance={"tensors": 0}).Reload()
    panels = acc.Tensors("completion/samples/text_summary")
    # one refresh, at the first stage-1 step (the next was due 6 steps later, after the resumed run's end)
    assert [p.step for p in panels] == [saved["concepts"]["refreshed_at_step"]]
    text = panels[0].tensor_proto.string_val[0].decode()
    assert "original caption" in text and "retrieved concepts" in text and "synthetic caption" in text
    assert "similarity to the image" in text
    assert all(m["completion/kept"] == 1.0 for m in logged if m["completion/generated"])  # no filter: all kept
    assert len(saved["captions"]["ids"]) == logged[-1]["completion/stored_captions"]


@pytest.mark.slow
@pytest.mark.dist
def test_caption_store_and_concept_cache_survive_resume(completion_runs):
    from nlip_ds.data.tokenizer import load_tokenizer

    run, _, metrics, saved = completion_runs
    assert 0 < saved["concepts"]["refreshed_at_step"] < 12 and saved["concepts"]["embeddings"] is not None
    resumed = _completion_state(run, "step14")
    # restored, not restarted: no refresh at the first resumed step (12), the very embeddings saved at step 12
    assert resumed["concepts"]["refreshed_at_step"] == saved["concepts"]["refreshed_at_step"]
    assert torch.equal(resumed["concepts"]["embeddings"], saved["concepts"]["embeddings"])
    before = dict(zip(saved["captions"]["ids"].tolist(), saved["captions"]["tokens"]))
    after = dict(zip(resumed["captions"]["ids"].tolist(), resumed["captions"]["tokens"]))
    steps = dict(zip(resumed["captions"]["ids"].tolist(), resumed["captions"]["step"].tolist()))
    assert set(before) <= set(after)
    for sid, tokens in before.items():
        if steps[sid] < 12:  # not regenerated after the resume: exactly the saved caption
            assert torch.equal(after[sid], tokens)
    assert resumed["generated"] >= saved["generated"]
    # the saved state loads into a fresh Completer and gives it back unchanged
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", ["completion.max_tokens=8", "completion.min_tokens=2",
                                                           f"completion.vocabulary={_vocabulary(run)}"])
    completer = Completer(cfg, load_tokenizer(run.parent / "tokenizer"))
    completer.load_state_dict(saved)
    again = completer.state_dict()
    assert torch.equal(again["concepts"]["embeddings"], saved["concepts"]["embeddings"])
    assert all(torch.equal(again["captions"][k], saved["captions"][k]) for k in ("ids", "tokens", "epoch", "step"))


def _vocabulary(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["completion"]["vocabulary"]
