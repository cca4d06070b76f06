"""Exports read by other libraries (docs/export.md): transformers' CLIPModel / CLIPProcessor / zero-shot pipeline
and open_clip compute our image and text embeddings and logits within 1e-5 on the tiny model and on a
random-weight model of the paper's tower shapes; a model that cannot map exactly is refused, naming the option;
old run configs keep their architecture."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nlip_ds.config import ModelConfig, VisionConfig, from_dict, load_config, to_dict
from nlip_ds.data.samples import eval_transform, normalize
from nlip_ds.interop.folder import Source
from nlip_ds.interop.towers import ExportRefused
from nlip_ds.interop.write import write_exports
from nlip_ds.model import NLIPModel

TOL = 1e-5
CAPTIONS = ["a red circle", "two blue squares on the left", "a green triangle and a yellow star", "a heart",
            "an orange diamond next to a purple ring, with a grey cross at the bottom"]
SOURCE = Source("runs/test", "global_step7", "0123abc", "4567def")


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (n, 3, S, S)


@torch.no_grad()
def _ours(model, tokenizer, images):
    ids, mask = tokenizer.encode(CAPTIONS, model.text.context_length)
    image, text = model.encode_image(images), model.encode_text(ids, mask)
    return ids, mask, image, text, model.logit_scale() * image @ text.T


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def _check_hf(folder, tokenizer, model, images) -> list[float]:
    from transformers import CLIPModel, CLIPProcessor

    ids, mask, image, text, logits = _ours(model, tokenizer, images)
    processor = CLIPProcessor.from_pretrained(str(folder))
    tokens = processor(text=CAPTIONS, padding="max_length", max_length=model.text.context_length, truncation=True,
                       return_tensors="pt")
    assert torch.equal(tokens.input_ids, ids) and torch.equal(tokens.attention_mask, mask)
    out = CLIPModel.from_pretrained(str(folder)).eval()(input_ids=ids, attention_mask=mask, pixel_values=images)
    diffs = [_max_diff(out.image_embeds, image), _max_diff(out.text_embeds, text),
             _max_diff(out.logits_per_image, logits)]
    assert max(diffs) <= TOL, diffs
    return diffs


@torch.no_grad()
def _check_open_clip(model_name, pretrained, tokenizer_name, tokenizer, model, images) -> list[float]:
    import open_clip

    ids, _, image, text, logits = _ours(model, tokenizer, images)
    oc = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)[0]
    assert torch.equal(open_clip.get_tokenizer(tokenizer_name)(CAPTIONS), ids)
    oc.eval()
    image_oc, text_oc = oc.encode_image(images, normalize=True), oc.encode_text(ids, normalize=True)
    logits_oc = oc.logit_scale.exp() * image_oc @ text_oc.T
    diffs = [_max_diff(image_oc, image), _max_diff(text_oc, text), _max_diff(logits_oc, logits)]
    assert max(diffs) <= TOL, diffs
    return diffs


def synth_tokenizer_dir(tokenizer, tmp_path):
    return tokenizer.save(tmp_path / "tokenizer")


@pytest.fixture(scope="module")
def tiny(synth_tokenizer, tmp_path_factory):
    """A random-weight tiny model (the demo's shapes) exported in all three formats."""
    torch.manual_seed(0)
    model = NLIPModel.from_config(ModelConfig(), synth_tokenizer).eval()
    tok_dir = synth_tokenizer.save(tmp_path_factory.mktemp("tok") / "tokenizer")
    out = tmp_path_factory.mktemp("exports")
    written = write_exports(model, tok_dir, out, ["nlip", "hf-clip", "open_clip"], SOURCE, "nlip-tiny-test")
    return model, written


def test_hf_clip_gives_our_embeddings_and_logits(tiny, synth_tokenizer):
    model, written = tiny
    _check_hf(written["hf-clip"], synth_tokenizer, model, _images(4, 32))


def test_open_clip_gives_our_embeddings_and_logits_both_ways_of_loading(tiny, synth_tokenizer):
    import open_clip

    model, written = tiny
    folder = written["open_clip"]
    open_clip.add_model_config(str(folder))
    _check_open_clip("nlip-tiny-test", str(folder / "open_clip_model.safetensors"), "nlip-tiny-test",
                     synth_tokenizer, model, _images(4, 32))
    local = f"local-dir:{folder}"
    _check_open_clip(local, None, local, synth_tokenizer, model, _images(4, 32, seed=1))


def test_open_clip_preprocess_is_our_eval_transform(tiny):
    import open_clip

    _, written = tiny
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{written['open_clip']}")
    for image in _pil_images([(48, 40), (100, 37), (32, 32)]):
        ours = normalize(eval_transform(image, 32)[None])[0]
        assert _max_diff(preprocess(image), ours) <= TOL


def _pil_images(sizes) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@torch.no_grad()
def test_zero_shot_pipeline_gives_our_predictions(tiny, synth_tokenizer):
    """Scores equal ours where transformers' centre crop and torchvision's agree; (33, 90) resizes to 32 x 87,
    whose odd margin transformers crops one pixel further left (floor, not round): the same top label there
    (its scores move by a few hundredths with the shift, so only the label is compared)."""
    from transformers import AutoImageProcessor, pipeline

    from nlip_ds.eval.zeroshot import class_embeddings

    model, written = tiny
    labels, template = ["circle", "square", "triangle", "star", "heart"], "a photo of a {}."
    sizes = [(32, 32), (48, 40), (100, 37), (20, 24), (64, 64), (33, 90)]
    images = _pil_images(sizes)
    classes = class_embeddings(model, synth_tokenizer, labels, [template], model.text.context_length, "cpu")
    pixels = normalize(torch.stack([eval_transform(im, 32) for im in images]))
    ours = (model.logit_scale() * model.encode_image(pixels) @ classes.T).softmax(dim=1)  # (N, C)
    folder = str(written["hf-clip"])
    # backend="pil" resizes as our eval transform does; the default torchvision backend rounds differently
    classify = pipeline("zero-shot-image-classification", model=folder,
                        image_processor=AutoImageProcessor.from_pretrained(folder, backend="pil"))
    for size, result, mine in zip(sizes, classify(images, candidate_labels=labels, hypothesis_template=template),
                                  ours):
        assert result[0]["label"] == labels[int(mine.argmax())], size
        if size == (33, 90):
            continue  # a one-pixel shift of the crop moves the scores by up to a few hundredths
        scores = torch.tensor([next(r["score"] for r in result if r["label"] == c) for c in labels])
        assert _max_diff(scores, mine) <= TOL, size


def test_each_folder_has_a_readme_naming_the_run_and_what_is_left_out(tiny):
    _, written = tiny
    for fmt, folder in written.items():
        text = (folder / "README.md").read_text()
        assert SOURCE.run_dir in text and SOURCE.train_sha in text and SOURCE.checkpoint in text, fmt
        assert ("no standard home" in text) == (fmt != "nlip"), fmt
    assert (written["nlip"] / "config.json").is_file() and (written["hf-clip"] / "model.safetensors").is_file()


def test_timm_layout_is_refused_naming_the_option_and_nothing_is_written(synth_tokenizer, tmp_path):
    model = NLIPModel.from_config(ModelConfig(vision=VisionConfig(layout="timm")), synth_tokenizer)
    for fmt in ("hf-clip", "open_clip"):
        with pytest.raises(ExportRefused, match=r"model\.vision\.layout=timm.*patch-embedding bias"):
            write_exports(model, synth_tokenizer_dir(synth_tokenizer, tmp_path), tmp_path / "out",
                          ["nlip", fmt], SOURCE)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gelu_tower_maps_to_hf_clip_but_open_clip_is_refused(synth_tokenizer, tmp_path):
    """timm's named CLIP ViT keeps its GELU under layout=timm: transformers has an activation per tower, open_clip
    one for both."""
    vision = VisionConfig(name="vit_base_patch32_clip_224", layout="timm", image_size=64, patch_size=32, width=768,
                          depth=12, heads=12)
    torch.manual_seed(1)
    model = NLIPModel.from_config(ModelConfig(vision=vision), synth_tokenizer).eval()
    with pytest.raises(ExportRefused, match=r"open_clip: .*gelu.*model\.vision\.layout=timm"):
        write_exports(model, synth_tokenizer_dir(synth_tokenizer, tmp_path), tmp_path / "oc", ["open_clip"], SOURCE)
    written = write_exports(model, synth_tokenizer_dir(synth_tokenizer, tmp_path), tmp_path / "hf", ["hf-clip"],
                            SOURCE)
    assert json.loads((written["hf-clip"] / "config.json").read_text())["vision_config"]["hidden_act"] == "gelu"
    _check_hf(written["hf-clip"], synth_tokenizer, model, _images(2, 64))


@pytest.mark.slow
def test_paper_shapes_map_exactly(synth_tokenizer, tmp_path):
    """ViT-B/32 at 224 px and the 12-layer, 512-wide text tower of configs/vit-b32-yfcc26m.yaml (random weights;
    the decoders, which are not exported, shrunk to save time)."""
    import open_clip

    cfg = load_config("configs/vit-b32-yfcc26m.yaml", ["model.decoder.depth=1", "model.mae.enabled=false"])
    torch.manual_seed(2)
    model = NLIPModel.from_config(cfg.model, synth_tokenizer).eval()
    written = write_exports(model, synth_tokenizer_dir(synth_tokenizer, tmp_path), tmp_path / "out",
                            ["hf-clip", "open_clip"], SOURCE, "nlip-paper-test")
    images = _images(2, 224)
    _check_hf(written["hf-clip"], synth_tokenizer, model, images)
    open_clip.add_model_config(str(written["open_clip"]))
    _check_open_clip("nlip-paper-test", str(written["open_clip"] / "open_clip_model.safetensors"), "nlip-paper-test",
                     synth_tokenizer, model, images)


def test_old_run_configs_keep_the_timm_layout(synth_tokenizer, tmp_path):
    """A resolved config written before model.vision.layout existed loads as layout=timm, and so does an old
    nlip export (its weights load strictly into that architecture)."""
    old = to_dict(load_config(None, ["model.vision.layout=timm"]))
    del old["model"]["vision"]["layout"]
    assert from_dict(old).model.vision.layout == "timm"
    assert load_config().model.vision.layout == "clip"
    model = NLIPModel.from_config(ModelConfig(vision=VisionConfig(layout="timm")), synth_tokenizer)
    folder = model.save_pretrained(tmp_path / "old")
    meta = json.loads((folder / "config.json").read_text())
    del meta["model"]["vision"]["layout"]
    (folder / "config.json").write_text(json.dumps(meta))
    loaded = NLIPModel.from_pretrained(folder)
    assert loaded.config.vision == model.config.vision


def test_export_command_prints_the_refusal_in_one_line(cli, monkeypatch, synth_tokenizer, tmp_path):
    from nlip_ds.train import export as export_module

    tok_dir = synth_tokenizer_dir(synth_tokenizer, tmp_path)
    cfg = load_config(None, ["model.vision.layout=timm", f"data.tokenizer={tok_dir}"])
    model = NLIPModel.from_config(cfg.model, synth_tokenizer)
    (tmp_path / "run" / "checkpoints" / "global_step3").mkdir(parents=True)
    monkeypatch.setattr(export_module, "load_run_model",
                        lambda run_dir, tag: (model, cfg, tmp_path / "run" / "checkpoints" / "global_step3"))
    status, out, err = cli("export", "--checkpoint", tmp_path / "run", "--out", tmp_path / "x", "--format", "hf-clip")
    assert status == 2 and err.count("\n") == 1 and "model.vision.layout=timm" in err
    status, out, err = cli("export", "--checkpoint", tmp_path / "run", "--out", tmp_path / "x", "--format", "nlip")
    assert status == 0 and f"exported nlip to {tmp_path / 'x'}" in out
