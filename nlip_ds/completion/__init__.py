"""Noise-completion: concept vocabulary and retrieval (concepts.py), `nlip-ds caption` (caption_cli.py)."""
from nlip_ds.completion.bank import CaptionBank
from nlip_ds.completion.completer import Completer
from nlip_ds.completion.concepts import (DEFAULT_TEMPLATE, DEFAULT_VOCABULARY, ConceptCache, build_vocabulary,
                                         load_vocabulary, write_vocabulary)
from nlip_ds.completion.policy import POLICIES

__all__ = ["DEFAULT_TEMPLATE", "DEFAULT_VOCABULARY", "ConceptCache", "build_vocabulary", "load_vocabulary",
           "write_vocabulary", "CaptionBank", "Completer", "POLICIES"]
