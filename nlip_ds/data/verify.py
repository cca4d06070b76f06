"""`nlip-ds data inspect --verify`: read every shard of a dataset to the end and say which ones are damaged.

`inspect` alone summarizes what it can read; a shard cut half-way still yields its head, so the summary looks
like a smaller, healthy dataset. Verification reads each shard the way the training loader does (the loader's
own tar reader `pipeline.read_shards` and per-sample `decode_sample`), so every loss is counted under the
loader's skip reasons (`samples.SKIP_REASONS`), and compares what was read with the counts of index.json.

Per shard it reports: samples the index lists, samples read from the tar, samples the loader would use, whether
the file is truncated (its last member's data or the end-of-archive marker is missing), skips by reason, and
samples whose id an earlier sample of the split already had (`duplicate_key`: the loader trains on the first
one only). A shard is damaged when any of these is off; the command then exits with status 1.
"""
from __future__ import annotations

import logging
import tarfile
from collections import Counter
from pathlib import Path
from typing import Optional

from nlip_ds.data.pipeline import read_shards
from nlip_ds.data.samples import SKIP_REASONS, SampleError, SkipCounter, decode_sample, raw_sample_id
from nlip_ds.data.shards import DEFAULT_MAX_PIXELS, Shard, listed_counts

logger = logging.getLogger(__name__)

BLOCK = 512  # tar block; a complete archive ends with two zero blocks after the last member's padded data


def tar_truncated(path: Path) -> bool:
    """Whether the tar ends before its last member's data and the end-of-archive marker (headers only)."""
    try:
        size = path.stat().st_size
        end = 0
        with tarfile.open(path, "r") as tar:
            for member in tar:
                end = member.offset_data + -(-member.size // BLOCK) * BLOCK  # data padded to whole blocks
    except (OSError, tarfile.TarError, EOFError):
        return True
    return size < end + 2 * BLOCK


def verify_shard(shard: Shard, listed: Optional[int], seen_ids: set, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """One shard's report; `seen_ids` holds the sample ids of the split's earlier shards and is updated."""
    counter = SkipCounter(str(shard.path), log_interval=float("inf"))
    read = usable = 0
    for raw in read_shards([shard], counter):
        read += 1
        sample_id = raw_sample_id(raw)
        if sample_id is not None and sample_id in seen_ids:
            counter.count("duplicate_key", f"{shard.path} key {raw.get('__key__')}: sample id {sample_id}")
            continue
        if sample_id is not None:
            seen_ids.add(sample_id)
        try:
            decode_sample(raw, max_pixels)
            usable += 1
        except SampleError as err:
            counter.count(err.reason, f"{shard.path} key {raw.get('__key__')}: {err}")
    skipped = {r: counter.totals[r] for r in SKIP_REASONS if counter.totals[r]}
    truncated = tar_truncated(shard.path) if shard.path.is_file() else True
    report = {"shard": str(shard.path), "index": listed, "read": read, "usable": usable, "truncated": truncated,
              "skipped": skipped}
    report["damaged"] = bool(truncated or skipped or (listed is not None and read != listed))
    return report


def verify_split(paths: list[Path], max_pixels: int = DEFAULT_MAX_PIXELS, progress=None) -> dict:
    """Every shard of one split, read fully; `progress(1)` after each shard."""
    listed, seen, reports = listed_counts(paths), set(), []
    for path in paths:
        reports.append(verify_shard(Shard(path, listed[path] or 0), listed[path], seen, max_pixels))
        if progress:
            progress(1)
    totals: Counter = Counter()
    for r in reports:
        totals.update(r["skipped"])
    return {"shards": reports, "num_shards": len(reports), "damaged_shards": sum(r["damaged"] for r in reports),
            "index_samples": sum(r["index"] or 0 for r in reports), "read": sum(r["read"] for r in reports),
            "usable": sum(r["usable"] for r in reports), "skipped": dict(totals)}


def format_verify(report: dict) -> str:
    """Text of a verification: one line per split and one per damaged shard."""
    lines = []
    for name, split in report["splits"].items():
        lines.append(f"[{name}] {split['usable']} usable of {split['read']} read, index lists "
                     f"{split['index_samples']}; {split['damaged_shards']} of {split['num_shards']} shards damaged")
        for s in split["shards"]:
            if s["damaged"]:
                skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
                lines.append(f"  DAMAGED {s['shard']}: read {s['read']} of {s['index']} listed, usable "
                             f"{s['usable']}, truncated {'yes' if s['truncated'] else 'no'}, skipped: {skipped}")
    damaged = sum(s["damaged_shards"] for s in report["splits"].values())
    lines.append(f"verify: {'FAILED, ' + str(damaged) + ' damaged shard(s)' if damaged else 'all shards intact'}")
    return "\n".join(lines)
