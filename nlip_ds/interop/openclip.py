"""`open_clip`: a model config JSON, weights and the tokenizer, in the two layouts open_clip reads.

- `open_clip.add_model_config(dir)` then `open_clip.create_model_and_transforms(NAME, pretrained=dir +
  "/open_clip_model.safetensors")` and `open_clip.get_tokenizer(NAME)`: NAME.json is the model config; its
  `hf_tokenizer_name` is this folder's absolute path (open_clip reads the tokenizer through transformers).
- `open_clip.create_model_and_transforms("local-dir:" + dir)` and `open_clip.get_tokenizer("local-dir:" + dir)`:
  open_clip_config.json, which names no path, so the folder can move.

The text tower pools at the tokenizer's [EOS] (open_clip's pool_type "eos"): our [EOS] is not the highest
token id, which open_clip's default "argmax" pooling assumes. open_clip is not needed to write the folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from nlip_ds.data.samples import MEAN, STD
from nlip_ds.interop.folder import fast_tokenizer
from nlip_ds.interop.towers import ClipTowers, Tower

WEIGHTS = "open_clip_model.safetensors"
LOCAL_CONFIG = "open_clip_config.json"

USAGE = """```python
import open_clip
open_clip.add_model_config("{dir}")
model, _, preprocess = open_clip.create_model_and_transforms("{name}", pretrained="{dir}/{weights}")
tokenizer = open_clip.get_tokenizer("{name}")
# or, wherever the folder is moved: create_model_and_transforms("local-dir:{dir}"), get_tokenizer("local-dir:{dir}")
```"""


def model_config(towers: ClipTowers, tokenizer_name: str) -> dict:
    """open_clip's CLIP model config. Under the local-dir: schema open_clip reads the tokenizer from the folder
    whatever `tokenizer_name` says, as long as it is not empty."""
    v, t = towers.vision, towers.text
    text_cfg = {"context_length": towers.context_length, "vocab_size": towers.vocab_size, "width": t.width,
                "heads": t.heads, "layers": t.depth, "mlp_ratio": t.mlp_dim / t.width,
                "pad_id": towers.special["pad_id"], "eos_id": towers.special["eos_id"], "pool_type": "eos",
                "proj_bias": False, "norm_kwargs": {"eps": t.eps}, "hf_tokenizer_name": tokenizer_name}
    vision_cfg = {"image_size": towers.image_size, "patch_size": towers.patch_size, "layers": v.depth,
                  "width": v.width, "head_width": v.width // v.heads, "mlp_ratio": v.mlp_dim / v.width,
                  "norm_kwargs": {"eps": v.eps}}
    return {"embed_dim": towers.embed_dim, "quick_gelu": v.act == "quick_gelu", "vision_cfg": vision_cfg,
            "text_cfg": text_cfg}


def preprocess_config(towers: ClipTowers) -> dict:
    return {"size": towers.image_size, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
            "resize_mode": "shortest"}


def _resblocks(prefix: str, tower: Tower) -> dict:
    out = {}
    for i, b in enumerate(tower.blocks):
        p = f"{prefix}transformer.resblocks.{i}."
        out.update({p + "ln_1.weight": b.ln1_w, p + "ln_1.bias": b.ln1_b,
                    p + "attn.in_proj_weight": b.qkv_w, p + "attn.in_proj_bias": b.qkv_b,
                    p + "attn.out_proj.weight": b.out_w, p + "attn.out_proj.bias": b.out_b,
                    p + "ln_2.weight": b.ln2_w, p + "ln_2.bias": b.ln2_b,
                    p + "mlp.c_fc.weight": b.fc1_w, p + "mlp.c_fc.bias": b.fc1_b,
                    p + "mlp.c_proj.weight": b.fc2_w, p + "mlp.c_proj.bias": b.fc2_b})
    return out


def openclip_state_dict(towers: ClipTowers) -> dict[str, torch.Tensor]:
    """open_clip CLIP's state dict; its projections are (in, out) matrices applied as x @ proj."""
    v, t = towers.vision.parts, towers.text.parts
    return {
        "visual.conv1.weight": v["patch"], "visual.class_embedding": v["class"],
        "visual.positional_embedding": v["position"],
        "visual.ln_pre.weight": v["ln_pre_w"], "visual.ln_pre.bias": v["ln_pre_b"],
        **_resblocks("visual.", towers.vision),
        "visual.ln_post.weight": v["ln_post_w"], "visual.ln_post.bias": v["ln_post_b"],
        "visual.proj": v["proj"].T,  # (Dv, E)
        "token_embedding.weight": t["token"], "positional_embedding": t["position"],
        **_resblocks("", towers.text),
        "ln_final.weight": t["ln_final_w"], "ln_final.bias": t["ln_final_b"],
        "text_projection": t["proj"].T,  # (Dt, E)
        "logit_scale": torch.tensor(towers.log_scale),
    }


def write_open_clip(towers: ClipTowers, out_dir: Path, tokenizer_dir: Path, name: str) -> Path:
    state = {k: w.detach().float().contiguous().clone() for k, w in openclip_state_dict(towers).items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    fast_tokenizer(tokenizer_dir, towers.context_length).save_pretrained(out_dir)
    named = model_config(towers, str(out_dir.resolve()))
    (out_dir / f"{name}.json").write_text(json.dumps(named, indent=2) + "\n")
    local = {"model_cfg": model_config(towers, "."), "preprocess_cfg": preprocess_config(towers)}
    (out_dir / LOCAL_CONFIG).write_text(json.dumps(local, indent=2) + "\n")
    return out_dir


def files(name: str) -> dict[str, str]:
    return {f"{name}.json": "open_clip model config (add_model_config); hf_tokenizer_name points at this folder",
            LOCAL_CONFIG: "model and preprocess config for the local-dir: schema",
            WEIGHTS: "CLIP weights: visual.*, token/positional embeddings, transformer.*, ln_final, "
                     "text_projection, logit_scale",
            "tokenizer.json, tokenizer_config.json": "the run's tokenizer, read by open_clip's HFTokenizer"}
