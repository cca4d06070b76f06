"""Webdataset tar shards: the one on-disk format that training reads.

Every data source (the synthetic generator, a JSONL of image-caption pairs, a folder of images with .txt
sidecars) is converted once into the same layout, so the loader has a single input path:

    <out>/<split>/<split>-000000.tar, <split>-000001.tar, ...   members <key>.<png|jpg|webp>, .txt, .json[, .cls]
    <out>/<split>/index.json                                     {"shards": [{"name", "num_samples"}], "num_samples"}

The writer fixes every tar header field (mtime, owner, mode), so the same input gives the same bytes. User data
is converted item by item: a bad item is skipped, counted by reason and listed in `<out>/report.json`; the
conversion never stops half-way, and it only ever writes files whose names it made up itself inside `out_dir`.
"""
from __future__ import annotations

import io
import json
import logging
import re
import statistics
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import braceexpand
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

KEY_WIDTH = 9
INDEX_FILE = "index.json"
REPORT_FILE = "report.json"
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others become PNG
NOISE_TYPES = ("clean", "incorrect", "incomplete")

ProgressCallback = Optional[Callable[[int], None]]


def sample_key(sample_id: int) -> str:
    """Tar member prefix of a sample: its zero-padded id, so keys sort like ids and never contain a path."""
    return f"{sample_id:0{KEY_WIDTH}d}"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _shard_name_re(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + r"-\d{6}\.tar")


# ------------------------------------------------------------------------------------------------ writing


