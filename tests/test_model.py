"""NLIPModel and its modules on tiny CPU configs: shapes, masking, determinism, the caption loss, concept
handling, parameter groups, the apex fallback, export round trip and the paper-scale parameter count."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlip_ds.config import DecoderConfig, MAEConfig, ModelConfig, TextConfig, VisionConfig
from nlip_ds.model import NLIPModel, caption_loss, layers
from nlip_ds.model.mae import patchify, reconstruction_loss
from nlip_ds.model.text import pack_sequence
from nlip_ds.model.vision import ImageEncoder

REPO = Path(__file__).resolve().parent.parent
SPECIAL = dict(vocab_size=100, pad_id=0, bos_id=1, eos_id=2, sep_id=3)


def tiny_config(mae: bool = True, mask_ratio: float = 0.5, concept_dropout: float = 0.5,
                prefix_in_embedding: bool = False) -> ModelConfig:
    cfg = ModelConfig()  # the defaults are the tiny CPU sizes: 32 px, patch 8, width 64, depth 2
    cfg.vision.mask_ratio = mask_ratio
    cfg.text.concept_dropout = concept_dropout
    cfg.text.prefix_in_embedding = prefix_in_embedding
    cfg.mae.enabled = mae
    return cfg


def build(seed: int = 0, **kwargs) -> NLIPModel:
    torch.manual_seed(seed)
    return NLIPModel(tiny_config(**kwargs), **SPECIAL)


def make_batch(seed: int = 0, batch: int = 4, with_concepts: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 9, 3][:batch]
    ids = torch.zeros(batch, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, 100, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 1, 2  # [BOS] ... [EOS]
    out = {"image": torch.randn(batch, 3, 32, 32, generator=g), "input_ids": ids,
           "attention_mask": (ids != 0).long()}
    if with_concepts:
        concepts = torch.randint(4, 100, (batch, 5), generator=g)
        concepts[0, 3:] = 0
        concepts[2] = 0  # no concepts for this sample
        out["concept_ids"], out["concept_mask"] = concepts, (concepts != 0).long()
    return out


def test_forward_shapes_dtypes_and_normalization():
    model = build()
    batch = make_batch()
    out = model(batch)
    assert set(out) == {"image_features", "text_features", "logit_scale", "caption_logits", "caption_labels",
                        "mae_loss"}
    assert out["image_features"].shape == out["text_features"].shape == (4, 64)
    assert out["image_features"].dtype == out["text_features"].dtype == torch.float32
    torch.testing.assert_close(out["image_features"].norm(dim=1), torch.ones(4))
    torch.testing.assert_close(out["text_features"].norm(dim=1), torch.ones(4))
    assert out["logit_scale"].shape == () and out["logit_scale"].requires_grad
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["caption_logits"].shape == (4, 8, 100)
    labels = out["caption_labels"]
    assert labels.dtype == torch.long and labels.shape == (4, 8)
    torch.testing.assert_close(labels, batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0,
                                                                            -100))
    assert out["mae_loss"].shape == (4,) and bool(torch.isfinite(out["mae_loss"]).all())


def test_logit_scale_is_clamped_and_differentiable():
    model = build()
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(torch.tensor(500.0).log())
    assert model.logit_scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(torch.tensor(20.0).log())
    model.logit_scale().backward()
    assert model.logit_scale.log_scale.grad.item() == pytest.approx(20.0, rel=1e-5)  # d exp(x)/dx


@pytest.mark.parametrize("prefix_in_embedding", [False, True])
def test_eval_mode_has_no_mask_and_no_mae_loss_and_matches_encoders(prefix_in_embedding):
    model = build(prefix_in_embedding=prefix_in_embedding).eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
        assert "mae_loss" not in out
        torch.testing.assert_close(out["image_features"], model.encode_image(batch["image"]))
        caption = batch["input_ids"], batch["attention_mask"]
        with_prefix = model.encode_text(*caption, batch["concept_ids"], batch["concept_mask"])
        expected, other = (with_prefix, model.encode_text(*caption)) if prefix_in_embedding else \
            (model.encode_text(*caption), with_prefix)
        torch.testing.assert_close(out["text_features"], expected)
        assert not torch.allclose(out["text_features"], other)
        assert model.image_tokens(batch["image"]).shape == (4, 1 + 16, 64)


def test_decoder_memory_in_training_is_the_prefix_features_generation_uses():
    """Both ways of feeding the prefix give the decoder the same concept features (T_e is causal), and they
    are what generation builds its memory from: teacher-forced logits are equal either way."""
    batch = make_batch()
    logits = []
    for prefix_in_embedding in (False, True):
        model = build(prefix_in_embedding=prefix_in_embedding, mae=False).eval()
        with torch.no_grad():
            logits.append(model(batch)["caption_logits"])
            joint = model.text(batch["input_ids"], batch["attention_mask"], batch["concept_ids"],
                               batch["concept_mask"])
            alone = model._concept_features(batch["concept_ids"], batch["concept_mask"])
        torch.testing.assert_close(alone.concept_features[alone.concept_mask],
                                   joint.concept_features[joint.concept_mask])
    torch.testing.assert_close(logits[0], logits[1])


def test_caption_and_prefix_in_one_text_encoder_call_equal_two_calls():
    """Training runs T_e once over captions and prefixes stacked (so ZeRO-3 may gather its layers whole): the
    caption embedding and the concept features are those of the caption alone and of the prefix alone."""
    batch = make_batch()
    model = build(mae=False).train()
    caption, prefix = model._caption_and_prefix(batch["input_ids"], batch["attention_mask"], batch["concept_ids"],
                                                batch["concept_mask"])
    alone = model.text(batch["input_ids"], batch["attention_mask"])
    concepts = model._concept_features(batch["concept_ids"], batch["concept_mask"])
    torch.testing.assert_close(caption.pooled, alone.pooled)
    assert torch.equal(prefix.concept_mask, concepts.concept_mask) and prefix.concept_mask.any()
    torch.testing.assert_close(prefix.concept_features[prefix.concept_mask],
                               concepts.concept_features[concepts.concept_mask])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_patch_masking_keeps_the_requested_share(ratio):
    torch.manual_seed(0)
    encoder = ImageEncoder(VisionConfig())
    encoder.init_weights()
    images = torch.randn(3, 3, 32, 32)
    out = encoder(images, ratio, torch.Generator().manual_seed(1))
    keep = int(16 * (1 - ratio))
    assert out.tokens.shape == (3, 1 + keep, 64)
    assert out.mask.shape == (3, 16)
    assert out.mask.sum(1).tolist() == [16 - keep] * 3
    # the kept patches are the unmasked ones: the first `keep` entries of the shuffle restored by ids_restore
    shuffled_mask = out.mask.gather(1, out.ids_restore.argsort(1))
    assert shuffled_mask[:, :keep].sum() == 0 and shuffled_mask[:, keep:].min() == 1
    assert not torch.equal(out.mask[0], out.mask[1])  # per-sample masks


def test_same_seed_same_outputs_and_other_seed_differs():
    batch = make_batch()
    outs = []
    for model_seed, run_seed in [(0, 5), (0, 5), (0, 6)]:
        model = build(seed=model_seed).train()
        torch.manual_seed(run_seed)  # decoder dropout draws from the global RNG
        outs.append(model(batch, generator=torch.Generator().manual_seed(run_seed)))
    for key in outs[0]:
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=0, atol=0)
    assert not torch.equal(outs[0]["mae_loss"], outs[2]["mae_loss"])


def test_caption_loss_equals_hand_written_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=g)
    labels = torch.tensor([[1, 4, 6, -100], [0, -100, -100, -100], [2, 2, 5, 3]])
    weights = torch.tensor([0.9, 0.2, 0.5])
    eps, vocab = 0.1, 7
    expected_per_sample = []
    for i in range(3):
        terms = []
        for t in range(4):
            if labels[i, t] == -100:
                continue
            logp = logits[i, t].log_softmax(-1)
            terms.append(-(1 - eps) * logp[labels[i, t]] - eps / vocab * logp.sum())
        expected_per_sample.append(sum(terms) / len(terms))
    expected_per_sample = torch.stack(expected_per_sample)
    loss, per_sample = caption_loss(logits, labels, weights, label_smoothing=eps)
    torch.testing.assert_close(per_sample, expected_per_sample)
    torch.testing.assert_close(loss, (weights * expected_per_sample).sum() / 3)
    unweighted, _ = caption_loss(logits, labels, label_smoothing=eps)
    torch.testing.assert_close(unweighted, expected_per_sample.mean())


def test_caption_loss_ignores_zero_weight_samples_and_gives_them_no_gradient():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, -100], [3, 4, 0]])
    loss, per_sample = caption_loss(logits, labels, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, per_sample[0] / 2)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


def test_pack_sequence_left_packs_and_cuts_concepts_first():
    caption = torch.tensor([[1, 7, 8, 2, 0], [1, 9, 2, 0, 0]])
    concepts = torch.tensor([[20, 21, 0], [0, 0, 0]])
    ids, valid, n = pack_sequence(caption, caption != 0, concepts, concepts != 0, sep_id=3, pad_id=0, max_len=9)
    assert ids.tolist() == [[20, 21, 3, 1, 7, 8, 2, 0, 0], [1, 9, 2, 0, 0, 0, 0, 0, 0]]
    assert n.tolist() == [2, 0] and valid.sum(1).tolist() == [7, 3]
    ids, _, n = pack_sequence(caption, caption != 0, concepts, concepts != 0, sep_id=3, pad_id=0, max_len=6)
    assert ids.tolist() == [[20, 3, 1, 7, 8, 2], [1, 9, 2, 0, 0, 0]] and n.tolist() == [1, 0]


def test_concept_features_never_see_the_caption():
    """T_e is causal: the decoder's concept memory is the same with any caption, or with none (generation)."""
    model = build().eval()
    batch = make_batch()
    other = make_batch(seed=1)
    with torch.no_grad():
        a = model.text(batch["input_ids"], batch["attention_mask"], batch["concept_ids"], batch["concept_mask"])
        b = model.text(other["input_ids"], other["attention_mask"], batch["concept_ids"], batch["concept_mask"])
        empty = batch["input_ids"][:, :0]
        c = model.text(empty, empty, batch["concept_ids"], batch["concept_mask"])
    assert a.concept_mask.sum(1).tolist() == [3, 5, 0, 5]
    for out in (b, c):
        torch.testing.assert_close(out.concept_mask, a.concept_mask)
        torch.testing.assert_close(out.concept_features * a.concept_mask[..., None],
                                   a.concept_features * a.concept_mask[..., None])
    assert not torch.allclose(a.pooled, b.pooled)


