"""Caption decoder C_d: a causal BERT decoder with cross-attention (transformers BertLMHeadModel with
is_decoder and add_cross_attention, as BLIP's text decoder), over the caption, attending to the memory
M = [image tokens ; concept features], and the clean-probability-weighted caption loss L_LM.

The memory is built by its own small module (two projections to the decoder width) so that under ZeRO-3
its weights are gathered by calling it once per forward or per generation, not once per decoded token.
Generation loops live in generation.py; this module only provides one decoder step.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertLMHeadModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.initialization import no_init_weights
from transformers.models.bert.modeling_bert import BertLMPredictionHead

from nlip_ds.config import DecoderConfig
from nlip_ds.model.layers import convert_layer_norms, init_transformers_weights, masked_mean

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def teacher_forcing(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: Optional[int] = None):
    """[BOS] w1 .. wn [EOS] [PAD].. -> decoder inputs (B, L), their mask, next-token labels (B, L), with
    L = min(T - 1, max_length).

    The text context (model.text.context_length, 77 at paper scale) may exceed the decoder's positions
    (model.decoder.max_length, 40): the decoder then learns the first max_length tokens of each caption, as
    BLIP's decoder does, and a caption cut there has no [EOS] label. Generation never goes past max_length.
    """
    steps = input_ids.shape[1] - 1 if max_length is None else min(input_ids.shape[1] - 1, max_length)
    labels = input_ids[:, 1:steps + 1].masked_fill(attention_mask[:, 1:steps + 1] == 0, IGNORE_INDEX)
    return input_ids[:, :steps], attention_mask[:, :steps], labels


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None,
                 label_smoothing: float = 0.1):
    """L_LM: label-smoothed token cross-entropy -> (weighted batch loss, per-sample loss (B,)).

    Each sample's loss is the mean over its valid tokens (labels != -100); the batch loss is
    sum_i w_i * l_i / B, not / sum_i w_i. With / B the mean over ranks of the local losses equals the loss of
    the global batch (same micro-batch size on every rank), so results do not depend on the world size, and a
    batch of mostly noisy pairs (all w small) cannot blow up into a full-size gradient from a few samples. The
    price is that the caption loss shrinks as the estimated noise rate grows, which is the intent: the
    captioner learns mostly from clean pairs.
    """
    batch, steps, vocab = logits.shape
    tokens = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             label_smoothing=label_smoothing, reduction="none").view(batch, steps)  # (B, T)
    per_sample = masked_mean(tokens, labels != IGNORE_INDEX, dim=1)  # (B,)
    if weights is None:
        return per_sample.mean(), per_sample
    return (weights.to(per_sample.dtype) * per_sample).sum() / batch, per_sample


class DecoderMemory(nn.Module):
    """Projects V_e tokens and T_e concept features to the decoder width: M (B, N + K, D) and its mask."""

    def __init__(self, vision_width: int, text_width: int, width: int):
        super().__init__()
        self.image = nn.Linear(vision_width, width)
        self.concepts = nn.Linear(text_width, width)

    def init_weights(self) -> None:
        self.image.reset_parameters()
        self.concepts.reset_parameters()

    def forward(self, image_tokens: torch.Tensor, concept_features: torch.Tensor,
                concept_mask: torch.Tensor):
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
        memory = torch.cat([self.image(image_tokens), self.concepts(concept_features)], dim=1)  # (B, N + K, D)
        return memory, torch.cat([image_mask, concept_mask.bool()], dim=1)  # (B, N + K)


class CaptionDecoder(nn.Module):
    """C_d: token ids (B, T) + memory (B, M, D) -> next-token logits (B, T, V).

    Dropout is BERT's default 0.1 (BLIP's decoder uses the same); the output layer is not tied to the input
    embedding, so under ZeRO-3 no parameter is shared between modules.
    """

    def __init__(self, cfg: DecoderConfig, *, vocab_size: int, pad_id: int, vision_width: int,
                 text_width: int):
        super().__init__()
        self.bert_config = BertConfig(
            vocab_size=vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads, intermediate_size=4 * cfg.width,
            max_position_embeddings=cfg.max_length, type_vocab_size=1, pad_token_id=pad_id,
            is_decoder=True, add_cross_attention=True, tie_word_embeddings=False,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
        self.memory = DecoderMemory(vision_width, text_width, cfg.width)
        with no_init_weights():  # init_weights() initializes (see NLIPModel.init_weights)
            self.lm = BertLMHeadModel(self.bert_config)
        # BERT keeps a second output bias that its forward never reads (it is tied to the output layer's bias
        # only when embeddings are tied); a parameter that never gets a gradient is dropped
        self.lm.cls.predictions.register_parameter("bias", None)
        convert_layer_norms(self.lm)
        self.max_length = cfg.max_length

    def init_weights(self) -> None:
        """BERT's own initialization; its prediction head only zeroed the output bias dropped above, and the
        output layer's own bias is zeroed as any Linear's."""
        self.memory.init_weights()
        init_transformers_weights(self.lm, skip=(BertLMPredictionHead,))

    def new_cache(self) -> EncoderDecoderCache:
        """An empty key/value cache for generation (self-attention and cross-attention parts)."""
        return EncoderDecoderCache(DynamicCache(config=self.bert_config), DynamicCache(config=self.bert_config))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], memory: torch.Tensor,
                memory_mask: torch.Tensor, cache: Optional[EncoderDecoderCache] = None) -> torch.Tensor:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=memory,
                      encoder_attention_mask=memory_mask.long(), cache=cache, use_cache=cache is not None)
        return out.logits  # (B, T, V)
