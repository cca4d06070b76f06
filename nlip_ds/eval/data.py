"""Evaluation inputs: shards, an ImageFolder tree, or a Karpathy-style caption JSON, as one stream of records.

Every reader yields `EvalRecord`s in a fixed order (the record's `index`), so that ranks can take every
world_size-th record and the gathered results can be put back in the order one process would have seen.
Images are read lazily (a path) or kept only while the record is in flight (shard bytes).

Bad inputs never stop an evaluation silently and never go unnamed: an image that fails to decode or a record
without captions (when captions are needed) is skipped and added to `Problems` with its file (and shard key);
a missing file or folder that the whole evaluation depends on raises FileNotFoundError naming it.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch

from nlip_ds.data.samples import IMAGE_EXTENSIONS, SampleError, decode_image, eval_transform, normalize
from nlip_ds.data.shards import expand_pattern, iter_tar_samples

logger = logging.getLogger(__name__)

MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb limit


@dataclass
class EvalRecord:
    index: int  # position in the reader's order
    where: str  # the file (and shard member) named in reports
    image: Union[Path, bytes]
    captions: list[str] = field(default_factory=list)
    label: int = -1


@dataclass
class Problems:
    """Skipped inputs as (where, reason); logged as they happen and written into the results JSON."""
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.items.append((where, reason))
        logger.warning("skipped %s: %s", where, reason)

    def as_json(self) -> list[dict]:
        return [{"file": w, "reason": r} for w, r in self.items]


# ------------------------------------------------------------------------------------------------ readers


def open_records(data: str, *, image_root: Optional[str] = None, split: Optional[str] = "test",
                 class_names: Optional[list[str]] = None) -> Iterator[EvalRecord]:
    """Records of `data`: a Karpathy-style .json, an ImageFolder tree (class sub-folders of images), or
    shards (a split folder of .tar files, a .tar, a brace pattern)."""
    path = Path(data)
    if data.endswith(".json"):
        if not path.is_file():
            raise FileNotFoundError(f"caption JSON {path} does not exist")
        return karpathy_records(path, Path(image_root) if image_root else path.parent, split)
    if path.is_dir() and not any(path.glob("*.tar")):
        _check_folder(path)
        return image_folder_records(path, class_names)
    return shard_records(data)


def _check_folder(path: Path) -> None:
    """A folder without shards must be an ImageFolder tree; a dataset root of split folders is a likely
    mistake worth its own message."""
    folders = _class_folders(path)
    splits = [f.name for f in folders if any(f.glob("*.tar"))]
    if splits:
        raise FileNotFoundError(f"{path} holds split folders of shards ({', '.join(splits)}); pass one of them, "
                                f"e.g. {path / splits[-1]}")
    if not any(_is_image(file) for f in folders for file in f.iterdir()):
        raise FileNotFoundError(f"{path} holds neither .tar shards nor class sub-folders of images")


def _is_image(file: Path) -> bool:
    return file.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def karpathy_records(path: Path, image_root: Path, split: Optional[str]) -> Iterator[EvalRecord]:
    """Karpathy's dataset_coco.json layout: {"images": [{"filename", ["filepath"], "split", "sentences":
    [{"raw": ...}]}]}. Images of another split are left out when the entries carry a split."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a Karpathy-style caption JSON (an object with an \"images\" list): "
                         f"{exc}") from None
    if split and any("split" in e for e in entries):
        entries = [e for e in entries if e.get("split") == split]
    if not entries:
        raise ValueError(f"{path}: no images of split {split!r}")
    for index, entry in enumerate(entries):
        file = image_root / entry.get("filepath", "") / entry["filename"]
        captions = [s.get("raw", "").strip() for s in entry.get("sentences", [])]
        yield EvalRecord(index, str(file), file, [c for c in captions if c])


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def image_folder_records(root: Path, class_names: Optional[list[str]] = None) -> Iterator[EvalRecord]:
    """root/<class>/<image>: the label is the folder's position in `class_names` (sorted folder names when
    None). A folder that names no known class raises, naming the folder."""
    folders = _class_folders(root)
    names = class_names or [f.name for f in folders]
    index = 0
    for folder in folders:
        if folder.name not in names:
            raise ValueError(f"class folder {folder} is not in the class list ({len(names)} names)")
        for file in sorted(folder.iterdir()):
            if _is_image(file):
                yield EvalRecord(index, str(file), file, [], names.index(folder.name))
                index += 1


def shard_records(pattern: str) -> Iterator[EvalRecord]:
    """Samples of webdataset shards: the image member, captions from the .json "captions" list or the .txt,
    the label from the .json "label" or the .cls member."""
    errors: Counter = Counter()
    index = 0
    for source in expand_pattern(pattern):
        for shard in source:
            for sample in iter_tar_samples(shard, errors):
                yield _shard_record(index, f"{shard}:{sample['__key__']}", sample)
                index += 1
    if errors:
        logger.warning("shards of %s: %s", pattern, dict(errors))


def _shard_record(index: int, where: str, sample: dict) -> EvalRecord:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    captions = meta.get("captions") if isinstance(meta.get("captions"), list) else None
    if captions is None and "txt" in sample:
        captions = [sample["txt"].decode("utf-8", "replace")]
    label = meta.get("label") if isinstance(meta.get("label"), int) else _cls(sample)
    return EvalRecord(index, where, sample[ext] if ext else b"",
                      [str(c).strip() for c in captions or [] if str(c).strip()], label)


def _cls(sample: dict) -> int:
    try:
        return int(sample["cls"].decode().strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return -1


# ------------------------------------------------------------------------------------------------ batches


def for_rank(records: Iterable[EvalRecord], rank: int, world_size: int,
             max_samples: Optional[int] = None) -> Iterator[EvalRecord]:
    """This rank's records: every world_size-th of the first max_samples."""
    for record in records:
        if max_samples is not None and record.index >= max_samples:
            return
        if record.index % world_size == rank:
            yield record


def load_image(record: EvalRecord, image_size: int) -> torch.Tensor:
    """(3, S, S) uint8, or SampleError naming why not."""
    if isinstance(record.image, Path):
        try:
            data = record.image.read_bytes()
        except OSError as exc:
            raise SampleError("unreadable_image", exc.strerror or str(exc)) from None
    else:
        data = record.image
    if not data:
        raise SampleError("missing_image")
    return eval_transform(decode_image(data, MAX_PIXELS), image_size)


def image_batches(records: Iterable[EvalRecord], image_size: int, batch_size: int, problems: Problems,
                  need_captions: bool = False) -> Iterator[tuple[torch.Tensor, list[EvalRecord]]]:
    """(images (B, 3, S, S) normalized float32, their records); unusable records go to `problems`."""
    images, kept = [], []
    for record in records:
        if need_captions and not record.captions:
            problems.add(record.where, "no captions")
            continue
        try:
            images.append(load_image(record, image_size))
        except SampleError as exc:
            problems.add(record.where, str(exc))
            continue
        record.image = b""  # the pixels are in `images` now; do not keep the encoded bytes alive
        kept.append(record)
        if len(kept) == batch_size:
            yield normalize(torch.stack(images)), kept
            images, kept = [], []
    if kept:
        yield normalize(torch.stack(images)), kept