@pytest.mark.parametrize("prefix_in_embedding", [False, True])
def test_concept_dropout_drops_whole_prefix_in_training_only(prefix_in_embedding):
    batch = make_batch()
    no_concepts = {k: v for k, v in batch.items() if not k.startswith("concept")}
    model = build(mae=False, mask_ratio=0.0, concept_dropout=1.0, prefix_in_embedding=prefix_in_embedding)
    for module in model.modules():  # dropout off, so only the concept handling differs between passes
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        dropped = model.train()(batch)
        plain = model(no_concepts)
        used = model.eval()(batch)
    torch.testing.assert_close(dropped["text_features"], plain["text_features"])
    torch.testing.assert_close(dropped["caption_logits"], plain["caption_logits"])
    assert not torch.allclose(used["caption_logits"][0], plain["caption_logits"][0])  # the decoder reads them
    torch.testing.assert_close(used["caption_logits"][2], plain["caption_logits"][2])  # sample 2 has none
    if prefix_in_embedding:
        assert not torch.allclose(used["text_features"][0], plain["text_features"][0])
    else:  # the embedding reads the caption alone
        torch.testing.assert_close(used["text_features"], plain["text_features"])


def test_param_groups_exclude_biases_norms_embeddings_and_logit_scale():
    model = build()
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert not decay_ids & no_decay_ids
    assert decay_ids | no_decay_ids == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[i] for i in decay_ids}
    excluded = {names[i] for i in no_decay_ids}
    for name in ("logit_scale.log_scale", "vision.vit.cls_token", "vision.vit.pos_embed", "mae.mask_token",
                 "text.transformer.embeddings.token_embedding.weight", "decoder.lm.bert.embeddings.word_embeddings"
                 ".weight", "text.transformer.final_layer_norm.weight", "vision.vit.norm.bias"):
        assert name in excluded, name
    assert all(name.endswith("weight") for name in decayed)
    assert {"image_proj.weight", "vision.vit.patch_embed.proj.weight",
            "decoder.lm.cls.predictions.decoder.weight"} <= decayed
    assert not any("norm" in n.lower() or n.endswith("bias") for n in decayed)