class ShardWriter:
    """Writes samples into `<split_dir>/<prefix>-NNNNNN.tar`, `shard_size` samples per shard, then index.json.

    Each shard is written to a `.tmp` file and renamed when complete, so a crash never leaves a shard that
    looks finished. Use as a context manager; `close()` returns the index.
    """

    def __init__(self, split_dir: Path, prefix: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.split_dir, self.prefix, self.shard_size = Path(split_dir), prefix, shard_size
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            self._tmp_path().unlink(missing_ok=True)

    def _path(self) -> Path:
        return self.split_dir / shard_name(self.prefix, len(self.shards))

    def _tmp_path(self) -> Path:
        return self._path().with_suffix(".tar.tmp")

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: `members` maps an extension ("png", "txt", ...) to the member's bytes."""
        if self._tar is None:
            self._tar = tarfile.open(self._tmp_path(), "w", format=tarfile.USTAR_FORMAT)
        for ext in sorted(members):
            _add_member(self._tar, f"{key}.{ext}", members[ext])
        self._count += 1
        if self._count == self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._tar.close()
        self._tmp_path().replace(self._path())
        self.shards.append({"name": self._path().name, "num_samples": self._count})
        self._tar, self._count = None, 0

    def close(self) -> dict:
        if self._tar is not None:
            self._finish_shard()
        index = {"shards": self.shards, "num_samples": sum(s["num_samples"] for s in self.shards)}
        (self.split_dir / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        return index


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def prepare_split_dir(out_dir: Path, split: str, overwrite: bool) -> Path:
    """The split folder, emptied of the shards and index a previous conversion left (only those files)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise ValueError(f"split name {split!r}: use letters, digits, '_' and '-' only (it names a folder)")
    split_dir = Path(out_dir) / split
    pattern = _shard_name_re(split)
    old = [p for p in split_dir.glob("*") if pattern.fullmatch(p.name) or p.name == INDEX_FILE]
    if old and not overwrite:
        raise FileExistsError(f"{split_dir} already holds shards ({len(old)} files); choose another output "
                              "folder, or overwrite them (--overwrite, overwrite=True)")
    for path in old:
        path.unlink()
    return split_dir


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


# ------------------------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class Shard:
    path: Path
    num_samples: int


def expand_pattern(pattern: str) -> list[list[Path]]:
    """Shard paths per '::'-separated source. A source is a brace pattern, a .tar file or a split folder."""
    sources = [s.strip() for s in str(pattern).split("::") if s.strip()]
    if not sources:
        raise ValueError(f"empty shard pattern {pattern!r}")
    return [_expand_source(s) for s in sources]


def _expand_source(source: str) -> list[Path]:
    if Path(source).is_dir():
        return _folder_shards(Path(source))
    paths = [Path(p) for p in braceexpand.braceexpand(source)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard {missing[0]} does not exist ({len(missing)} of {len(paths)} shards of "
                                f"{source!r} missing)")
    return paths


def _folder_shards(folder: Path) -> list[Path]:
    index = read_index(folder)
    paths = [folder / s["name"] for s in index["shards"]] if index else sorted(folder.glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"{folder} holds no .tar shards")
    return paths


def read_index(folder: Path) -> Optional[dict]:
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None


def shard_counts(paths: Iterable[Path]) -> list[Shard]:
    """Samples per shard, from each folder's index.json; shards the index does not list are counted by name."""
    indexes: dict[Path, dict] = {}
    shards = []
    for path in paths:
        folder = path.parent
        if folder not in indexes:
            index = read_index(folder) or {"shards": []}
            indexes[folder] = {s["name"]: s["num_samples"] for s in index["shards"]}
        count = indexes[folder].get(path.name)
        shards.append(Shard(path, count if count is not None else count_samples(path)))
    return shards


def count_samples(path: Path) -> int:
    """Distinct sample keys in a tar (member headers only, no data read); 0 for an unreadable tar."""
    logger.info("counting samples of %s (no index.json entry)", path)
    keys = set()
    try:
        with tarfile.open(path, "r") as tar:
            keys = {_split_member(m.name)[0] for m in tar if m.isreg()}
    except (OSError, tarfile.TarError) as exc:
        logger.warning("cannot read %s: %s", path, exc)
    keys.discard(None)
    return len(keys)


def _split_member(name: str) -> tuple[Optional[str], Optional[str]]:
    """`dir/000000012.json` -> ("dir/000000012", "json"): webdataset's rule (key up to the first dot)."""
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


# ------------------------------------------------------------------------------------------------ converting


class SkipError(Exception):
    """An input item that cannot become a sample; `reason` is the counted category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Report:
    """What a conversion kept and skipped; written as `<out>/report.json`."""

    input: str
    split: str
    num_samples: int = 0
    skipped: list[dict] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)

    def skip(self, item: str, err: SkipError) -> None:
        self.skipped.append({"item": item, "reason": err.reason, "detail": err.detail})

    def as_dict(self) -> dict:
        by_reason = Counter(s["reason"] for s in self.skipped)
        return {"input": self.input, "split": self.split, "num_samples": self.num_samples,
                "num_skipped": len(self.skipped), "skipped_by_reason": dict(sorted(by_reason.items())),
                "skipped": self.skipped, "shards": self.shards}


def _read_bytes(path: Path, *, missing: str, unreadable: str) -> bytes:
    """A file's bytes, or a SkipError with the given reason that names the file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SkipError(missing, f"{path} does not exist") from None
    except OSError as exc:
        raise SkipError(unreadable, f"{path}: {exc.strerror or exc}") from None


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """The bytes to store and their extension; JPEG/PNG/WebP stay as they are, other formats become PNG."""
    data = _read_bytes(path, missing="missing_image", unreadable="unreadable_image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise SkipError("image_too_large", f"{path}: {img.width}x{img.height} pixels")
            img.load()
            return _stored_bytes(img, data)
    except Image.DecompressionBombError as exc:
        raise SkipError("image_too_large", f"{path}: {exc}") from None
    except UnidentifiedImageError:
        raise SkipError("unreadable_image", f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SkipError("unreadable_image", f"{path}: {exc}") from None


def _stored_bytes(img: Image.Image, data: bytes) -> tuple[bytes, str]:
    if img.format in KEPT_FORMATS:
        return data, KEPT_FORMATS[img.format]
    buf = io.BytesIO()
    img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, format="PNG")
    return buf.getvalue(), "png"


def check_caption(caption) -> bytes:
    """UTF-8 bytes of a usable caption (surrounding whitespace removed)."""
    if not isinstance(caption, str):
        raise SkipError("malformed_line", f"caption is {type(caption).__name__}, not a string")
    try:
        data = caption.strip().encode("utf-8")
    except UnicodeEncodeError:
        raise SkipError("non_utf8_caption", repr(caption)[:200]) from None
    if not data:
        raise SkipError("empty_caption", "caption is empty")
    return data


def _parse_line(raw: bytes) -> tuple[str, str]:
    """(image path, caption) of one JSONL line. Invalid UTF-8 survives as surrogates and is refused in the
    caption (check_caption); a path may hold such bytes, as Linux file names can."""
    try:
        obj = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise SkipError("malformed_line", f"not JSON ({exc}): {_printable(repr(raw))}") from None
    if not isinstance(obj, dict):
        raise SkipError("malformed_line", f"expected an object, got {type(obj).__name__}")
    for name in ("image", "caption"):
        if name not in obj:
            raise SkipError("malformed_line", f"no {name!r} field")
    if not isinstance(obj["image"], str) or not obj["image"]:
        raise SkipError("malformed_line", "'image' is not a non-empty string")
    return obj["image"], obj["caption"]


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:300]


def report_path(out_dir: Path, name: Optional[str], split: str) -> Path:
    """Where the report goes: `name` inside out_dir, by default report.json (report-<split>.json for a split
    other than train, so that converting several splits into one folder keeps every report)."""
    name = name or (REPORT_FILE if split == "train" else f"report-{split}.json")
    target = (Path(out_dir) / name).resolve()
    if Path(out_dir).resolve() not in target.parents:
        raise ValueError(f"report {name!r} would be written outside the output folder {out_dir}")
    return target


@dataclass
class ConvertOptions:
    shard_size: int = DEFAULT_SHARD_SIZE
    split: str = "train"
    start_id: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    report: Optional[str] = None


def convert_jsonl(jsonl, out_dir, shard_size: int = DEFAULT_SHARD_SIZE, report: Optional[str] = None, *,
                  split: str = "train", start_id: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                  overwrite: bool = False, progress: ProgressCallback = None) -> dict:
    """Convert `{"image": path, "caption": text}` lines into shards under `<out_dir>/<split>/`.

    The sample id is `start_id` + the 0-based line number, so ids stay put when a broken line is fixed.
    Relative image paths resolve against the JSONL's folder. Returns the report (also written to
    `report_path(out_dir, report, split)`, with that path under "report_path" in the returned dict).
    """
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise FileNotFoundError(f"input {jsonl} does not exist or is not a file")
    opts = ConvertOptions(shard_size, split, start_id, max_pixels, overwrite, report)
    return _convert(_jsonl_items(jsonl), str(jsonl), Path(out_dir), opts, progress)


def _jsonl_items(jsonl: Path) -> Iterator[tuple[int, str, Callable]]:
    """(line number, where, make) per non-blank line; `make()` returns (source, (image bytes, ext), caption
    bytes) or raises SkipError."""
    base = jsonl.parent
    with jsonl.open("rb") as f:
        for number, raw in enumerate(f):
            if raw.strip():
                yield number, f"line {number + 1}", lambda raw=raw: _jsonl_sample(raw, base)


def _jsonl_sample(raw: bytes, base: Path):
    image, caption = _parse_line(raw)
    text = check_caption(caption)
    path = Path(image) if Path(image).is_absolute() else base / image
    return image, load_image(path), text


def convert_image_folder(folder, out_dir, shard_size: int = DEFAULT_SHARD_SIZE, report: Optional[str] = None, *,
                         split: str = "train", start_id: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                         overwrite: bool = False, progress: ProgressCallback = None) -> dict:
    """Convert every image under `folder` (recursively, sorted) with a `<stem>.txt` caption beside it.

    The sample id is `start_id` + the image's rank in sorted order of relative paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    opts = ConvertOptions(shard_size, split, start_id, max_pixels, overwrite, report)
    out_dir = Path(out_dir)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and out_dir.resolve() not in p.resolve().parents)
    items = ((i, str(p.relative_to(folder)), lambda p=p: _folder_sample(p, folder)) for i, p in enumerate(images))
    return _convert(items, str(folder), out_dir, opts, progress)


def _folder_sample(image: Path, folder: Path):
    sidecar = image.with_suffix(".txt")
    raw = _read_bytes(sidecar, missing="missing_caption", unreadable="missing_caption")
    try:
        caption = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SkipError("non_utf8_caption", f"{sidecar}: {exc}") from None
    return str(image.relative_to(folder)), load_image(image), check_caption(caption)


def _convert(items, input_name: str, out_dir: Path, opts: ConvertOptions, progress: ProgressCallback) -> dict:
    report = Report(input=input_name, split=opts.split)
    target = report_path(out_dir, opts.report, opts.split)  # refused before any work if outside out_dir
    split_dir = prepare_split_dir(out_dir, opts.split, opts.overwrite)
    with ShardWriter(split_dir, opts.split, opts.shard_size) as writer:
        for number, where, make in items:
            _convert_one(writer, report, opts.start_id + number, where, make)
            if progress:
                progress(1)
    report.num_samples, report.shards = sum(s["num_samples"] for s in writer.shards), writer.shards
    target.write_text(json.dumps(report.as_dict(), indent=1, ensure_ascii=False) + "\n")
    logger.info("wrote %d samples in %d shards to %s, skipped %d (report: %s)", report.num_samples,
                len(report.shards), split_dir, len(report.skipped), target)
    return {**report.as_dict(), "report_path": str(target)}


def _convert_one(writer: ShardWriter, report: Report, sample_id: int, where: str, make) -> None:
    try:
        source, (image, ext), caption = make()
    except SkipError as err:
        report.skip(where, err)
        return
    meta = {"sample_id": sample_id, "source": _printable(source)}
    writer.write(sample_key(sample_id), {ext: image, "txt": caption, "json": json_bytes(meta)})


# ------------------------------------------------------------------------------------------------ inspecting


def _split_folders(root: Path) -> dict[str, list[Path]]:
    """A dataset root with split sub-folders, or one folder of shards."""
    subs = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("*.tar"))}
    if subs and not any(root.glob("*.tar")):
        order = sorted(subs, key=lambda n: (["train", "val", "test"] + [n]).index(n))
        return {name: _folder_shards(subs[name]) for name in order}
    return {root.name: _folder_shards(root)}


def iter_tar_samples(path: Path, errors: Counter) -> Iterator[dict]:
    """Samples of one tar as {"__key__": key, ext: bytes}; a read error ends the shard and is counted."""
    current: dict = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                key, ext = _split_member(member.name)
                if key is None or not member.isreg():
                    continue
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current.setdefault("__key__", key)
                current[ext] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        errors["unreadable_tar"] += 1
        logger.warning("cannot read %s: %s", path, exc)
    if current:
        yield current


def split_shards(path_or_pattern) -> dict[str, list[Path]]:
    """Shard paths per split: a dataset root's split folders, or one folder, .tar or pattern as one split."""
    target = Path(str(path_or_pattern))
    if target.is_dir():
        return _split_folders(target)
    name = target.stem if target.is_file() else "shards"
    return {name: [p for source in expand_pattern(str(path_or_pattern)) for p in source]}


def inspect(path_or_pattern, max_examples: int = 3) -> dict:
    """Counts, caption length statistics, noise types and examples of a dataset, per split."""
    return {"path": str(path_or_pattern),
            "splits": {name: _inspect_shards(paths, max_examples)
                       for name, paths in split_shards(path_or_pattern).items()}}


def _inspect_shards(paths: list[Path], max_examples: int) -> dict:
    """One split's summary; `duplicate_keys` counts samples whose key an earlier sample of the split had (the
    loader sees a repeat only within one worker's shards, so this is the dataset-wide check)."""
    errors: Counter = Counter()
    words, noise, examples, count = [], Counter(), [], 0
    keys, duplicates = set(), []
    for path in paths:
        for sample in iter_tar_samples(path, errors):
            count += 1
            if sample["__key__"] in keys:
                duplicates.append(f"{path.name}:{sample['__key__']}")
            keys.add(sample["__key__"])
            caption = sample.get("txt", b"").decode("utf-8", "replace")
            meta = _meta(sample, errors)
            words.append(len(caption.split()))
            if "noise_type" in meta:
                noise[meta["noise_type"]] += 1
            if len(examples) < max_examples:
                examples.append(_example(sample, caption, meta))
    return {"shards": [str(p) for p in paths], "num_shards": len(paths), "num_samples": count,
            "index_samples": _index_total(paths),
            "caption_words": _stats(words), "noise_types": dict(sorted(noise.items())),
            "read_errors": dict(errors), "duplicate_keys": len(duplicates), "duplicates": duplicates[:max_examples],
            "examples": examples}


def listed_counts(paths: list[Path]) -> dict[Path, Optional[int]]:
    """Each shard's sample count in its folder's index.json; None for a shard that no index lists."""
    indexes: dict[Path, dict] = {}
    for folder in dict.fromkeys(p.parent for p in paths):
        indexes[folder] = {s["name"]: s["num_samples"] for s in (read_index(folder) or {"shards": []})["shards"]}
    return {p: indexes[p.parent].get(p.name) for p in paths}


def _index_total(paths: list[Path]) -> Optional[int]:
    """Samples that the index.json files list for `paths`; None when some shard is in no index."""
    counts = list(listed_counts(paths).values())
    return None if None in counts else sum(counts)


def _meta(sample: dict, errors: Counter) -> dict:
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
        return meta if isinstance(meta, dict) else {}
    except ValueError:
        errors["bad_metadata"] += 1
        return {}


def _example(sample: dict, caption: str, meta: dict) -> dict:
    example = {"key": sample["__key__"], "caption": caption}
    example.update({k: meta[k] for k in ("sample_id", "noise_type", "clean_caption", "objects", "source")
                    if k in meta})
    return example


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0}
    return {"min": min(values), "mean": round(statistics.fmean(values), 2),
            "median": float(statistics.median(values)), "max": max(values)}


def format_inspect(summary: dict) -> str:
    """Human-readable text of `inspect()`'s result, for the CLI."""
    lines = [f"dataset: {summary['path']}"]
    for name, s in summary["splits"].items():
        w = s["caption_words"]
        lines += [f"[{name}] {s['num_samples']} samples in {s['num_shards']} shards",
                  f"  caption words: min {w['min']}  mean {w['mean']}  median {w['median']}  max {w['max']}"]
        if s["noise_types"]:
            total = max(1, sum(s["noise_types"].values()))
            lines.append("  noise types: " + ", ".join(f"{k} {v} ({100 * v / total:.1f}%)"
                                                       for k, v in s["noise_types"].items()))
        if s["read_errors"]:
            lines.append("  read errors: " + ", ".join(f"{k} {v}" for k, v in s["read_errors"].items()))
        if s["duplicate_keys"]:
            lines.append(f"  duplicate keys: {s['duplicate_keys']} (e.g. {', '.join(s['duplicates'])})")
        lines += [f"  e.g. {json.dumps(e, ensure_ascii=False)}" for e in s["examples"]]
    return "\n".join(lines)
