"""The caption tokenizer: trained locally on the training captions, saved in a folder transformers can load.

Nothing may be downloaded, and the synthetic and user datasets have their own small vocabularies, so the
tokenizer is a lowercase WordPiece model trained with the `tokenizers` package. Its folder (tokenizer.json,
tokenizer_config.json, special_tokens_map.json) loads with `transformers.AutoTokenizer.from_pretrained(dir)`;
the `Tokenizer` wrapper adds the fixed-length tensor encoding the models consume.

Special tokens have fixed ids: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, [SEP]=4, [MASK]=5.

- `encode(texts, T)`:           [BOS] tokens [EOS] [PAD]...   (truncation keeps [EOS] as the last real token)
- `encode_concepts(lists, T)`:  "red circle , blue square" [PAD]...   concept names joined by CONCEPT_SEPARATOR,
  no [BOS]/[EOS]: the text encoder builds `concepts [SEP] caption` itself.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from nlip_ds.data.shards import expand_pattern, iter_tar_samples

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]", "[MASK]")
SPECIAL_ROLES = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]",
                 "sep_token": "[SEP]", "mask_token": "[MASK]"}
CONCEPT_SEPARATOR = " , "
TOKENIZER_FILE = "tokenizer.json"


def _new_rust_tokenizer() -> RustTokenizer:
    tok = RustTokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # splits on whitespace and punctuation
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def _add_template(tok: RustTokenizer) -> None:
    """Make transformers' own call (`hf(text)`) add [BOS] ... [EOS] like `Tokenizer.encode` does."""
    ids = {t: tok.token_to_id(t) for t in ("[BOS]", "[EOS]", "[SEP]")}
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", pair="[BOS] $A [SEP] $B [EOS]",
                                                       special_tokens=list(ids.items()))


def train_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 1024) -> Path:
    """Train a lowercase WordPiece tokenizer on `texts` and save it into `out_dir`; returns the folder."""
    tok = _new_rust_tokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        min_frequency=1, show_progress=False,
                                        initial_alphabet=[CONCEPT_SEPARATOR.strip()])  # never [UNK]
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise ValueError("cannot train a tokenizer: no text was given")
    _add_template(tok)
    out = Path(out_dir)
    Tokenizer(_to_transformers(tok)).save(out)
    logger.info("trained a %d-token tokenizer, saved to %s", tok.get_vocab_size(), out)
    return out


def _to_transformers(tok: RustTokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **SPECIAL_ROLES)


class Tokenizer:
    """Fixed-length tensor encoding on top of a transformers fast tokenizer (available as `.hf`)."""

    def __init__(self, hf):
        self.hf = hf
        self._tok: RustTokenizer = hf.backend_tokenizer
        ids = {role: self._tok.token_to_id(token) for role, token in SPECIAL_ROLES.items()}
        missing = [SPECIAL_ROLES[role] for role, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train one with train_tokenizer()")
        self.pad_id, self.unk_id, self.bos_id = ids["pad_token"], ids["unk_token"], ids["bos_token"]
        self.eos_id, self.sep_id, self.mask_id = ids["eos_token"], ids["sep_token"], ids["mask_token"]
        self._special = set(ids.values())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def _pieces(self, text: str) -> list[int]:
        # One text at a time: the batch API would start Rust threads, which then warn in forked loader workers.
        return self._tok.encode(text, add_special_tokens=False).ids

    def _pad(self, row: list[int], max_length: int) -> tuple[list[int], list[int]]:
        return row + [self.pad_id] * (max_length - len(row)), [1] * len(row) + [0] * (max_length - len(row))

    def _pack(self, rows: list[list[int]], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        padded = [self._pad(row, max_length) for row in rows]
        ids = torch.tensor([p[0] for p in padded], dtype=torch.long).view(len(rows), max_length)  # (B, T)
        mask = torch.tensor([p[1] for p in padded], dtype=torch.long).view(len(rows), max_length)  # (B, T)
        return ids, mask

    def encode_one(self, text: str, max_length: int) -> tuple[list[int], list[int]]:
        """One row of `encode` as lists: what the loader's tokenize stage stores per sample."""
        return self._pad([self.bos_id] + self._pieces(text)[:max_length - 2] + [self.eos_id], max_length)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, max_length): [BOS] tokens [EOS] then [PAD]."""
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [BOS] and [EOS], got {max_length}")
        rows = [[self.bos_id] + self._pieces(t)[:max_length - 2] + [self.eos_id] for t in texts]
        return self._pack(rows, max_length)

    def encode_concepts(self, concepts_per_sample: Sequence[Sequence[str]], max_length: int):
        """(ids, mask), both (B, max_length): each sample's concept names joined by CONCEPT_SEPARATOR, no
        [BOS]/[EOS], truncated to max_length; an empty list gives an all-[PAD] row with a zero mask."""
        rows = [self._pieces(CONCEPT_SEPARATOR.join(c))[:max_length] if c else [] for c in concepts_per_sample]
        return self._pack(rows, max_length)

    def decode(self, ids) -> list[str]:
        """Text of each row of `ids` ((B, T) tensor or lists): specials skipped, stopping at the first [EOS]."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
        return [self._tok.decode(self._until_eos(row), skip_special_tokens=True) for row in rows]

    def _until_eos(self, row: list[int]) -> list[int]:
        out = []
        for i in row:
            if i == self.eos_id:
                break
            if i not in self._special:
                out.append(i)
        return out

    def save(self, out_dir) -> Path:
        """Write the folder atomically (a temporary sibling renamed into place), so that concurrent ranks
        never see half a tokenizer."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        self.hf.save_pretrained(tmp)
        (tmp / "special_tokens_map.json").write_text(json.dumps(SPECIAL_ROLES, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return out


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer folder (local only, nothing is downloaded)."""
    path = Path(path)
    if not (path / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a tokenizer folder (no {TOKENIZER_FILE})")
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def training_captions(train_shards_pattern: str) -> Iterable[str]:
    """The .txt member of every sample of the training shards."""
    errors: Counter = Counter()
    for source in expand_pattern(train_shards_pattern):
        for shard in source:
            for sample in iter_tar_samples(shard, errors):
                if "txt" in sample:
                    yield sample["txt"].decode("utf-8", "replace")


def ensure_tokenizer(path_or_none: Optional[str], train_shards_pattern: Optional[str], out_dir,
                     vocab_size: int = 1024) -> Tokenizer:
    """Load the tokenizer at `path_or_none` (or `out_dir` when None); when it does not exist yet, train it on
    the training captions and save it there. Run it on one rank first, then the others load the result."""
    target = Path(path_or_none) if path_or_none else Path(out_dir)
    if (target / TOKENIZER_FILE).is_file():
        return load_tokenizer(target)
    if not train_shards_pattern:
        raise FileNotFoundError(f"no tokenizer at {target} and no training shards to train one on")
    logger.info("no tokenizer at %s: training one on the captions of %s", target, train_shards_pattern)
    train_tokenizer(training_captions(train_shards_pattern), target, vocab_size)
    return load_tokenizer(target)
