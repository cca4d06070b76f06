"""A concept vocabulary from a dataset's own captions (`nlip-ds data concepts`), in the file format that
noise-completion reads (completion/concepts.py's `load_vocabulary`): one concept name per line.

The names are the frequent content words of the captions and their frequent runs of adjacent content words;
function words, caption framing ("a photo of") and web boilerplate (URLs, file names) are left out.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence


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
