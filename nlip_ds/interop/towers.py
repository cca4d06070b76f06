"""NLIPModel's contrastive towers as CLIP's standard pieces, and the checks that they map one to one.

A CLIP model is two pre-norm transformers and a temperature: the image tower (patch convolution without bias,
class token, position embedding, LayerNorm before the blocks, blocks, LayerNorm on the class token, projection
without bias) and the text tower (token and position embeddings, causal blocks, final LayerNorm read at the
end-of-text token, projection without bias). `clip_towers(model)` reads ours into that form, one `Block` per
layer with the attention's q, k, v stacked as one (3D, D) matrix; the writers only rename and reshape. A model
that does not have exactly this form is refused (`check_mappable`), with the config option that makes it
differ: an export is exact or it is not written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from timm.layers import Mlp, QuickGELU
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from nlip_ds.config import VisionConfig

ACTIVATIONS = {QuickGELU: "quick_gelu", nn.GELU: "gelu"}
TEXT_ACT = "quick_gelu"  # model/text.py builds CLIPTextModel with CLIP's QuickGELU


class ExportRefused(ValueError):
    """The run's model cannot be written exactly in the asked format; the message names the config option."""


@dataclass
class Block:
    """One pre-norm transformer block: x + out(attn(ln1(x))), then x + fc2(act(fc1(ln2(x)))). Linear weights
    are (out, in) as in nn.Linear; qkv_w (3D, D) stacks q, k, v in that order."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


@dataclass
class Tower:
    """One tower: shapes, its blocks and its own tensors (`parts`, named after their role)."""

    width: int
    depth: int
    heads: int
    mlp_dim: int
    act: str
    eps: float
    blocks: list[Block] = field(default_factory=list)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ClipTowers:
    """Both towers, the shared embedding size and log(logit scale) as the model applies it (clamped)."""

    vision: Tower
    text: Tower
    embed_dim: int
    image_size: int
    patch_size: int
    context_length: int
    vocab_size: int
    special: dict
    log_scale: float


# ------------------------------------------------------------------------------------------------ checks


def _vit_layout_problem(vit: nn.Module) -> str | None:
    """Why this timm ViT is not CLIP's ViT, or None."""
    names = {n for n, _ in vit.named_parameters()}
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm_pre.weight", "norm_pre.bias",
                "norm.weight", "norm.bias"}
    for i in range(len(vit.blocks)):
        expected |= {f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                       "mlp.fc2") for p in ("weight", "bias")}
    wrong = [what for what, bad in (("a patch-embedding bias", "patch_embed.proj.bias" in names),
                                    ("no LayerNorm before the blocks", "norm_pre.weight" not in names)) if bad]
    if wrong:
        return "it has " + " and ".join(wrong)
    if names != expected:
        extra, missing = sorted(names - expected), sorted(expected - names)
        return f"its parameters differ from CLIP's ViT (extra {extra[:3]}, missing {missing[:3]})"
    for block in vit.blocks:
        if (type(block) is not TimmBlock or type(block.attn) is not Attention or type(block.mlp) is not Mlp
                or type(block.mlp.act) not in ACTIVATIONS or getattr(block.mlp.act, "approximate", "none") != "none"):
            return "its blocks are not plain pre-norm attention + MLP blocks with GELU or QuickGELU"
    if vit.dynamic_img_size or vit.no_embed_class or vit.num_prefix_tokens != 1:
        return "its class token or position embedding differ from CLIP's"
    return None


def _option(cfg: VisionConfig) -> str:
    if cfg.layout != "clip":
        return f"model.vision.layout={cfg.layout}"
    return f"model.vision.name={cfg.name}"