def test_no_parameter_is_shared_between_modules():
    model = build()
    seen = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            assert id(param) not in seen, f"{module_name}.{name} is also {seen[id(param)]}"
            seen[id(param)] = f"{module_name}.{name}"


def test_layer_norm_falls_back_to_torch_and_logs_once(caplog, monkeypatch):
    assert not layers.apex_available()  # apex is not installed in the test environment
    model = build()
    assert not [m for m in model.modules() if type(m) is nn.LayerNorm]
    norms = [m for m in model.modules() if isinstance(m, layers.LayerNorm)]
    assert len(norms) > 10  # ViT, CLIP text, BERT decoder and MAE norms all converted
    monkeypatch.setattr(layers, "layer_norm_backend", None)
    with caplog.at_level(logging.INFO, logger="nlip_ds.model.layers"):
        model(make_batch())
        model(make_batch())
    assert [r.getMessage() for r in caplog.records if "LayerNorm" in r.getMessage()] == [
        "LayerNorm: torch (apex not installed)"]
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(norms[0](x), F.layer_norm(x, (64,), norms[0].weight, norms[0].bias, norms[0].eps))


def test_layer_norm_with_apex_uses_torch_on_cpu_inputs(monkeypatch):
    calls = []
    monkeypatch.setattr(layers, "_APEX_LAYER_NORM", lambda **kw: calls.append(kw))
    monkeypatch.setattr(layers, "layer_norm_backend", None)
    norm = layers.LayerNorm(8)
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (8,), norm.weight, norm.bias, norm.eps))
    assert calls == [] and layers.layer_norm_backend == "torch"


