"""What one raw tar sample becomes on its way into a batch: decode, image transform, tokenize, collate.

These are the per-sample stages of the loader (pipeline.py wires them together). They are kept free of any
loader state so that each can be tested alone. A sample that cannot be used raises `SampleError` with a reason
name; the loader's skip-and-count stages count it in a `SkipCounter` and move on.

Augmentation randomness comes from a generator seeded by (seed, epoch, rank, position of the sample in its
worker's stream), never from the global RNG: the same seed, epoch and rank give the same batches in any number
of processes, and a resumed run crops the remaining samples exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import tarfile
import time
import warnings
from collections import Counter
from typing import Optional

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
NOISE_CODES = {"clean": 0, "incorrect": 1, "incomplete": 2}
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalization, the convention of the field
STD = (0.26862954, 0.26130258, 0.27577711)
INT_FIELDS = {"input_ids": torch.long, "attention_mask": torch.long, "sample_id": torch.long,
              "label": torch.long, "noise_type": torch.long, "pad": torch.bool}
TENSOR_FIELDS = ("image", *INT_FIELDS)
LIST_FIELDS = ("caption", "objects")


class SampleError(Exception):
    """A sample that is skipped; `reason` is the name it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ skip-and-count

# Every reason the loader counts a skip under (short identifiers: TensorBoard logs them as data/skipped/<reason>).
# Tar level, one per error: corrupt_tar, unreadable_shard, duplicate_member, tar_error. Sample level, one per
# sample: short_shard (listed in index.json, lost by the tar), duplicate_key, and the decode reasons after it.
SKIP_REASONS = ("corrupt_tar", "unreadable_shard", "duplicate_member", "tar_error", "short_shard", "duplicate_key",
                "missing_image", "empty_image", "undecodable_image", "image_too_large", "missing_caption",
                "empty_caption", "non_utf8_caption", "bad_metadata")


def tar_reason(exn: Exception) -> str:
    if isinstance(exn, (tarfile.TarError, EOFError)):
        return "corrupt_tar"
    if isinstance(exn, OSError):
        return "unreadable_shard"
    if isinstance(exn, ValueError) and "duplicate" in str(exn):
        return "duplicate_member"
    return "tar_error"


