"""Text encoder T_e: CLIP's causal text transformer (transformers CLIPTextModel, configured in code, nothing
downloaded) over the packed sequence `[concepts] <sep> caption`.

Why the causal CLIP transformer and not a bidirectional BERT: T_e also hands its features at the concept
positions to the caption decoder as memory. Under a causal mask those features depend on the concept prefix
only, so in training the decoder cannot read the caption it is asked to write out of its memory, and at
generation time (concepts alone, no caption) the features are exactly the ones it was trained with. The
contrastive embedding is the feature at the last token (the caption's [EOS]), the only position that sees the
whole sequence under the causal mask: CLIP's end-of-text pooling.

Packing: the prefix arrives as (B, K) and the caption as (B, T), each padded. The valid tokens are moved to
the left as concepts, [SEP] (only when the sample has concepts), caption, so each caption starts right after
its own prefix and the position ids have no holes. When the total exceeds `context_length`, the concept tokens
are cut first (the caption is what the contrastive loss is about), then the caption tail.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings
from transformers.initialization import no_init_weights

from nlip_ds.config import TextConfig
from nlip_ds.model.layers import convert_layer_norms, init_transformers_weights

logger = logging.getLogger(__name__)


class TextOutput(NamedTuple):
    """A NamedTuple so DeepSpeed's ZeRO-3 module hooks can find the tensors in it (dataclasses they cannot)."""

    pooled: torch.Tensor            # (B, D) final-norm feature at the last packed token
    tokens: torch.Tensor            # (B, S, D) features of the packed sequence
    token_mask: torch.Tensor        # (B, S) bool, valid packed positions
    concept_features: torch.Tensor  # (B, K', D) features at the concept positions (the first packed ones)
    concept_mask: torch.Tensor      # (B, K') bool, which of them hold a kept concept token


def _keep_first(valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Of the true entries of each row of `valid` (B, N), keep only the first `budget` (B,)."""
    return valid & (valid.cumsum(dim=1) <= budget.unsqueeze(1))


def pack_sequence(input_ids: torch.Tensor, attention_mask: torch.Tensor, concept_ids: torch.Tensor,
                  concept_mask: torch.Tensor, *, sep_id: int, pad_id: int, max_len: int):
    """Left-pack `[concepts] <sep> caption`: returns ids (B, S), valid (B, S) bool and concept counts (B,).

    S = min(K + 1 + T, max_len); the concepts occupy the first `n_concepts` positions of each row.
    """
    batch = input_ids.shape[0]
    caption_valid = _keep_first(attention_mask.bool(), torch.full((batch,), max_len, device=input_ids.device))
    room = (max_len - 1 - caption_valid.sum(1)).clamp(min=0)  # (B,) tokens left for concepts after [SEP]
    concept_valid = _keep_first(concept_mask.bool(), room)
    n_concepts = concept_valid.sum(1)  # (B,)
    sep = torch.full((batch, 1), sep_id, dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([concept_ids.to(input_ids.dtype), sep, input_ids], dim=1)  # (B, K + 1 + T)
    valid = torch.cat([concept_valid, (n_concepts > 0).unsqueeze(1), caption_valid], dim=1)
    order = (~valid).to(torch.int8).argsort(dim=1, stable=True)  # valid tokens first, in their order
    length = min(ids.shape[1], max_len)
    ids, valid = ids.gather(1, order)[:, :length], valid.gather(1, order)[:, :length]  # (B, S)
    return ids.masked_fill(~valid, pad_id), valid, n_concepts


class _PartitionSafeEmbeddings(CLIPTextEmbeddings):
    """CLIPTextEmbeddings without its length check on `position_embedding.weight.shape`: under ZeRO-3 that
    weight is empty outside the position embedding's own forward, so the check fails on multi-rank runs
    (huggingface/diffusers#10925). pack_sequence already bounds the length by context_length."""

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = self.position_ids[:, : input_ids.shape[-1]]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)  # (B, S, D)


class TextEncoder(nn.Module):
    """T_e: (caption, optional concept prefix) -> TextOutput."""

    def __init__(self, cfg: TextConfig, *, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                 sep_id: int):
        super().__init__()
        config = CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
            num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
            max_position_embeddings=cfg.context_length, hidden_act="quick_gelu",
            pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
        with no_init_weights():  # init_weights() initializes (see NLIPModel.init_weights)
            self.transformer = CLIPTextModel(config)
        self.transformer.embeddings.__class__ = _PartitionSafeEmbeddings  # adds no state, changes forward only
        convert_layer_norms(self.transformer)
        self.width = cfg.width
        self.context_length = cfg.context_length
        self.pad_id, self.sep_id = pad_id, sep_id

    def init_weights(self) -> None:
        """CLIP's own initialization of the text transformer."""
        init_transformers_weights(self.transformer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                concept_ids: Optional[torch.Tensor] = None,
                concept_mask: Optional[torch.Tensor] = None) -> TextOutput:
        if concept_ids is None:
            concept_ids = input_ids.new_full((input_ids.shape[0], 0), self.pad_id)
        if concept_mask is None:
            concept_mask = concept_ids != self.pad_id
        ids, valid, n_concepts = pack_sequence(input_ids, attention_mask, concept_ids, concept_mask,
                                               sep_id=self.sep_id, pad_id=self.pad_id,
                                               max_len=self.context_length)
        # position 0 is always attended, so a row with no token at all yields finite (unused) features
        # instead of NaNs that would leak through the decoder's cross-attention
        attend = valid.clone()
        attend[:, 0] = True
        hidden = self.transformer(input_ids=ids, attention_mask=attend.long()).last_hidden_state  # (B, S, D)
        last = (valid.sum(1) - 1).clamp(min=0)  # (B,) the caption's [EOS]
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)
        k = min(concept_ids.shape[1], hidden.shape[1])
        concept_mask = torch.arange(k, device=hidden.device) < n_concepts.unsqueeze(1)  # (B, K')
        return TextOutput(pooled, hidden, valid, hidden[:, :k], concept_mask)