def check_mappable(vision_cfg: VisionConfig, vit: nn.Module, fmt: str) -> None:
    """Refuse `fmt` (hf-clip, open_clip) unless every weight of both towers has exactly one place there."""
    problem = _vit_layout_problem(vit)
    if problem is not None:
        raise ExportRefused(f"{fmt}: the image tower is not CLIP's ViT ({_option(vision_cfg)}: {problem}); "
                            "a run trained with model.vision.layout=clip exports exactly, this one would not, so "
                            "nothing is written (the nlip format holds it)")
    eps = {m.eps for m in vit.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ExportRefused(f"{fmt}: the image tower's LayerNorms use several eps {sorted(eps)} "
                            f"({_option(vision_cfg)}); CLIP has one per tower")
    act = ACTIVATIONS[type(vit.blocks[0].mlp.act)]
    if fmt == "open_clip" and act != TEXT_ACT:
        raise ExportRefused(f"open_clip: the image tower uses {act} and the text tower {TEXT_ACT}, and open_clip "
                            f"has one activation for both ({_option(vision_cfg)}); export hf-clip instead, which "
                            "has one per tower")


# ------------------------------------------------------------------------------------------------ reading


def _vision_tower(vit: nn.Module) -> Tower:
    blocks = [Block(b.norm1.weight, b.norm1.bias, b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj.weight,
                    b.attn.proj.bias, b.norm2.weight, b.norm2.bias, b.mlp.fc1.weight, b.mlp.fc1.bias,
                    b.mlp.fc2.weight, b.mlp.fc2.bias) for b in vit.blocks]
    parts = {"patch": vit.patch_embed.proj.weight,  # (D, 3, p, p)
             "class": vit.cls_token.reshape(-1),  # (D,)
             "position": vit.pos_embed[0],  # (1 + L, D)
             "ln_pre_w": vit.norm_pre.weight, "ln_pre_b": vit.norm_pre.bias,
             "ln_post_w": vit.norm.weight, "ln_post_b": vit.norm.bias}
    first = vit.blocks[0]
    return Tower(vit.embed_dim, len(vit.blocks), first.attn.num_heads, first.mlp.fc1.out_features,
                 ACTIVATIONS[type(first.mlp.act)], vit.norm.eps, blocks, parts)


def _text_tower(transformer: nn.Module) -> Tower:
    cfg, text = transformer.config, transformer  # CLIPTextModel: embeddings, encoder, final_layer_norm

    def block(layer) -> Block:
        att = layer.self_attn
        qkv_w = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])  # (3D, D)
        qkv_b = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])  # (3D,)
        return Block(layer.layer_norm1.weight, layer.layer_norm1.bias, qkv_w, qkv_b, att.out_proj.weight,
                     att.out_proj.bias, layer.layer_norm2.weight, layer.layer_norm2.bias, layer.mlp.fc1.weight,
                     layer.mlp.fc1.bias, layer.mlp.fc2.weight, layer.mlp.fc2.bias)

    parts = {"token": text.embeddings.token_embedding.weight,  # (V, D)
             "position": text.embeddings.position_embedding.weight,  # (T, D)
             "ln_final_w": text.final_layer_norm.weight, "ln_final_b": text.final_layer_norm.bias}
    return Tower(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
                 cfg.hidden_act, cfg.layer_norm_eps, [block(layer) for layer in text.encoder.layers], parts)


@torch.no_grad()
def clip_towers(model) -> ClipTowers:
    """NLIPModel (weights on the CPU) -> ClipTowers; the caption and MAE decoders are left out."""
    vit = model.vision.vit
    vision, text = _vision_tower(vit), _text_tower(model.text.transformer)
    vision.parts["proj"] = model.image_proj.weight  # (E, Dv)
    text.parts["proj"] = model.text_proj.weight  # (E, Dt)
    scale = model.logit_scale
    log_scale = min(scale.log_scale.item(), math.log(scale.max_scale))  # the clamp the model applies
    special = {k: model.special[k] for k in ("pad_id", "bos_id", "eos_id")}
    return ClipTowers(vision, text, model.image_proj.out_features, vit.patch_embed.img_size[0],
                      vit.patch_embed.patch_size[0], model.text.context_length, model.special["vocab_size"],
                      special, log_scale)
