"""Concept vocabulary, concept embeddings and retrieval for noise-completion.

- Vocabulary: a plain text file of concept names, one per line ('#' comments and blank lines ignored). The
  package ships a generic default (`DEFAULT_VOCABULARY`, everyday object names); `build_vocabulary` extracts
  the frequent words (and frequent two-word phrases) of a dataset's captions.
- Embeddings: e_c = T_e(template.format(c)) with an empty concept prefix, L2-normalized, held by a
  `ConceptCache` that is part of the training checkpoint.
- Retrieval: the top-k concepts of each image by cosine between its image embedding and every e_c; their names
  become the concept prefix of T_e and C_d (`ConceptCache.prefix`).

Nothing here imports DeepSpeed: `refresh` takes the text encoder as a function, so the caller decides whether
it is a plain model or a ZeRO-3 engine's module.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

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


def write_vocabulary(names: Sequence[str], path: str | Path) -> Path:
    """One name per line, the format `load_vocabulary` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return path


# English function words (the usual stop-word list), then the words that web and synthetic captions use around
# their objects but that name nothing one can see on its own: framing ("a photo of"), relative size and
# position, and web boilerplate. Colours are not stop words: they are what the synthetic data's concepts are.
FUNCTION_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each either else ever every few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself just let like
many may me might more most much must my myself neither no nor not now of off on once one only or other ought
our ours ourselves out over own per same shall she should since so some such than that the their theirs them
themselves then there these they this those though through to too toward towards under until up upon us very
via was we were what when where whether which while who whom whose why will with within without would yet
you your yours yourself yourselves don doesn didn isn aren wasn weren won couldn shouldn wouldn haven hasn
hadn ll ve re
""".split())
CAPTION_WORDS = frozenset("""
photo photos photograph picture pictures pic pics image images img shot snapshot view scene background
foreground closeup close-up untitled screenshot wallpaper download post new best day ever check look
""".split())
RELATIVE_WORDS = frozenset("""
small little large big tiny huge left right top bottom middle center centre front behind near next side
""".split())
STOP_WORDS = FUNCTION_WORDS | CAPTION_WORDS | RELATIVE_WORDS

_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|www\.)|\.(?:com|org|net)(?:/|$)")
_FILE_EXTENSION = re.compile(r"\.(?:jpe?g|png|gif|bmp|tiff?|webp|heic|raw|svg|mp4|mov|avi|pdf|html?|php|txt)$")
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def is_file_like(token: str) -> bool:
    """A whitespace token that names a file, a URL or a number rather than a thing: 'IMG_0042.jpg',
    'http://x.org/a', 'www.site.com', '20190304', 'dsc01234', '(3)'. Any digit counts: camera counters and
    dates are the digit-bearing tokens that dominate web captions."""
    token = token.lower().strip("()[]{}<>\"'.,;:!?")
    return bool(_URL.search(token) or _FILE_EXTENSION.search(token) or any(ch.isdigit() for ch in token)
                or "_" in token or "/" in token)


def caption_words(caption: str) -> list[str]:
    """The content words of a caption, in order: lowercased, file-like tokens dropped, split into words
    (letters and inner hyphens; a trailing "'s" goes), stop words and one-letter words dropped.

    A dropped token leaves a None gap so that no phrase is formed across it; callers that want words only
    filter the Nones out.
    """
    words: list = []
    for token in caption.lower().split():
        if is_file_like(token):
            words.append(None)
            continue
        for word in _WORD.findall(token.replace("'s", "")):
            words.append(word if len(word) > 1 and word not in STOP_WORDS else None)
    return words


def _phrase_counts(sentences: list[list], words: Counter, min_count: int, max_words: int,
                   phrase_share: float) -> Counter:
    """Runs of 2..max_words adjacent content words that make up at least `phrase_share` of the occurrences of
    their rarest word (so 'teddy bear' is a unit, 'red circle' is not when red goes with many shapes)."""
    phrases: Counter = Counter()
    for n in range(2, max_words + 1):
        for sentence in sentences:
            for i in range(len(sentence) - n + 1):
                run = sentence[i:i + n]
                if None not in run:
                    phrases[" ".join(run)] += 1
    return Counter({p: c for p, c in phrases.items()
                    if c >= min_count and c >= phrase_share * min(words[w] for w in p.split())})


def _count_with_phrases(sentences: list[list], phrases: set, max_words: int) -> Counter:
    """Occurrences of words and kept phrases, a kept phrase's words not counted again on their own (longest
    phrase first, left to right)."""
    counts: Counter = Counter()
    for sentence in sentences:
        i = 0
        while i < len(sentence):
            for n in range(max_words, 0, -1):
                run = sentence[i:i + n]
                if len(run) == n and None not in run and (n == 1 or " ".join(run) in phrases):
                    counts[" ".join(run)] += 1
                    i += n
                    break
            else:
                i += 1  # a gap
    return counts


def build_vocabulary(captions: Iterable[str], top_k: int, min_count: int = 2, max_words: int = 2,
                     phrase_share: float = 0.5) -> list[str]:
    """The `top_k` most frequent concept names of `captions`: content words (see `caption_words`) and, with
    max_words >= 2, runs of up to `max_words` adjacent content words frequent as a unit (at least
    `phrase_share` of their rarest word's occurrences). Names seen fewer than `min_count` times are dropped.
    Order: count descending, then alphabetical, so the result depends on the captions only."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    sentences = [caption_words(c) for c in captions]
    words = Counter(w for s in sentences for w in s if w is not None)
    phrases = set(_phrase_counts(sentences, words, min_count, max_words, phrase_share)) if max_words > 1 else set()
    counts = _count_with_phrases(sentences, phrases, max_words) if phrases else words
    ranked = sorted(((c, name) for name, c in counts.items() if c >= min_count), key=lambda x: (-x[0], x[1]))
    return [name for _, name in ranked[:top_k]]


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
