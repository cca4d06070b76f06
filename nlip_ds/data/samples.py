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
from collections import Counter
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


def tar_reason(exn: Exception) -> str:
    if isinstance(exn, (tarfile.TarError, EOFError)):
        return "corrupt_tar"
    if isinstance(exn, OSError):
        return "unreadable_shard"
    if isinstance(exn, ValueError) and "duplicate" in str(exn):
        return "duplicate_member"
    return "tar_error"


class SkipCounter:
    """Counts skipped items by reason and logs them at a decaying rate (1st, 10th, 100th, ... per reason).

    Counts wait in `pending` until the next good sample carries them out (`drain`), so the main process adds
    them exactly when it consumes that sample: the counts then match the loader's position, also on resume.
    """

    def __init__(self, where: str):
        self.where = where
        self.pending: Counter = Counter()
        self.totals: Counter = Counter()
        self.good = 0

    def count(self, reason: str, detail: str) -> None:
        self.pending[reason] += 1
        self.totals[reason] += 1
        n = self.totals[reason]
        if n == 10 ** int(math.log10(n)):
            logger.warning("%s: skipped (%s, occurrence %d): %s", self.where, reason, n, detail[:300])

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler: count and continue."""
        self.count(tar_reason(exn), f"{type(exn).__name__}: {exn}")
        return True

    def drain(self) -> dict:
        out, self.pending = dict(self.pending), Counter()
        return out

    def discard(self) -> None:
        self.pending.clear()


# ------------------------------------------------------------------------------------------------ decode


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise SampleError("image_too_large", f"{img.width}x{img.height} pixels")
        return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise SampleError("image_too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise SampleError("undecodable_image", "not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SampleError("undecodable_image", str(exc)) from None


def _caption(sample: dict) -> str:
    if "txt" not in sample:
        raise SampleError("missing_caption")
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SampleError("bad_caption", "not UTF-8") from None
    if not caption:
        raise SampleError("missing_caption", "empty")
    return caption


def _metadata(sample: dict) -> dict:
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except ValueError:
        raise SampleError("bad_metadata", "not JSON") from None
    if not isinstance(meta, dict):
        raise SampleError("bad_metadata", "not a JSON object")
    return meta


def stable_id(sample: dict, meta: dict) -> int:
    """The sample id: metadata's sample_id, else a numeric key, else a 62-bit hash of shard name and key."""
    if isinstance(meta.get("sample_id"), int):
        return meta["sample_id"]
    key = sample["__key__"].rsplit("/", 1)[-1]
    if key.isdigit():
        return int(key)
    name = f"{str(sample.get('__url__', '')).rsplit('/', 1)[-1]}/{key}"
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 2


def _label(sample: dict, meta: dict) -> int:
    if isinstance(meta.get("label"), int):
        return meta["label"]
    try:
        return int(sample["cls"].decode().strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return -1


def decode_sample(sample: dict, max_pixels: int) -> dict:
    """Raw members {ext: bytes} -> {"image": PIL RGB, "caption", "sample_id", "label", "noise_type",
    "objects"}; raises SampleError."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise SampleError("missing_image")
    meta = _metadata(sample)
    objects = meta.get("objects")
    return {"image": decode_image(sample[ext], max_pixels), "caption": _caption(sample),
            "sample_id": stable_id(sample, meta), "label": _label(sample, meta),
            "noise_type": NOISE_CODES.get(meta.get("noise_type"), -1),
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
        img = TF.center_crop(TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC), [size, size])
    return to_tensor(img)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W) with CLIP's mean and std. Done once per batch: images travel
    from the workers as uint8 (a quarter of the bytes) and one vector op replaces B small ones."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
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


def gather(refs: list[tuple[dict, int]]) -> dict:
    """The batch the loader yields, from (chunk, index) references: one index_select per chunk and field,
    put back in reference order, images normalized to float32."""
    groups: dict[int, tuple[dict, list[int], list[int]]] = {}
    for position, (chunk, index) in enumerate(refs):
        _, positions, indices = groups.setdefault(id(chunk), (chunk, [], []))
        positions.append(position)
        indices.append(index)
    order = torch.tensor([p for _, positions, _ in groups.values() for p in positions]).argsort()
    batch = {f: torch.cat([chunk[f][torch.tensor(indices)] for chunk, _, indices in groups.values()])[order]
             for f in TENSOR_FIELDS}
    batch.update({f: [chunk[f][index] for chunk, index in refs] for f in LIST_FIELDS})
    batch["image"] = normalize(batch["image"])  # (B, 3, H, W) float32
    return batch


def crop_rng(seed: int, epoch: int, rank: int, worker, position: int) -> random.Random:
    """The augmentation generator of one sample (a string seed is hashed with SHA-512: stable everywhere)."""
    return random.Random(f"nlip-crop/{seed}/{epoch}/{rank}/{worker}/{position}")
