"""What one raw tar sample becomes on its way into a batch: decode, image transform, tokenize, collate.

These are the per-sample stages of the loader (pipeline.py wires them together). They are kept free of any
loader state so that each can be tested alone. A sample that cannot be used raises `SampleError` with a reason
name; the loader's skip-and-count stage counts it and moves on.

Augmentation randomness comes from a generator seeded by (seed, epoch, rank, position of the sample in its
worker's stream), never from the global RNG: the same seed, epoch and rank give the same batches in any number
of processes, and a resumed run crops the remaining samples exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
NOISE_CODES = {"clean": 0, "incorrect": 1, "incomplete": 2}
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalization, the convention of the field
STD = (0.26862954, 0.26130258, 0.27577711)
STACKED_FIELDS = ("image", "input_ids", "attention_mask")
SCALAR_FIELDS = {"sample_id": torch.long, "label": torch.long, "noise_type": torch.long, "pad": torch.bool}
LIST_FIELDS = ("caption", "objects")


class SampleError(Exception):
    """A sample that is skipped; `reason` is the name it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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


def normalize(img: Image.Image) -> torch.Tensor:
    x = TF.pil_to_tensor(img).float().div_(255.0)  # (3, H, W)
    return TF.normalize(x, MEAN, STD, inplace=True)


def train_transform(img: Image.Image, size: int, scale_min: float, rng: random.Random) -> torch.Tensor:
    top, left, h, w = crop_params(img.width, img.height, (scale_min, 1.0), rng)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return normalize(img)


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to `size`, then crop the centre square."""
    if img.size != (size, size):
        img = TF.center_crop(TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC), [size, size])
    return normalize(img)


# ------------------------------------------------------------------------------------------------ collate


def collate(samples: list[dict]) -> dict:
    """Stack per-sample records into a batch: tensors (B, ...) and lists of length B. Scalar fields may be
    Python numbers (fresh samples) or 0-d tensors (samples taken out of a chunk)."""
    batch = {f: torch.stack([s[f] for s in samples]) for f in STACKED_FIELDS}
    for f, dtype in SCALAR_FIELDS.items():
        batch[f] = torch.tensor([int(s[f]) for s in samples], dtype=dtype)  # (B,)
    batch.update({f: [s[f] for s in samples] for f in LIST_FIELDS})
    return batch


def take(chunk: dict, index: int) -> dict:
    """Sample `index` of a collated chunk, as a per-sample record (tensor fields are views)."""
    return {f: chunk[f][index] for f in (*STACKED_FIELDS, *SCALAR_FIELDS, *LIST_FIELDS)}


def crop_rng(seed: int, epoch: int, rank: int, worker, position: int) -> random.Random:
    """The augmentation generator of one sample (a string seed is hashed with SHA-512: stable everywhere)."""
    return random.Random(f"nlip-crop/{seed}/{epoch}/{rank}/{worker}/{position}")
