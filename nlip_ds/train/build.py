"""Build the pieces of a run from the config: tokenizer (shared by all ranks), loaders, model."""
from __future__ import annotations

import logging

import torch

from nlip_ds import distributed as D
from nlip_ds.config import Config, ConfigError
from nlip_ds.data.pipeline import build_loader
from nlip_ds.data.tokenizer import ensure_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


def build_tokenizer(cfg: Config):
    """Rank 0 loads or trains the tokenizer (on the training captions); the others wait, then load it."""
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer: set a folder (it is trained there when missing)")
    if D.get_rank() == 0:
        tok = ensure_tokenizer(cfg.data.tokenizer, cfg.data.train, cfg.data.tokenizer, cfg.data.vocab_size)
    D.barrier()
    if D.get_rank() != 0:
        tok = load_tokenizer(cfg.data.tokenizer)
    return tok


def build_loaders(cfg: Config, tokenizer, topo: D.Topology) -> dict:
    if not cfg.data.train:
        raise ConfigError("data.train: no training shards given")
    common = dict(tokenizer=tokenizer, image_size=cfg.model.vision.image_size,
                  context_length=cfg.model.text.context_length, seed=cfg.train.seed, rank=topo.rank,
                  world_size=topo.world_size, pin_memory=torch.cuda.is_available())
    loaders = {"train": build_loader(cfg.data, "train", batch_size=cfg.train.micro_batch_size, train=True,
                                     **common)}
    return loaders


def build_model(cfg: Config, tokenizer):
    from nlip_ds.model import NLIPModel

    return NLIPModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                     bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, sep_id=tokenizer.sep_id)
