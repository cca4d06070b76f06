"""`nlip-ds data filter`: a cleaned copy of a dataset from the per-pair scores of `nlip-ds audit`.

A pair is kept when its clean probability is at least `min_clean`. With `recaption_below`, a pair whose clean
probability is below it and whose image has a caption in the captions JSONL (`nlip-ds caption` output) is kept
with that caption instead, whatever `min_clean` says: the image is usable, its text was the problem. Pairs of
the data that the scores do not cover are dropped and counted as `unscored`.

The copy keeps every member of a kept sample byte for byte (sample id and key included) except the caption of
a re-captioned one, whose .json then records `original_caption` and moves the ground truth `noise_type` (a
statement about the old caption) to `original_noise_type`. Shards and index.json are written by ShardWriter
under OUT/<split>/, and the counts go to OUT/filter.json.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nlip_ds.data.scores import read_table
from nlip_ds.data.shards import (DEFAULT_SHARD_SIZE, ShardWriter, expand_pattern, iter_tar_samples, json_bytes,
                                 prepare_split_dir)

logger = logging.getLogger(__name__)

RECORD = "filter.json"
NEEDED = ("shard", "key", "clean_prob")


@dataclass
class FilterOptions:
    scores: str
    data: str
    out: Path
    min_clean: float = 0.5
    recaption_below: Optional[float] = None
    captions: Optional[str] = None
    split: Optional[str] = None
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False

    def check(self) -> None:
        for name in ("min_clean", "recaption_below"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1], got {value}")
        if (self.recaption_below is None) != (self.captions is None):
            raise ValueError("--recaption-below and --captions go together")
        if self.captions is not None and not Path(self.captions).is_file():
            raise FileNotFoundError(f"captions file {self.captions} does not exist")


def _shard_paths(data: str) -> list[Path]:
    paths = [p for source in expand_pattern(data) for p in source]
    names = Counter(p.name for p in paths)
    twice = [n for n, c in names.items() if c > 1]
    if twice:
        raise ValueError(f"{data}: shard name {twice[0]} occurs in several folders; filter one folder at a time")
    return paths


def clean_by_pair(scores: str) -> dict[tuple[str, str], float]:
    """(shard file name, key) -> clean probability, from an audit's scores file."""
    table = read_table(scores)
    missing = [c for c in NEEDED if c not in table]
    if missing:
        raise ValueError(f"scores file {scores} lacks column(s) {missing} (is it an `nlip-ds audit` output?)")
    return {(Path(s).name, k): float(p) for s, k, p in zip(table["shard"], table["key"], table["clean_prob"])}


def captions_by_pair(captions: str) -> dict[tuple[str, str], str]:
    """(shard file name, key) -> caption, from `nlip-ds caption --images SHARDS` output."""
    out = {}
    with open(captions, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                out[(Path(entry["shard"]).name, entry["key"])] = str(entry["caption"]).strip()
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{captions} line {number}: not an `nlip-ds caption` line over shards "
                                 f"(needs shard, key, caption): {exc}") from None
    return out


def decide(clean: Optional[float], new_caption: Optional[str], opts: FilterOptions) -> str:
    """"keep", "recaption", "drop" or "unscored" for one pair."""
    if clean is None:
        return "unscored"
    if opts.recaption_below is not None and clean < opts.recaption_below and new_caption:
        return "recaption"
    return "keep" if clean >= opts.min_clean else "drop"


def _recaptioned(sample: dict, caption: str) -> dict:
    members = {ext: data for ext, data in sample.items() if not ext.startswith("__")}
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError:
        meta = None
    if isinstance(meta, dict):
        meta["original_caption"] = sample.get("txt", b"").decode("utf-8", "replace")
        if "noise_type" in meta:
            meta["original_noise_type"] = meta.pop("noise_type")
        members["json"] = json_bytes(meta)
    members["txt"] = caption.encode("utf-8")
    return members


def filter_dataset(opts: FilterOptions, progress=None) -> dict:
    """Write the filtered copy; returns (and writes to OUT/filter.json) the counts."""
    opts.check()
    paths = _shard_paths(opts.data)
    clean = clean_by_pair(opts.scores)
    new = captions_by_pair(opts.captions) if opts.captions else {}
    split = opts.split or (paths[0].parent.name if Path(opts.data).is_dir() else "train")
    split_dir = prepare_split_dir(opts.out, split, opts.overwrite)
    counts: Counter = Counter()
    errors: Counter = Counter()
    with ShardWriter(split_dir, split, opts.shard_size) as writer:
        for path in paths:
            for sample in iter_tar_samples(path, errors):
                pair = (path.name, sample["__key__"])
                verdict = decide(clean.get(pair), new.get(pair), opts)
                counts[verdict] += 1
                if verdict == "keep":
                    writer.write(sample["__key__"], {e: d for e, d in sample.items() if not e.startswith("__")})
                elif verdict == "recaption":
                    writer.write(sample["__key__"], _recaptioned(sample, new[pair]))
                if progress:
                    progress(1)
    if not writer.shards:
        raise ValueError(f"no pair of {opts.data} passed the filter (min clean {opts.min_clean}); nothing written")
    record = {"scores": str(opts.scores), "data": opts.data, "out": str(split_dir), "min_clean": opts.min_clean,
              "recaption_below": opts.recaption_below, "captions": opts.captions, "read": sum(counts.values()),
              "kept": counts["keep"] + counts["recaption"], "kept_unchanged": counts["keep"],
              "recaptioned": counts["recaption"], "dropped": counts["drop"], "unscored": counts["unscored"],
              "read_errors": dict(errors), "shards": len(writer.shards)}
    (Path(opts.out) / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    logger.info("filtered %s: %s", opts.data, record)
    return record
