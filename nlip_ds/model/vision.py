"""Image encoder V_e: a timm VisionTransformer built from config (nothing downloaded), with random patch masking.

Masking keeps a random (1 - m) of the patch tokens of each image before the blocks (as MAE and FLIP do): a
masked step costs about (1 - m) of a full one, and the MAE decoder V_d learns to reconstruct the dropped
patches from the kept ones.

The masking sits in the ViT's own `patch_drop` slot instead of a re-implemented forward: timm calls that module
right after the position embedding and before the blocks, exactly where masking belongs, and the ViT is then
still called as a whole. That matters under ZeRO-3, which gathers a module's own parameters (the class token
and position embedding live directly on the VisionTransformer) only when that module is called.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from nlip_ds.config import VisionConfig
from nlip_ds.data.samples import normalize
from nlip_ds.model.layers import LayerNorm

logger = logging.getLogger(__name__)


class VisionOutput(NamedTuple):
    """A NamedTuple so DeepSpeed's ZeRO-3 module hooks can find the tensors in it (dataclasses they cannot)."""

    pooled: torch.Tensor                 # (B, D) class token after the final norm
    tokens: torch.Tensor                 # (B, P + L_keep, D) prefix (class) tokens first, then kept patches
    mask: Optional[torch.Tensor]         # (B, L) 1 = patch dropped, in original patch order; None if unmasked
    ids_restore: Optional[torch.Tensor]  # (B, L) position of each original patch in the shuffled order


def random_patch_mask(batch: int, num_patches: int, ratio: float, device: torch.device,
                      generator: Optional[torch.Generator] = None):
    """MAE's per-sample shuffle: (ids_keep (B, L_keep), mask (B, L) with 1 = dropped, ids_restore (B, L)).

    L_keep = int(L * (1 - ratio)), at least one patch. The noise is drawn on the generator's device so a CPU
    generator seeds CUDA runs too.
    """
    n_keep = max(1, int(num_patches * (1.0 - ratio)))
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=noise_device).to(device)  # (B, L)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :n_keep] = 0
    mask = mask.gather(1, ids_restore)  # (B, L) back in patch order
    return ids_shuffle[:, :n_keep], mask, ids_restore


class PatchMasker(nn.Module):
    """Keeps the prefix tokens and the patches in `ids_keep` (set for one call by `keeping`); else identity."""

    def __init__(self, num_prefix_tokens: int):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.ids_keep: Optional[torch.Tensor] = None

    @contextmanager
    def keeping(self, ids_keep: torch.Tensor) -> Iterator[None]:
        self.ids_keep = ids_keep
        try:
            yield
        finally:
            self.ids_keep = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P + L, D)
        if self.ids_keep is None:
            return x
        p = self.num_prefix_tokens
        index = self.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, L_keep, D)
        return torch.cat([x[:, :p], x[:, p:].gather(1, index)], dim=1)  # (B, P + L_keep, D)


def _check_named_vit(vit: nn.Module, cfg: VisionConfig) -> None:
    """A named timm model must be a class-token ViT that matches the config fields it ignores."""
    if not isinstance(vit, VisionTransformer) or not vit.has_class_token:
        raise ValueError(f"model.vision.name: {cfg.name!r} is not a timm VisionTransformer with a class token")
    actual = {"width": vit.embed_dim, "depth": len(vit.blocks), "heads": vit.blocks[0].attn.num_heads,
              "patch_size": vit.patch_embed.patch_size[0]}
    for key, value in actual.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"model.vision.{key}: {getattr(cfg, key)} but timm model {cfg.name!r} has {value}")


# CLIP's ViT as timm builds it: LayerNorm after the embeddings (timm then drops the patch-embedding bias, as
# CLIP has none) and OpenAI CLIP's QuickGELU, the activation of the text tower too (open_clip has one activation
# for both towers). With timm's final norm read at the class token, this is CLIP's ln_post, so every weight maps
# one to one onto transformers' CLIPVisionModel and open_clip's VisionTransformer (nlip_ds/interop/).
CLIP_LAYOUT = dict(pre_norm=True, act_layer="quick_gelu")


def build_vit(cfg: VisionConfig) -> VisionTransformer:
    """The timm ViT without classifier head or pooling (forward returns all tokens), never downloading.

    timm's weight init is skipped here and run by ImageEncoder.init_weights() (see NLIPModel.init_weights).
    """
    common = dict(num_classes=0, global_pool="", img_size=cfg.image_size, norm_layer=LayerNorm, weight_init="skip",
                  **(CLIP_LAYOUT if cfg.layout == "clip" else {}))
    if cfg.name == "vit_custom":
        return VisionTransformer(patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
                                 num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, **common)
    try:
        vit = timm.create_model(cfg.name, pretrained=False, **common)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"model.vision.name: cannot build timm model {cfg.name!r}: {exc}") from None
    _check_named_vit(vit, cfg)
    return vit


@torch.no_grad()
def clip_init(vit: VisionTransformer) -> None:
    """CLIP's initialization scales (OpenAI CLIP's and open_clip's transformer init) for the CLIP layout.

    timm's init (class token 1e-6, position embedding and every Linear at std 0.02) suits timm's layout, where
    the class token enters the blocks unnormalized and tiny, so attention fills it with image content. With
    CLIP's LayerNorm before the blocks, the class token is normalized to full size first; with 0.02 weights the
    attention adds next to nothing to it, and at init every image gets the same embedding (cosine similarity
    1.0000 between digits at width 64), a collapsed start that small runs escape slowly or never
    (docs/results.md). CLIP's scales (width^-0.5 for the tokens and attention inputs, residual outputs scaled by
    (2 depth)^-0.5) make the blocks' contributions comparable to the residual stream from the first step.
    """
    width, depth = vit.embed_dim, len(vit.blocks)
    scale, residual = width ** -0.5, width ** -0.5 * (2 * depth) ** -0.5
    nn.init.normal_(vit.cls_token, std=scale)
    nn.init.normal_(vit.pos_embed, std=scale)
    for block in vit.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=scale)
        nn.init.normal_(block.attn.proj.weight, std=residual)
        nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.fc2.weight, std=residual)


def load_timm_weights(vit: VisionTransformer, path: str | Path) -> None:
    """Load local timm (or OpenAI-CLIP / JAX-converted) ViT weights: .safetensors, or .pth read weights-only.

    timm's own filter unwraps nested dicts, converts foreign layouts and resamples the position embedding to
    this image size; the classifier head is dropped. Any missing ViT weight is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.vision.pretrained_path: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in checkpoint_filter_fn(state, vit).items() if not k.startswith("head.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"model.vision.pretrained_path: {path} lacks {len(missing)} ViT weights, e.g. "
                         f"{missing[:3]}")
    logger.info("loaded ViT weights from %s (%d tensors, %d unused)", path, len(state), len(unexpected))


class ImageEncoder(nn.Module):
    """V_e: images (B, 3, H, W) -> VisionOutput (pooled class token, tokens, mask)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vit = build_vit(cfg)
        self.vit.patch_drop = PatchMasker(self.vit.num_prefix_tokens)
        self.width = self.vit.embed_dim
        self.num_patches = self.vit.patch_embed.num_patches
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.pretrained_path = cfg.pretrained_path
        self.layout = cfg.layout
        self.pos_embed_std = cfg.pos_embed_std

    @torch.no_grad()
    def init_weights(self, load_pretrained: bool = True) -> None:
        """timm's default ViT init (class token, position embedding, truncated-normal Linear layers), CLIP's
        scales for the clip layout, the position embedding at model.vision.pos_embed_std when set, then the
        local weights of model.vision.pretrained_path when set."""
        self.vit.weight_init_mode = ""  # "skip" at construction left "reset"; "" selects timm's default init
        self.vit.init_weights()
        if self.layout == "clip":
            clip_init(self.vit)
        if self.pos_embed_std is not None:
            nn.init.normal_(self.vit.pos_embed, std=self.pos_embed_std)
        if self.pretrained_path and load_pretrained:
            load_timm_weights(self.vit, self.pretrained_path)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (bf16/fp16 once DeepSpeed or `.to()` cast the weights; ZeRO-3's partitioned
        parameters keep theirs)."""
        return self.vit.patch_embed.proj.weight.dtype

    @staticmethod
    def pixels(images: torch.Tensor) -> torch.Tensor:
        """uint8 images as the loader yields them -> float32 normalized, on their own device (the copy to the
        device moves a quarter of the bytes); float images are taken as normalized already."""
        return normalize(images) if images.dtype == torch.uint8 else images

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.0,
                generator: Optional[torch.Generator] = None) -> VisionOutput:
        """images: (B, 3, H, W) uint8, or float normalized in any dtype; cast here to the weights' dtype."""
        images = self.pixels(images).to(self.dtype)
        if mask_ratio <= 0:
            tokens = self.vit(images)  # (B, P + L, D)
            return VisionOutput(tokens[:, 0], tokens, None, None)
        ids_keep, mask, ids_restore = random_patch_mask(images.shape[0], self.num_patches, mask_ratio,
                                                        images.device, generator)
        with self.vit.patch_drop.keeping(ids_keep):
            tokens = self.vit(images)  # (B, P + L_keep, D)
        return VisionOutput(tokens[:, 0], tokens, mask, ids_restore)