def printable(text: str, limit: int = 300) -> str:
    """`text` safe for any log stream: surrogates from undecodable tar names escaped, cut at `limit`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


class SkipCounter:
    """Counts skipped items by reason and logs them at a limited rate, per reason: the 1st, 10th, 100th, ...
    occurrence, and otherwise at most one line every `log_interval` seconds (each line gives the count so far).

    Counts wait in `pending` until the next good sample carries them out (`drain`), so the main process adds
    them exactly when it consumes that sample: the counts then match the loader's position, also on resume.
    """

    def __init__(self, where: str, log_interval: float = 60.0, clock=time.monotonic):
        self.where, self.log_interval, self.clock = where, log_interval, clock
        self.pending: Counter = Counter()
        self.totals: Counter = Counter()
        self.last_logged: dict[str, float] = {}
        self.good = 0

    def count(self, reason: str, detail: str, n: int = 1) -> None:
        """Count `n` skipped items of `reason`; `detail` names the shard and key."""
        before = self.totals[reason]
        self.pending[reason] += n
        self.totals[reason] += n
        now = self.clock()
        decade = len(str(self.totals[reason])) > len(str(before))  # passed 1, 10, 100, ...
        if decade or now - self.last_logged.get(reason, -math.inf) >= self.log_interval:
            self.last_logged[reason] = now
            logger.warning("%s: skipped %s (%d so far): %s", self.where, reason, self.totals[reason],
                           printable(detail))

    def drain(self) -> dict:
        out, self.pending = dict(self.pending), Counter()
        return out

    def discard(self) -> None:
        self.pending.clear()


# ------------------------------------------------------------------------------------------------ decode


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image; raises SampleError. The pixel count is checked from the header, before any decoding."""
    if not data:
        raise SampleError("empty_image", "zero bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns about damaged files it still reads, and about bombs: max_pixels decides, below
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise SampleError("image_too_large", f"{img.width}x{img.height} pixels, above {max_pixels}")
            if img.width < 1 or img.height < 1:
                raise SampleError("undecodable_image", f"{img.width}x{img.height} pixels")
            return to_rgb(img)
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:  # above PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS)
        raise SampleError("image_too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise SampleError("undecodable_image", "not an image file PIL can read") from None
    except Exception as exc:  # noqa: BLE001 - PIL's format plugins raise many kinds of errors on bad bytes
        raise SampleError("undecodable_image", f"{type(exc).__name__}: {exc}") from None


WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0}


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: 16-bit, 32-bit and float gray scaled to 0..255 (not clipped), transparency
    composited over white, CMYK, palette, gray and the rest through PIL's conversion."""
    if img.mode in WIDE_MODES or img.mode in ("I", "F"):
        img = _gray_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA") if img.mode != "La" else img.convert("LA").convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """A wide gray image as mode L. Full scale: 65535 for the 16-bit modes; for I and F the smallest of
    1 (float), 255, 65535 that holds the values, else the image's own range."""
    full = WIDE_MODES.get(img.mode)
    img = img.convert("F")
    lo, hi = img.getextrema()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise SampleError("undecodable_image", "non-finite pixel values")
    if full is None:
        full = next((f for f in (1.0, 255.0, 65535.0) if lo >= 0 and hi <= f), None)
    if full is None:
        scale, offset = (255.0 / (hi - lo) if hi > lo else 0.0), lo
    else:
        scale, offset = 255.0 / full, 0.0
    return img.point(lambda v: (v - offset) * scale + 0.5).convert("L")


def _caption(sample: dict) -> str:
    """The training caption. Invalid UTF-8 is skipped, not repaired (a caption in another encoding would train
    as mojibake); a leading byte-order mark is dropped."""
    if "txt" not in sample:
        raise SampleError("missing_caption")
    try:
        caption = sample["txt"].decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise SampleError("non_utf8_caption", str(exc)) from None
    if not caption:
        raise SampleError("empty_caption", "empty or white space")
    return caption


INT64_MAX = 2 ** 63 - 1


def _metadata(sample: dict) -> dict:
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except (ValueError, RecursionError):
        raise SampleError("bad_metadata", "not JSON") from None
    if not isinstance(meta, dict):
        raise SampleError("bad_metadata", "not a JSON object")
    for name, lo in (("sample_id", 0), ("label", -1)):
        value = meta.get(name)
        if type(value) is int and not lo <= value <= INT64_MAX:
            raise SampleError("bad_metadata", f"{name} {value} outside {lo}..2^63-1")
    return meta


def stable_id(sample: dict, meta: dict) -> int:
    """The sample id: metadata's sample_id, else a numeric key, else a 62-bit hash of shard name and key."""
    if type(meta.get("sample_id")) is int:
        return meta["sample_id"]
    key = sample["__key__"].rsplit("/", 1)[-1]
    if key.isascii() and key.isdigit() and int(key) <= INT64_MAX:
        return int(key)
    name = f"{str(sample.get('__url__', '')).rsplit('/', 1)[-1]}/{key}"
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def raw_sample_id(sample: dict) -> Optional[int]:
    """The id of an undecoded sample, None when its metadata is unusable (decoding will skip it)."""
    try:
        return stable_id(sample, _metadata(sample))
    except SampleError:
        return None


def _label(sample: dict, meta: dict) -> int:
    if type(meta.get("label")) is int:
        return meta["label"]
    try:
        label = int(sample["cls"].decode().strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return -1
    return label if -1 <= label <= INT64_MAX else -1


def decode_sample(sample: dict, max_pixels: int) -> dict:
    """Raw members {ext: bytes} -> {"image": PIL RGB, "caption", "sample_id", "label", "noise_type",
    "objects"}; raises SampleError."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise SampleError("missing_image")
    meta = _metadata(sample)
    objects, noise = meta.get("objects"), meta.get("noise_type")
    return {"image": decode_image(sample[ext], max_pixels), "caption": _caption(sample),
            "sample_id": stable_id(sample, meta), "label": _label(sample, meta),
            "noise_type": NOISE_CODES.get(noise, -1) if isinstance(noise, str) else -1,
            "objects": [str(o) for o in objects] if isinstance(objects, list) else []}


# ------------------------------------------------------------------------------------------------ transform


def crop_params(width: int, height: int, scale: tuple[float, float], rng: random.Random,
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: torchvision's rule, drawn from `rng`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(width, height)  # fall back to the central square
    return (height - side) // 2, (width - side) // 2, side, side


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 view of an RGB image's pixels."""
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(
        2, 0, 1)


def train_transform(img: Image.Image, size: int, scale_min: float, rng: random.Random) -> torch.Tensor:
    """(3, size, size) uint8: a random resized crop, bilinear like torchvision's RandomResizedCrop
    (normalization happens per batch, see `normalize`)."""
    top, left, h, w = crop_params(img.width, img.height, (scale_min, 1.0), rng)
    return to_tensor(img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) uint8: the short side resized to `size`, then the centre square."""
    if img.size != (size, size):
        img = TF.center_crop(TF.resize(_trim_long_side(img), size, interpolation=TF.InterpolationMode.BICUBIC),
                             [size, size])
    return to_tensor(img)


def _trim_long_side(img: Image.Image, ratio: int = 3) -> Image.Image:
    """The centre of an image whose long side is over `ratio` x its short side. Only the centre square is kept
    anyway, and without this a thin strip (say 1 x 10^7 pixels) would be resized to size x 10^7 size pixels."""
    w, h = img.size
    short = min(w, h)
    if max(w, h) <= ratio * short:
        return img
    long = ratio * short
    left, top = (w - min(w, long)) // 2, (h - min(h, long)) // 2
    return img.crop((left, top, left + min(w, long), top + min(h, long)))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W) with CLIP's mean and std, on the images' device. Done once per
    batch, by the model in training (ImageEncoder.pixels): images travel from the workers and to the device as
    uint8 (a quarter of the bytes) and one vector op replaces B small ones."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return images.float().div_(255.0).sub_(mean).div_(std)


# ------------------------------------------------------------------------------------------------ collate


def collate(samples: list[dict]) -> dict:
    """Per-sample records (image (3, H, W) uint8, token rows as lists, Python scalars) -> a chunk: tensors
    (B, ...) and lists of length B."""
    chunk = {"image": torch.stack([s["image"] for s in samples])}  # (B, 3, H, W) uint8
    for f, dtype in INT_FIELDS.items():
        chunk[f] = torch.tensor([s[f] for s in samples], dtype=dtype)  # (B, T) or (B,)
    chunk.update({f: [s[f] for s in samples] for f in LIST_FIELDS})
    return chunk


def gather(refs: list[tuple[dict, int]], pin_memory: bool = False) -> dict:
    """The batch the loader yields, from (chunk, index) references: one index_select per chunk and field,
    put back in reference order. Images stay uint8 (a quarter of float32's bytes to copy to the device, where
    the model normalizes them); with `pin_memory` they are copied into page-locked memory, so that the copy to
    a GPU (non_blocking) is asynchronous."""
    groups: dict[int, tuple[dict, list[int], list[int]]] = {}
    for position, (chunk, index) in enumerate(refs):
        _, positions, indices = groups.setdefault(id(chunk), (chunk, [], []))
        positions.append(position)
        indices.append(index)
    order = torch.tensor([p for _, positions, _ in groups.values() for p in positions]).argsort()
    batch = {f: torch.cat([chunk[f][torch.tensor(indices)] for chunk, _, indices in groups.values()])[order]
             for f in TENSOR_FIELDS}
    batch.update({f: [chunk[f][index] for chunk, index in refs] for f in LIST_FIELDS})
    if pin_memory:
        batch["image"] = batch["image"].pin_memory()  # (B, 3, H, W) uint8
    return batch


def crop_rng(seed: int, epoch: int, rank: int, worker, position: int) -> random.Random:
    """The augmentation generator of one sample (a string seed is hashed with SHA-512: stable everywhere)."""
    return random.Random(f"nlip-crop/{seed}/{epoch}/{rank}/{worker}/{position}")
