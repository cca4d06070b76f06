"""Concept vocabulary, concept embeddings and retrieval for noise-completion.

- Vocabulary: a plain text file of concept names, one per line ('#' comments and blank lines ignored). The
  package ships a generic default (`DEFAULT_VOCABULARY`, everyday object names); data/vocabulary.py's
  `build_vocabulary` extracts the frequent words (and frequent two-word phrases) of a dataset's captions.
- Embeddings: e_c = T_e(template.format(c)) with an empty concept prefix, L2-normalized, held by a
  `ConceptCache` that is part of the training checkpoint.
- Retrieval: the top-k concepts of each image by cosine between its image embedding and every e_c; their names
  become the concept prefix of T_e and C_d (`ConceptCache.prefix`).

Nothing here imports DeepSpeed: `refresh` takes the text encoder as a function, so the caller decides whether
it is a plain model or a ZeRO-3 engine's module.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

DEFAULT_VOCABULARY = Path(__file__).resolve().parent / "default_concepts.txt"
DEFAULT_TEMPLATE = "a photo of a {}."

# ------------------------------------------------------------------------------------------------ vocabulary


def load_vocabulary(path: Optional[str | Path]) -> list[str]:
    """Concept names of a vocabulary file (the shipped default when `path` is None): one per line, stripped,
    blank lines and '#' comments skipped, duplicates dropped keeping the first."""
    path = DEFAULT_VOCABULARY if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"concept vocabulary {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"concept vocabulary {path}: cannot read it ({err})") from None
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise ValueError(f"concept vocabulary {path} holds no names (one concept name per line)")
    return names


# ------------------------------------------------------------------------------------------------ embeddings


EncodeText = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ConceptCache:
    """Concept names, their embeddings e_c = T_e(template.format(c)) (empty concept prefix) and retrieval.

    Empty until the first `refresh`: `ready` is False and `retrieve`/`prefix`/`embeddings` raise.
    """

    def __init__(self, names: Sequence[str], template: str = DEFAULT_TEMPLATE):
        if not names:
            raise ValueError("ConceptCache needs at least one concept name")
        if len(set(names)) != len(names):
            raise ValueError("ConceptCache: concept names must be unique (load_vocabulary removes duplicates)")
        if "{}" not in template:
            raise ValueError(f"concept template {template!r} has no '{{}}' for the concept name")
        self._names = list(names)
        self.template = template
        self._embeddings: Optional[torch.Tensor] = None  # (C, D) float32, L2-normalized
        self.refreshed_at_step: Optional[int] = None
        self._named_by: dict[str, frozenset] = {}  # object name -> the concepts naming it (`recall`)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def vocabulary(self) -> list[str]:
        return list(self._names)

    @property
    def ready(self) -> bool:
        return self._embeddings is not None

    @property
    def embeddings(self) -> torch.Tensor:
        """(C, D) float32, L2-normalized."""
        self._require_ready("embeddings")
        return self._embeddings

    def _require_ready(self, what: str) -> None:
        if self._embeddings is None:
            raise RuntimeError(f"ConceptCache.{what}: the concept embeddings are not computed yet; call "
                               f"refresh() first (on every rank together)")

    def prompts(self) -> list[str]:
        return [self.template.format(name) for name in self._names]

    @torch.no_grad()
    def refresh(self, encode_text: EncodeText, tokenizer, device, batch_size: int = 256, *,
                max_length: int = 77, step: Optional[int] = None) -> None:
        """Recompute every e_c with `encode_text(ids, mask)` (e.g. NLIPModel.encode_text: empty prefix).

        The prompts go through in fixed chunks of `batch_size`, so encode_text runs ceil(C / batch_size)
        times: a number that depends only on the vocabulary size, never on the data. Under ZeRO-3 every rank
        holds the same vocabulary and must call refresh at the same step, so all ranks run T_e the same number
        of times. `max_length` caps the prompt tokens (pass the model's text context length).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        ids, mask = tokenizer.encode(self.prompts(), max_length)  # (C, max_length)
        width = max(2, int(mask.sum(1).max()))  # all-padding columns cut: the same cut on every rank
        ids, mask = ids[:, :width], mask[:, :width]
        chunks = []
        for start in range(0, len(self._names), batch_size):
            out = encode_text(ids[start:start + batch_size].to(device), mask[start:start + batch_size].to(device))
            chunks.append(out.detach().float())  # (b, D)
        self._embeddings = torch.nn.functional.normalize(torch.cat(chunks), dim=-1)  # (C, D)
        self.refreshed_at_step = step

    def retrieve(self, image_features: torch.Tensor, k: int) -> torch.Tensor:
        """(B, D) image embeddings -> (B, min(k, C)) concept indices by cosine, most similar first; ties go to
        the lower index (a stable sort, so every rank and device agrees)."""
        self._require_ready("retrieve")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if image_features.dim() != 2 or image_features.shape[1] != self._embeddings.shape[1]:
            raise ValueError(f"ConceptCache.retrieve: image_features has shape {tuple(image_features.shape)}, "
                             f"expected (B, {self._embeddings.shape[1]})")
        images = torch.nn.functional.normalize(image_features.detach().float(), dim=-1)  # (B, D)
        sims = images @ self._embeddings.to(images.device).T  # (B, C)
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices  # (B, C)
        return order[:, :min(k, len(self._names))]

    def names(self, indices: torch.Tensor) -> list[list[str]]:
        """Concept names of each row of (B, k) indices."""
        return [[self._names[i] for i in row] for row in indices.tolist()]

    def prefix(self, indices: torch.Tensor, tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The concept prefix (concept_ids, concept_mask), both (B, max_length), on the device of `indices`:
        each row's names joined as the model reads them (Tokenizer.encode_concepts)."""
        self._require_ready("prefix")
        ids, mask = tokenizer.encode_concepts(self.names(indices), max_length)
        return ids.to(indices.device), mask.to(indices.device)

    def recall(self, indices: torch.Tensor, objects: Sequence[Sequence[str]]) -> tuple[int, int]:
        """How well the retrieved concepts name what is in the images, against ground-truth object lists (the
        "objects" of synthetic and digits shards: "red circle", "seven"): (hits, total) over the concepts that
        name an image's objects (a concept whose words appear whole in one of its object names: "red" and
        "circle" for "red circle"), a hit when such a concept is among the image's retrieved ones. Rows of
        (B, k) `indices` and `objects` pair up; rows without objects count nothing."""
        hits = total = 0
        for retrieved, names in zip(self.names(indices), objects):
            true = set().union(*(self._concepts_in(name) for name in names))
            hits += len(true.intersection(retrieved))
            total += len(true)
        return hits, total

    def _concepts_in(self, object_name: str) -> frozenset:
        """The concepts whose words appear whole in `object_name` (memoized: object names repeat)."""
        if object_name not in self._named_by:
            words = f" {' '.join(str(object_name).lower().split())} "
            self._named_by[object_name] = frozenset(c for c in self._names if f" {c.lower()} " in words)
        return self._named_by[object_name]

    # -------------------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict:
        return {"names": list(self._names), "template": self.template,
                "embeddings": None if self._embeddings is None else self._embeddings.cpu().clone(),
                "refreshed_at_step": self.refreshed_at_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore embeddings saved by `state_dict`. A state over other names is refused (the vocabulary file
        changed since the checkpoint); one made with another template is loaded empty (refresh recomputes)."""
        names = list(state["names"])
        if names != self._names:
            diff = next((i for i, (a, b) in enumerate(zip(names, self._names)) if a != b),
                        min(len(names), len(self._names)))
            raise ValueError(f"concept cache: the checkpoint's vocabulary ({len(names)} names) differs from the "
                             f"current one ({len(self._names)} names) from entry {diff} on; use the vocabulary "
                             f"file the run was started with (completion.vocabulary)")
        if state["template"] != self.template:
            logger.warning("concept cache: checkpoint embeddings were made with the template %r, not %r; they "
                           "are dropped until the next refresh", state["template"], self.template)
            self._embeddings, self.refreshed_at_step = None, None
            return
        emb = state["embeddings"]
        self._embeddings = None if emb is None else emb.float().clone()
        self.refreshed_at_step = state["refreshed_at_step"]
