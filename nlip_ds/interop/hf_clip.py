"""`hf-clip`: a folder that transformers' CLIPModel, CLIPProcessor (or AutoProcessor) and the
zero-shot-image-classification pipeline load offline (`from_pretrained(dir)`).

It holds config.json and model.safetensors (both towers, both projections, the logit scale), the tokenizer as a
fast tokenizer, and preprocessor_config.json with our eval transform: the short side resized to the image size
(bicubic), the centre square, CLIP's mean and std.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
from transformers.image_utils import PILImageResampling
from transformers.initialization import no_init_weights

from nlip_ds.data.samples import MEAN, STD
from nlip_ds.interop.folder import fast_tokenizer
from nlip_ds.interop.towers import ClipTowers, Tower

FILES = {"config.json": "CLIPConfig (both towers' shapes and activations, projection size, logit scale)",
         "model.safetensors": "CLIPModel weights: vision_model, text_model, visual_projection, "
                              "text_projection, logit_scale",
         "tokenizer.json, tokenizer_config.json": "the run's tokenizer as a fast tokenizer",
         "processor_config.json": "CLIPProcessor: image processor settings of the eval transform"}

USAGE = """```python
from transformers import CLIPModel, CLIPProcessor, pipeline
model = CLIPModel.from_pretrained("{dir}")
processor = CLIPProcessor.from_pretrained("{dir}")
inputs = processor(text=["a photo of a cat", "a photo of a dog"], images=image, return_tensors="pt",
                   padding=True)
probs = model(**inputs).logits_per_image.softmax(dim=1)
classify = pipeline("zero-shot-image-classification", model="{dir}")
```
`CLIPProcessor.from_pretrained(dir, backend="pil")` resizes with PIL exactly as nlip-ds evaluates; the default
torchvision backend differs from it by interpolation rounding when an image is resized."""


def hf_config(towers: ClipTowers) -> CLIPConfig:
    v, t = towers.vision, towers.text
    text = dict(vocab_size=towers.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                num_hidden_layers=t.depth, num_attention_heads=t.heads, max_position_embeddings=towers.context_length,
                hidden_act=t.act, layer_norm_eps=t.eps, projection_dim=towers.embed_dim,
                pad_token_id=towers.special["pad_id"], bos_token_id=towers.special["bos_id"],
                eos_token_id=towers.special["eos_id"])
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                  num_attention_heads=v.heads, image_size=towers.image_size, patch_size=towers.patch_size,
                  hidden_act=v.act, layer_norm_eps=v.eps, projection_dim=towers.embed_dim, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=towers.embed_dim,
                      logit_scale_init_value=towers.log_scale)


def _layers(prefix: str, tower: Tower) -> dict:
    out = {}
    for i, b in enumerate(tower.blocks):
        p = f"{prefix}.encoder.layers.{i}."
        q, k, v = b.qkv_w.chunk(3)  # (D, D) each
        qb, kb, vb = b.qkv_b.chunk(3)
        out.update({p + "layer_norm1.weight": b.ln1_w, p + "layer_norm1.bias": b.ln1_b,
                    p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
                    p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
                    p + "self_attn.v_proj.weight": v, p + "self_attn.v_proj.bias": vb,
                    p + "self_attn.out_proj.weight": b.out_w, p + "self_attn.out_proj.bias": b.out_b,
                    p + "layer_norm2.weight": b.ln2_w, p + "layer_norm2.bias": b.ln2_b,
                    p + "mlp.fc1.weight": b.fc1_w, p + "mlp.fc1.bias": b.fc1_b,
                    p + "mlp.fc2.weight": b.fc2_w, p + "mlp.fc2.bias": b.fc2_b})
    return out


def hf_state_dict(towers: ClipTowers) -> dict[str, torch.Tensor]:
    """CLIPModel's state dict, key for key."""
    v, t = towers.vision.parts, towers.text.parts
    return {
        "vision_model.embeddings.class_embedding": v["class"],
        "vision_model.embeddings.patch_embedding.weight": v["patch"],
        "vision_model.embeddings.position_embedding.weight": v["position"],
        "vision_model.pre_layrnorm.weight": v["ln_pre_w"], "vision_model.pre_layrnorm.bias": v["ln_pre_b"],
        **_layers("vision_model", towers.vision),
        "vision_model.post_layernorm.weight": v["ln_post_w"], "vision_model.post_layernorm.bias": v["ln_post_b"],
        "text_model.embeddings.token_embedding.weight": t["token"],
        "text_model.embeddings.position_embedding.weight": t["position"],
        **_layers("text_model", towers.text),
        "text_model.final_layer_norm.weight": t["ln_final_w"], "text_model.final_layer_norm.bias": t["ln_final_b"],
        "visual_projection.weight": v["proj"],
        "text_projection.weight": t["proj"],
        "logit_scale": torch.tensor(towers.log_scale),
    }


def image_processor(image_size: int) -> CLIPImageProcessor:
    """Our eval transform (data/samples.py eval_transform + normalize) in transformers' terms."""
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              resample=PILImageResampling.BICUBIC, do_center_crop=True, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=list(MEAN), image_std=list(STD),
                              do_convert_rgb=True)


def write_hf_clip(towers: ClipTowers, out_dir: Path, tokenizer_dir: Path) -> Path:
    """Write the folder; a strict load of the state dict proves every CLIPModel tensor came from ours."""
    with no_init_weights():
        model = CLIPModel(hf_config(towers))
    model.load_state_dict({k: w.detach().float().contiguous() for k, w in hf_state_dict(towers).items()},
                          strict=True)
    model.save_pretrained(out_dir)
    tokenizer = fast_tokenizer(tokenizer_dir, towers.context_length)
    CLIPProcessor(image_processor=image_processor(towers.image_size), tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir
