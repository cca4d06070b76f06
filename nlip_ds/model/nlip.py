"""NLIPModel: V_e, T_e, C_d, V_d and the projections as one nn.Module that knows nothing of DeepSpeed.

forward(batch) returns a dict of features and logits (open_clip CoCa style); the losses live in train/task.py.
Written for ZeRO-3, which gathers a module's parameters only inside that module's forward: every learnable
tensor sits in a submodule that is called (the logit scale included), no weights are tied across modules, the
methods used outside training (encode_image, encode_text, generate) only call submodules, and every path
calls each submodule the same number of times whatever the data (generation aside, which has `sync_fn`).

Export: save_pretrained(dir) writes model.safetensors, config.json (the ModelConfig plus vocabulary size and
special token ids) and, when given, a copy of the tokenizer folder; from_pretrained(dir) needs only torch,
timm, transformers and safetensors, and never unpickles anything.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from nlip_ds.config import ModelConfig, from_dict
from nlip_ds.model.decoder import CaptionDecoder, teacher_forcing
from nlip_ds.model.generation import GenerationOptions, SpecialIds, SyncFn, beam_loop, sample_loop
from nlip_ds.model.layers import LogitScale, l2_normalize
from nlip_ds.model.mae import MAEDecoder
from nlip_ds.model.text import TextEncoder, TextOutput
from nlip_ds.model.vision import ImageEncoder

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
SPECIAL_KEYS = ("vocab_size", "pad_id", "bos_id", "eos_id", "sep_id")
# One transformer layer of V_e and V_d (timm), T_e (CLIP) or C_d (BERT): see `NLIPModel.single_pass_layers`.
TRANSFORMER_LAYERS = (Block, CLIPEncoderLayer, BertLayer)


class NLIPModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, *, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                 sep_id: int, init_weights: bool = True):
        """`init_weights=False` leaves the weights unset (some uninitialized) for a caller that loads them all
        (from_pretrained) or that builds under DeepSpeed's zero.Init and then runs init_weights() itself."""
        super().__init__()
        self.config = model_cfg
        self.special = dict(vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, sep_id=sep_id)
        self.vision = ImageEncoder(model_cfg.vision)
        self.text = TextEncoder(model_cfg.text, vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id,
                                eos_id=eos_id, sep_id=sep_id)
        self.decoder = CaptionDecoder(model_cfg.decoder, vocab_size=vocab_size, pad_id=pad_id,
                                      vision_width=self.vision.width, text_width=self.text.width)
        self.mae = MAEDecoder(model_cfg.mae, vision_width=self.vision.width, num_patches=self.vision.num_patches,
                              num_prefix_tokens=self.vision.num_prefix_tokens,
                              patch_size=self.vision.patch_size) if model_cfg.mae.enabled else None
        self.image_proj = nn.Linear(self.vision.width, model_cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, model_cfg.embed_dim, bias=False)
        self.logit_scale = LogitScale(model_cfg.logit_scale_init, model_cfg.logit_scale_max)
        if init_weights:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, load_pretrained: bool = True) -> None:
        """Initialize every weight (each module's own scheme), then load model.vision.pretrained_path if set.

        Separate from construction because the third-party modules initialize children from their parents'
        __init__, which DeepSpeed's zero.Init (partitioning each module as its __init__ ends) breaks. Under
        zero.Init: build with init_weights=False, then call this inside
        `deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)`.
        """
        if any(p.numel() == 0 for p in self.parameters()):
            raise RuntimeError("NLIPModel.init_weights: parameters are partitioned (built under DeepSpeed "
                               "zero.Init?); build with init_weights=False and call init_weights() with the "
                               "parameters gathered (deepspeed.zero.GatheredParameters, modifier_rank=0)")
        self.vision.init_weights(load_pretrained)
        self.text.init_weights()
        self.decoder.init_weights()
        if self.mae is not None:
            self.mae.init_weights()
        nn.init.normal_(self.image_proj.weight, std=self.vision.width ** -0.5)  # CLIP's projection init
        nn.init.normal_(self.text_proj.weight, std=self.text.width ** -0.5)
        self.logit_scale.reset_parameters()

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, tokenizer) -> "NLIPModel":
        """Build with the vocabulary size and special ids of a tokenizer that has those attributes."""
        return cls(model_cfg, **{key: getattr(tokenizer, key) for key in SPECIAL_KEYS})

    # ------------------------------------------------------------------------------------------ training

    def forward(self, batch: dict, *, mask_ratio: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> dict:
        """Features, logit scale, teacher-forced caption logits/labels and (when masking) the MAE loss.

        mask_ratio defaults to model.vision.mask_ratio in training mode and 0 in eval mode; `generator`
        drives the patch mask and the concept-prefix dropout (the global RNG when None).
        """
        images = self.vision.pixels(batch["image"])  # float32: also the MAE target, whose loss stays float32
        if mask_ratio is None:
            mask_ratio = self.config.vision.mask_ratio if self.training else 0.0
        vis = self.vision(images, mask_ratio, generator)
        concept_ids, concept_mask = self._concept_prefix(batch, generator)
        if self.config.text.prefix_in_embedding:
            txt = concepts = self.text(batch["input_ids"], batch["attention_mask"], concept_ids, concept_mask)
        else:  # the caption alone makes the embedding; the prefix goes to the decoder's memory only
            if concept_ids is None:
                txt = concepts = self.text(batch["input_ids"], batch["attention_mask"])
            elif self.config.text.concept_grad or not torch.is_grad_enabled():
                txt, concepts = self._caption_and_prefix(batch["input_ids"], batch["attention_mask"], concept_ids,
                                                         concept_mask)
            else:  # the prefix's pass trains nothing: a second call, without gradients
                txt = self.text(batch["input_ids"], batch["attention_mask"])
                with torch.no_grad():
                    concepts = self._concept_features(concept_ids, concept_mask)
        dec_ids, dec_mask, labels = teacher_forcing(batch["input_ids"], batch["attention_mask"],
                                                    self.decoder.max_length)
        memory, memory_mask = self.decoder.memory(vis.tokens, concepts.concept_features, concepts.concept_mask)
        out = {
            "image_features": l2_normalize(self.image_proj(vis.pooled)),  # (B, D)
            "text_features": l2_normalize(self.text_proj(txt.pooled)),  # (B, D)
            "logit_scale": self.logit_scale(),
            "caption_logits": self.decoder(dec_ids, dec_mask, memory, memory_mask),  # (B, L, V)
            "caption_labels": labels,  # (B, L), L = min(T - 1, model.decoder.max_length)
        }
        if self.mae is not None and vis.mask is not None:
            out["mae_loss"] = self.mae(vis.tokens, vis.ids_restore, vis.mask, images)  # (B,)
        return out

    def _caption_and_prefix(self, input_ids, attention_mask, concept_ids, concept_mask):
        """T_e over the captions alone and over the concept prefixes alone, as 2B rows of one call: what
        `self.text(input_ids, attention_mask)` and `_concept_features` give, up to float rounding, with T_e run
        once (so ZeRO-3 can gather its layers whole: `single_pass_layers`). Returns (caption output, prefix
        output); of the first only `pooled` is read, of the second the concept features and mask."""
        pad = self.special["pad_id"]
        ids = torch.cat([input_ids, torch.full_like(input_ids, pad)])  # (2B, T): no caption in the prefix rows
        mask = torch.cat([attention_mask, torch.zeros_like(attention_mask)])
        prefix_ids = torch.cat([torch.full_like(concept_ids, pad), concept_ids])  # (2B, K): none in the caption rows
        prefix_mask = torch.cat([torch.zeros_like(concept_mask), concept_mask])
        both = self.text(ids, mask, prefix_ids, prefix_mask)
        n = input_ids.shape[0]
        return (TextOutput(*(field[:n] for field in both)), TextOutput(*(field[n:] for field in both)))

    def _concept_prefix(self, batch: dict, generator: Optional[torch.Generator]):
        """The batch's concept prefix with whole-prefix dropout in training; (None, None) when absent."""
        concept_ids = batch.get("concept_ids")
        if concept_ids is None:
            return None, None
        concept_mask = batch.get("concept_mask")
        concept_mask = concept_ids != self.special["pad_id"] if concept_mask is None else concept_mask.bool()
        p = self.config.text.concept_dropout
        if self.training and p > 0:
            device = generator.device if generator is not None else concept_ids.device
            keep = torch.rand(concept_ids.shape[0], generator=generator, device=device) >= p  # (B,)
            concept_mask = concept_mask & keep.to(concept_ids.device).unsqueeze(1)
        return concept_ids, concept_mask

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups: decay on Linear/Conv weight matrices only; none on biases, norms, token and
        position embeddings, the class/mask tokens and the logit scale."""
        decay, no_decay = [], []
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    matrix = name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d))
                    (decay if matrix else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def single_pass_layers(self) -> list[nn.Module]:
        """Every transformer layer of every tower, in module order. In a training forward each runs whole and at
        most once with gradients (T_e takes caption and concept prefix in one call, `_caption_and_prefix`),
        which is what lets ZeRO-3 gather each one's parameters in one go (train/engine.py, `gather_by_layer`).
        Code that adds a second pass with gradients through a tower breaks that (DeepSpeed then fails an
        assertion on duplicate gradients; tests/test_train_equivalence.py runs it)."""
        return [module for module in self.modules() if isinstance(module, TRANSFORMER_LAYERS)]

    # ---------------------------------------------------------------------------------------- evaluation

    def encode_image(self, images: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) L2-normalized image embeddings."""
        return l2_normalize(self.image_proj(self.vision(images, mask_ratio).pooled))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    concept_ids: Optional[torch.Tensor] = None,
                    concept_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) caption ids, optional (B, K) concept prefix -> (B, D) L2-normalized text embeddings."""
        return l2_normalize(self.text_proj(self.text(input_ids, attention_mask, concept_ids, concept_mask).pooled))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P + L, Dv) unmasked V_e tokens, class token first."""
        return self.vision(images).tokens

    # ---------------------------------------------------------------------------------------- generation

    def _concept_features(self, concept_ids: torch.Tensor, concept_mask: Optional[torch.Tensor]):
        """T_e over the concept prefix alone. Under T_e's causal mask these are the features the prefix has at
        the head of `[concepts] <sep> caption`, so training and generation give the decoder the same memory."""
        no_caption = concept_ids.new_zeros((concept_ids.shape[0], 0))
        return self.text(no_caption, no_caption, concept_ids, concept_mask)

    def _memory(self, images, concept_ids, concept_mask):
        """Decoder memory for generation. T_e runs even without concepts (on an empty prefix) so every rank
        calls it once whatever its batch holds."""
        batch = images.shape[0]
        if concept_ids is None:
            concept_ids = torch.full((batch, 1), self.special["pad_id"], dtype=torch.long, device=images.device)
        txt = self._concept_features(concept_ids, concept_mask)
        return self.decoder.memory(self.vision(images).tokens, txt.concept_features, txt.concept_mask)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, concept_ids: Optional[torch.Tensor] = None,
                 concept_mask: Optional[torch.Tensor] = None, options: Optional[GenerationOptions] = None, *,
                 generator: Optional[torch.Generator] = None, sync_fn: Optional[SyncFn] = None,
                 **fields) -> torch.Tensor:
        """Captions (B, L) as token ids after [BOS]: each row ends with [EOS] (unless cut at max_tokens), then
        pad_id. Decoding follows `options` (default GenerationOptions()) with any of its fields given by keyword
        replaced. See generation.py for the strategies and the lockstep contract of `sync_fn`."""
        opts = dataclasses.replace(options or GenerationOptions(), **fields).validate()
        strategy, max_tokens, num_beams = opts.strategy, opts.max_tokens, opts.num_beams
        if max_tokens > self.decoder.max_length:
            raise ValueError(f"generate: max_tokens {max_tokens} exceeds model.decoder.max_length="
                             f"{self.decoder.max_length}")
        s = self.special
        ids = SpecialIds(bos=s["bos_id"], eos=s["eos_id"], pad=s["pad_id"],
                         banned=(s["pad_id"], s["bos_id"], s["sep_id"]))
        memory, memory_mask = self._memory(images, concept_ids, concept_mask)
        batch, device = images.shape[0], images.device
        if strategy == "beam":
            memory = memory.repeat_interleave(num_beams, dim=0)  # (B * nb, M, D)
            memory_mask = memory_mask.repeat_interleave(num_beams, dim=0)
        cache = self.decoder.new_cache()

        def step(last: torch.Tensor) -> torch.Tensor:
            return self.decoder(last, None, memory, memory_mask, cache)[:, -1]  # (N, V)

        if strategy == "beam":
            return beam_loop(step, cache.reorder_cache, batch, device, opts, ids, sync_fn)
        return sample_loop(step, batch, device, opts, ids, generator, sync_fn)

    # -------------------------------------------------------------------------------------------- export

    def save_pretrained(self, out_dir: str | Path, tokenizer_dir: Optional[str | Path] = None) -> Path:
        """Write model.safetensors, config.json and (when given) a copy of the tokenizer folder."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(self.config), **self.special}
        (out_dir / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, out_dir / TOKENIZER_DIR, dirs_exist_ok=True)
        logger.info("saved NLIPModel to %s (%d tensors)", out_dir, len(state))
        return out_dir

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, map_location: str | torch.device = "cpu") -> "NLIPModel":
        """Load an export of save_pretrained, in eval mode. The tokenizer, if saved, is at model_dir/tokenizer."""
        model_dir = Path(model_dir)
        config_path = model_dir / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{model_dir}: not an NLIPModel export (no {CONFIG_NAME})")
        meta = json.loads(config_path.read_text())
        if "format_version" not in meta:  # e.g. the config.json of an hf-clip or open_clip export
            raise ValueError(f"{model_dir}: not an NLIPModel export ({config_path} has no format_version); "
                             "load an hf-clip or open_clip export with those libraries (docs/export.md), or "
                             "export with --format nlip")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version {meta.get('format_version')!r}, expected "
                             f"{FORMAT_VERSION}")
        model_cfg = from_dict({"model": meta["model"]}).model
        model = cls(model_cfg, init_weights=False, **{key: meta[key] for key in SPECIAL_KEYS})
        model.load_state_dict(load_file(str(model_dir / WEIGHTS_NAME)), strict=True)
        return model.to(map_location).eval()
