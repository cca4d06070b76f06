"""Noise-completion: concept vocabulary and retrieval (concepts.py), the synthetic caption store
(caption_store.py), the policies (policy.py) and the in-loop completer (completer.py). `nlip-ds caption` is in
eval/caption_cli.py; building a vocabulary from captions is data/vocabulary.py."""
from nlip_ds.completion.caption_store import SyntheticCaptionStore
from nlip_ds.completion.completer import Completer
from nlip_ds.completion.concepts import DEFAULT_TEMPLATE, DEFAULT_VOCABULARY, ConceptCache, load_vocabulary
from nlip_ds.completion.policy import POLICIES

__all__ = ["DEFAULT_TEMPLATE", "DEFAULT_VOCABULARY", "ConceptCache", "load_vocabulary", "SyntheticCaptionStore",
           "Completer", "POLICIES"]