def test_mae_patchify_order_and_masked_only_loss():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    patches = patchify(images, 2)  # (B, 4, 2*2*3)
    assert patches.shape == (2, 4, 12)
    assert patches[0, 1, :3].tolist() == images[0, :, 0, 2].tolist()  # patch (row 0, col 1), top-left pixel
    assert patches[0, 2, :3].tolist() == images[0, :, 2, 0].tolist()  # patch (row 1, col 0)
    target = torch.randn(1, 4, 12)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = normed.clone()
    pred[0, 0] += 1.0  # wrong only on patch 0
    assert reconstruction_loss(pred, target, torch.tensor([[0.0, 1, 1, 0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert reconstruction_loss(pred, target, torch.tensor([[1.0, 0, 0, 0]])).item() == pytest.approx(1.0)


def test_local_timm_weights_load_and_named_model_is_checked(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = ImageEncoder(VisionConfig())
    source.init_weights()
    save_file({k: v.contiguous() for k, v in source.vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    torch.manual_seed(1)
    loaded = ImageEncoder(VisionConfig(pretrained_path=str(tmp_path / "vit.safetensors")))
    loaded.init_weights()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images).tokens, source(images).tokens)
    with pytest.raises(FileNotFoundError, match="model.vision.pretrained_path"):
        ImageEncoder(VisionConfig(pretrained_path=str(tmp_path / "missing.pth"))).init_weights()
    with pytest.raises(ValueError, match="model.vision.width"):
        with torch.device("meta"):
            ImageEncoder(VisionConfig(name="vit_tiny_patch16_224", image_size=224, patch_size=16, width=64))


def test_save_load_round_trip_is_exact_and_needs_no_deepspeed(tmp_path):
    model = build().eval()
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"fake": true}')
    export = model.save_pretrained(tmp_path / "export", tokenizer_dir=tokenizer)
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert (export / "tokenizer" / "tokenizer.json").read_text() == '{"fake": true}'
    assert json.loads((export / "config.json").read_text())["eos_id"] == 2
    loaded = NLIPModel.from_pretrained(export)
    assert not loaded.training
    batch = make_batch()
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    torch.save(a["caption_logits"], tmp_path / "expected.pt")
    torch.save(batch, tmp_path / "batch.pt")
    script = (  # a fresh interpreter in which importing deepspeed fails
        "import sys, torch; sys.modules['deepspeed'] = None\n"
        "from nlip_ds.model import NLIPModel\n"
        f"m = NLIPModel.from_pretrained({str(export)!r})\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(batch)['caption_logits'], expected)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def paper_config() -> ModelConfig:
    """docs/method.md / configs/vit-b32-yfcc26m.yaml: ViT-B/32 at 224 px, CLIP-size text tower, 6-layer decoder."""
    return ModelConfig(
        vision=VisionConfig(name="vit_base_patch32_224", image_size=224, patch_size=32, width=768, depth=12,
                            heads=12, mask_ratio=0.5),
        text=TextConfig(width=512, depth=12, heads=8, context_length=77),
        decoder=DecoderConfig(width=512, depth=6, heads=8, max_length=40),
        mae=MAEConfig(enabled=True, width=512, depth=4, heads=16), embed_dim=512)


def test_paper_scale_config_builds_on_meta_with_expected_parameter_count():
    with torch.device("meta"):
        model = NLIPModel(paper_config(), vocab_size=49408, pad_id=0, bos_id=49406, eos_id=49407, sep_id=1)
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    assert all(p.is_meta for p in model.parameters())
    # independent anchors: OpenAI CLIP ViT-B/32's image tower is 87,849,216 with its 768 x 512 projection (CLIP's
    # layout: a LayerNorm before the blocks, no patch bias), its text tower (embeddings, 12 blocks, final norm)
    # 63,165,952; timm's own layout (model.vision.layout=timm) is vit_base_patch32_224's 88,224,232 without its
    # 769,000-weight ImageNet head
    assert counts["vision"] == 87_849_216 - 768 * 512 == 87_456_000
    assert counts["text"] == 63_165_952
    assert counts["decoder"] == 76_809_472  # BERT-6L-512 with cross-attention + memory projections
    assert counts["mae"] == 14_606_336
    assert counts["image_proj"] + counts["text_proj"] + counts["logit_scale"] == 768 * 512 + 512 * 512 + 1
    assert sum(counts.values()) == 242_692_353 + 768
    cfg = paper_config()
    cfg.vision.layout = "timm"
    with torch.device("meta"):
        timm_vision = NLIPModel(cfg, vocab_size=49408, pad_id=0, bos_id=49406, eos_id=49407, sep_id=1).vision
    assert sum(p.numel() for p in timm_vision.parameters()) == 88_224_232 - 769_000 == 87_455_232


def test_init_weights_sets_every_parameter():
    """Construction with init_weights=False leaves memory uninitialized: init_weights() must cover it all."""
    torch.manual_seed(0)
    model = NLIPModel(tiny_config(), init_weights=False, **SPECIAL)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    model.init_weights()
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        assert param.abs().max() < 5, name
    assert model.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)


@pytest.mark.parametrize("layout", ["clip", "timm"])
def test_image_embeddings_differ_between_images_at_init(layout):
    """The CLIP layout normalizes the class token before the blocks; with timm's 0.02 weight scale every image
    then got the same embedding (cosine 1.0000) and small runs barely learned (docs/results.md). CLIP's init
    scales keep the images apart from the first step."""
    cfg = VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2, layout=layout)
    torch.manual_seed(0)
    encoder = ImageEncoder(cfg)
    encoder.init_weights()
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled = F.normalize(encoder(images).pooled, dim=-1)  # (16, W)
    cosine = (pooled @ pooled.T)[~torch.eye(16, dtype=torch.bool)]
    assert cosine.mean() < 0.98, layout  # 0.9999 for the CLIP layout under timm's init


@pytest.mark.parametrize("layout", ["clip", "timm"])
def test_pos_embed_std_sets_the_position_embedding_scale_at_init(layout):
    """model.vision.pos_embed_std draws the position embedding at that scale after the layout's init, and leaves
    every other parameter as the layout's init made it (same seed); unset, the layout's own scale stays."""
    def encoder(std):
        torch.manual_seed(0)
        enc = ImageEncoder(VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2, layout=layout,
                                        pos_embed_std=std))
        enc.init_weights()
        return enc

    default, wide = encoder(None), encoder(1.0)
    assert 0.9 < wide.vit.pos_embed.std().item() < 1.1  # 17 x 64 draws
    assert default.vit.pos_embed.std().item() < 0.2  # CLIP's 64^-0.5 = 0.125, timm's 0.02
    others = {k: v for k, v in default.state_dict().items() if k != "vit.pos_embed"}
    assert all(torch.equal(v, wide.state_dict()[k]) for k, v in others.items())


def test_init_weights_refuses_partitioned_parameters():
    model = build()
    model.text_proj.weight.data = torch.empty(0)  # what DeepSpeed's zero.Init leaves outside a gather
    with pytest.raises(RuntimeError, match="init_weights=False"):
        model.init_weights()


class _Payload:
    """Stands for arbitrary code in a pickle: unpickling it would run __reduce__'s callable."""

    def __reduce__(self):
        return (os.system, ("echo pickled code ran",))


def test_pretrained_pth_is_read_weights_only_and_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save({"pos_embed": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        ImageEncoder(VisionConfig(pretrained_path=str(path))).init_weights()


def test_from_pretrained_names_a_folder_of_another_export_format(tmp_path):
    """An hf-clip / open_clip export also has a config.json: the error says it is not an nlip export."""
    from nlip_ds.model import NLIPModel

    (tmp_path / "config.json").write_text('{"architectures": ["CLIPModel"]}')
    with pytest.raises(ValueError, match=r"not an NLIPModel export .*docs/export.md"):
        NLIPModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("concept_grad", [False, True])
def test_the_caption_loss_trains_the_text_encoder_through_the_prefix_only_with_concept_grad(concept_grad):
    """With the prefix outside the embedding, the decoder's concept features come from a T_e pass over the bare
    concept names; with model.text.concept_grad off that pass carries no gradient and the caption loss leaves
    T_e alone."""
    model = build(mae=False)
    model.config.text.concept_grad = concept_grad
    model.config.text.concept_dropout = 0.0
    out = model(make_batch())
    logits, labels = out["caption_logits"], out["caption_labels"]
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                      ignore_index=-100).backward()
    text_grads = [p.grad for p in model.text.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert bool(text_grads) == concept_grad
    assert model.decoder.memory.concepts.weight.grad.abs().sum() > 0  # the decoder still learns to read them
