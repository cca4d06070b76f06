"""Synthetic noisy image-text pairs whose noise is known.

Real web data cannot be downloaded here, and a noise-robust trainer can only be checked on data whose noise
is known. Each image is a procedurally drawn scene of 1-3 coloured shapes on a varied dark background; its clean
caption names every object with its colour, optionally its size, and spatial relations ("a red circle above a
small blue square"). The training split then receives the two kinds of noise NLIP targets, at exact rates:

- incorrect: the caption is the clean caption of another image (with a different class);
- incomplete: the caption omits objects, or is a non-descriptive web-style string ("IMG_0042.jpg", "my photo").

Every random choice of sample i comes from its own generator seeded by (seed, split, i, purpose), so a sample
does not depend on how many others are drawn, and the same seed gives the same bytes. The class label (for
zero-shot evaluation) is the shape of the largest object, which is always unique. Objects cover a third to
two thirds of the image side in distinct saturated colours on dark backgrounds, so a tiny ViT at 32 px can
learn them.
"""
from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from nlip_ds.data.shards import ShardWriter, json_bytes, prepare_split_dir, sample_key, shard_name

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 225, 50), "green": (50, 190, 60),
    "cyan": (40, 210, 220), "blue": (50, 90, 235), "purple": (160, 70, 210), "white": (240, 240, 240),
}
SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little")}
NOISE_CODES = {"clean": 0, "incorrect": 1, "incomplete": 2}
SPLITS = ("train", "val", "test")
DEFAULT_SHARD_SIZE = 500  # 4000 samples (the tiny demo) give 8 train shards: 2 ranks x up to 4 workers
DATASET_FILE = "dataset.json"

PREFIXES = ("", "a photo of ", "a picture of ", "an image of ", "there is ")
WEB_STRINGS = ("IMG_{n4}.jpg", "DSC{n5}.JPG", "image ({n}).png", "photo_{date}.png", "Screenshot {date}",
               "my photo", "my holiday", "untitled", "check this out", "new post", "best day ever",
               "download.jpg", "wallpaper", "pic of the day", "look at this!", "{n4}.png")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: int  # side of the bounding box, pixels
    x: float  # centre, pixels
    y: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # objects[0] is the largest: it defines the class
    background: tuple[tuple[int, int, int], tuple[int, int, int], int, float]  # colour a, colour b, axis, noise

    @property
    def label(self) -> int:
        return SHAPES.index(self.objects[0].shape)

    def size_word(self, obj: Obj, image_size: int) -> str:
        return "large" if obj.size >= 0.42 * image_size else "small"


def _rng(seed: int, split: str, index: int, purpose: str) -> random.Random:
    """Independent generator per (sample, purpose); a string seed is hashed with SHA-512, stable everywhere."""
    return random.Random(f"nlip-synth/{seed}/{split}/{index}/{purpose}")


# ------------------------------------------------------------------------------------------------ scenes


def make_scene(rng: random.Random, image_size: int) -> Scene:
    count = rng.choices((1, 2, 3), weights=(0.4, 0.35, 0.25))[0]
    large = count > 1 or rng.random() < 0.75
    sizes = [_object_size(rng, image_size, large)] + [_object_size(rng, image_size, False) for _ in
                                                      range(count - 1)]
    objects: list[Obj] = []
    for size in sizes:
        placed = _place(rng, image_size, size, objects)
        if placed is not None:
            objects.append(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), size, *placed))
    return Scene(tuple(objects), _background(rng))


def _object_size(rng: random.Random, image_size: int, large: bool) -> int:
    lo, hi = (0.44, 0.62) if large else (0.25, 0.34)
    return max(3, round(image_size * rng.uniform(lo, hi)))


def _place(rng: random.Random, image_size: int, size: int, others: list[Obj]) -> Optional[tuple[float, float]]:
    """A centre keeping the object inside the image and 1 px clear of the others; None if none found."""
    lo, hi = size / 2 + 1, image_size - size / 2 - 1
    for _ in range(100):
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if all(abs(x - o.x) >= (size + o.size) / 2 + 1 or abs(y - o.y) >= (size + o.size) / 2 + 1
               for o in others):
            return x, y
    return None


def _background(rng: random.Random):
    a = tuple(rng.randint(0, 70) for _ in range(3))
    b = tuple(min(110, c + rng.randint(-30, 40)) if c else rng.randint(0, 40) for c in a)
    return a, tuple(max(0, c) for c in b), rng.randrange(3), rng.uniform(0.0, 8.0)


# ------------------------------------------------------------------------------------------------ drawing


def render(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """RGB image: the background, then the shapes drawn 4x larger and box-filtered down (anti-aliased)."""
    factor = max(1, min(4, 256 // image_size))
    layer = Image.new("RGBA", (image_size * factor,) * 2, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for obj in scene.objects:
        color = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLORS[obj.color]) + (255,)
        _DRAW[obj.shape](draw, obj.x * factor, obj.y * factor, obj.size * factor / 2, color)
    layer = layer.resize((image_size, image_size), Image.Resampling.BOX)
    background = _background_pixels(scene.background, image_size, rng)
    return Image.alpha_composite(background, layer).convert("RGB")


def _background_pixels(spec, image_size: int, rng: random.Random) -> Image.Image:
    a, b, axis, noise = spec
    t = np.linspace(0.0, 1.0, image_size)
    ramp = [t[None, :], t[:, None], (t[None, :] + t[:, None]) / 2][axis]  # (1, S), (S, 1) or (S, S)
    ramp = np.broadcast_to(ramp, (image_size, image_size))[..., None]  # (S, S, 1)
    pixels = np.asarray(a, float) * (1 - ramp) + np.asarray(b, float) * ramp  # (S, S, 3)
    pixels += np.random.default_rng(rng.getrandbits(64)).normal(0.0, noise, pixels.shape)
    rgba = np.concatenate([np.clip(pixels, 0, 255), np.full((image_size, image_size, 1), 255.0)], axis=2)
    return Image.fromarray(rgba.round().astype(np.uint8), "RGBA")


def _regular(cx, cy, r, n, start=-90.0, inner=None):
    """Vertices of a regular polygon (or a star when `inner` radius is given)."""
    points, steps = [], n * (2 if inner else 1)
    for k in range(steps):
        radius = inner if inner and k % 2 else r
        angle = np.deg2rad(start + 360.0 * k / steps)
        points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
    return points


def _heart(draw, cx, cy, r, color):
    lobe = r / 2
    for dx in (-lobe, lobe):
        draw.ellipse([cx + dx - lobe, cy - r / 2 - lobe / 2, cx + dx + lobe, cy - r / 2 + lobe * 1.5], fill=color)
    draw.polygon([(cx - r, cy - r / 8), (cx + r, cy - r / 8), (cx, cy + r)], fill=color)


def _cross(draw, cx, cy, r, color):
    arm = 0.36 * r
    draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=color)
    draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=color)


_DRAW: dict[str, Callable] = {
    "circle": lambda d, cx, cy, r, c: d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c),
    "square": lambda d, cx, cy, r, c: d.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r],
                                                  fill=c),
    "triangle": lambda d, cx, cy, r, c: d.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)],
                                                  fill=c),
    "diamond": lambda d, cx, cy, r, c: d.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r),
                                                  (cx - 0.75 * r, cy)], fill=c),
    "star": lambda d, cx, cy, r, c: d.polygon(_regular(cx, cy, r, 5, inner=0.45 * r), fill=c),
    "cross": _cross,
    "ring": lambda d, cx, cy, r, c: d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=c,
                                              width=max(1, round(0.38 * r))),
    "heart": _heart,
}


# ------------------------------------------------------------------------------------------------ captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _phrase(obj: Obj, scene: Scene, image_size: int, rng: random.Random) -> str:
    words = [obj.color, obj.shape]
    if rng.random() < 0.5:
        words.insert(0, rng.choice(SIZE_WORDS[scene.size_word(obj, image_size)]))
    return _article(" ".join(words))


def relation(a: Obj, b: Obj) -> str:
    """Where `a` lies relative to `b`, along the axis of the larger offset (image y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def describe(objects: tuple[Obj, ...], scene: Scene, image_size: int, rng: random.Random) -> str:
    """A caption naming every object in `objects`, in one of several phrasings."""
    p = [_phrase(o, scene, image_size, rng) for o in objects]
    prefix = rng.choice(PREFIXES)
    if len(objects) == 1:
        return rng.choice([prefix + p[0], f"{p[0]} on a dark background", f"{p[0]} in the picture"])
    a, b = objects[0], objects[1]
    if len(objects) == 2:
        return rng.choice([f"{p[0]} {relation(a, b)} {p[1]}", f"{p[1]} {relation(b, a)} {p[0]}",
                           f"{prefix}{p[0]} and {p[1]}", f"{p[0]} with {p[1]} {relation(b, a)} it"])
    c = objects[2]
    return rng.choice([f"{p[0]} {relation(a, b)} {p[1]}, and {p[2]} {relation(c, a)} the {a.shape}",
                       f"{prefix}{p[0]}, {p[1]} and {p[2]}",
                       f"{p[0]} with {p[1]} {relation(b, a)} it and {p[2]} {relation(c, a)} it"])


def web_string(rng: random.Random) -> str:
    """A non-descriptive caption of the kind web crawls are full of."""
    date = f"{rng.randint(2009, 2023)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    return rng.choice(WEB_STRINGS).format(n4=f"{rng.randrange(10000):04d}", n5=f"{rng.randrange(100000):05d}",
                                          n=rng.randint(1, 30), date=date)


# ------------------------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class SplitSpec:
    name: str
    num_samples: int
    first_id: int
    incorrect_rate: float
    incomplete_rate: float
    seed: int
    image_size: int


def clean_sample(spec: SplitSpec, index: int) -> tuple[Scene, str]:
    scene = make_scene(_rng(spec.seed, spec.name, index, "scene"), spec.image_size)
    return scene, describe(scene.objects, scene, spec.image_size, _rng(spec.seed, spec.name, index, "caption"))


def noise_types(spec: SplitSpec) -> list[str]:
    """Noise type per index: exactly round(rate * n) incorrect and incomplete samples (incomplete capped by
    what is left when the rates add up to 1), at seeded positions."""
    n = spec.num_samples
    n_incorrect = round(spec.incorrect_rate * n)
    n_incomplete = min(round(spec.incomplete_rate * n), n - n_incorrect)
    order = list(range(n))
    random.Random(f"nlip-synth/{spec.seed}/{spec.name}/noise").shuffle(order)
    types = ["clean"] * n
    for rank, index in enumerate(order[:n_incorrect + n_incomplete]):
        types[index] = "incorrect" if rank < n_incorrect else "incomplete"
    return types


def noisy_caption(spec: SplitSpec, index: int, scene: Scene, noise_type: str) -> str:
    rng = _rng(spec.seed, spec.name, index, "noise")
    if noise_type == "incorrect":
        return _other_caption(spec, index, scene, rng)
    if len(scene.objects) > 1 and rng.random() < 0.5:
        kept = rng.sample(range(len(scene.objects)), rng.randint(1, len(scene.objects) - 1))
        return describe(tuple(scene.objects[i] for i in sorted(kept)), scene, spec.image_size, rng)
    return web_string(rng)


def _other_caption(spec: SplitSpec, index: int, scene: Scene, rng: random.Random) -> str:
    """The clean caption of another sample, preferably of another class."""
    if spec.num_samples < 2:
        return web_string(rng)
    for _ in range(20):
        other = rng.randrange(spec.num_samples - 1)
        other += other >= index
        other_scene, caption = clean_sample(spec, other)
        if other_scene.label != scene.label:
            break
    return caption


def make_sample(spec: SplitSpec, index: int, noise_type: str) -> dict[str, bytes]:
    """The tar members of one sample: png, txt (training caption), json (ground truth), cls."""
    scene, clean = clean_sample(spec, index)
    caption = clean if noise_type == "clean" else noisy_caption(spec, index, scene, noise_type)
    buf = io.BytesIO()
    render(scene, spec.image_size, _rng(spec.seed, spec.name, index, "pixels")).save(buf, format="PNG")
    meta = {"sample_id": spec.first_id + index, "clean_caption": clean, "objects": [o.name for o in scene.objects],
            "label": scene.label, "noise_type": noise_type}
    return {"png": buf.getvalue(), "txt": caption.encode("utf-8"), "json": json_bytes(meta),
            "cls": str(scene.label).encode()}


def write_split(spec: SplitSpec, out_dir: Path, shard_size: int, overwrite: bool,
                progress: Optional[Callable[[int], None]] = None) -> dict:
    types = noise_types(spec)
    split_dir = prepare_split_dir(out_dir, spec.name, overwrite)
    with ShardWriter(split_dir, spec.name, shard_size) as writer:
        for index, noise_type in enumerate(types):
            writer.write(sample_key(spec.first_id + index), make_sample(spec, index, noise_type))
            if progress:
                progress(1)
    counts = {t: types.count(t) for t in NOISE_CODES}
    return {"num_samples": spec.num_samples, "num_shards": len(writer.shards), "first_id": spec.first_id,
            "noise_types": counts, "pattern": f"{spec.name}/{_brace(spec.name, len(writer.shards))}"}


def _brace(prefix: str, count: int) -> str:
    if count == 1:
        return shard_name(prefix, 0)
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar"


# ------------------------------------------------------------------------------------------------ entry point


def _split_specs(num_samples, val_samples, test_samples, incorrect_rate, incomplete_rate, seed, image_size):
    sizes = {"train": num_samples,
             "val": round(0.2 * num_samples) if val_samples is None else val_samples,
             "test": round(0.2 * num_samples) if test_samples is None else test_samples}
    specs, first = [], 0
    for name in SPLITS:
        noisy = name == "train"
        specs.append(SplitSpec(name, sizes[name], first, incorrect_rate if noisy else 0.0,
                               incomplete_rate if noisy else 0.0, seed, image_size))
        first += sizes[name]
    return [s for s in specs if s.num_samples > 0]


def _check_args(num_samples, incorrect_rate, incomplete_rate, image_size, shard_size) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    for name, rate in (("incorrect_rate", incorrect_rate), ("incomplete_rate", incomplete_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {rate}")
    if incorrect_rate + incomplete_rate > 1.0:
        raise ValueError(f"incorrect_rate + incomplete_rate = {incorrect_rate + incomplete_rate} exceeds 1")
    if not 16 <= image_size <= 1024:
        raise ValueError(f"image_size must lie in [16, 1024] pixels, got {image_size}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")


def synthesize(out_dir, num_samples: int, *, incorrect_rate: float = 0.3, incomplete_rate: float = 0.2,
               seed: int = 0, image_size: int = 32, val_samples: Optional[int] = None,
               test_samples: Optional[int] = None, shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
               progress: Optional[Callable[[int], None]] = None) -> dict:
    """Write a synthetic dataset: `<out_dir>/{train,val,test}/` shards, classes.txt, concepts.txt and
    dataset.json (this summary with patterns relative to out_dir).

    Train is noisy at the given rates; val and test (20% of train each by default) are clean. Ids run on
    across splits (train from 0, then val, then test). A folder already holding the same dataset (same
    parameters, all shards present) is left as it is; a different one is refused unless `overwrite`.
    """
    _check_args(num_samples, incorrect_rate, incomplete_rate, image_size, shard_size)
    out_dir = Path(out_dir)
    specs = _split_specs(num_samples, val_samples, test_samples, incorrect_rate, incomplete_rate, seed, image_size)
    params = {"num_samples": num_samples, "incorrect_rate": incorrect_rate, "incomplete_rate": incomplete_rate,
              "seed": seed, "image_size": image_size, "shard_size": shard_size,
              "splits": {s.name: s.num_samples for s in specs}}
    existing = _existing(out_dir, params)
    if existing is not None:
        logger.info("%s already holds this dataset; nothing to do", out_dir)
        return _with_paths(existing, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {s.name: write_split(s, out_dir, shard_size, overwrite, progress) for s in specs}
    summary = {"params": params, "splits": splits, "classes": list(SHAPES),
               "concepts": list(SHAPES) + list(COLORS)}
    _write_text(out_dir / "classes.txt", SHAPES)
    _write_text(out_dir / "concepts.txt", summary["concepts"])
    (out_dir / DATASET_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return _with_paths(summary, out_dir)


def _write_text(path: Path, lines) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def _existing(out_dir: Path, params: dict) -> Optional[dict]:
    try:
        summary = json.loads((out_dir / DATASET_FILE).read_text())
    except (OSError, ValueError):
        return None
    if summary.get("params") != params:
        return None
    complete = all((out_dir / name / shard_name(name, i)).is_file()
                   for name, s in summary["splits"].items() for i in range(s["num_shards"]))
    return summary if complete else None


def _with_paths(summary: dict, out_dir: Path) -> dict:
    """The summary with `out_dir` and each split's shard pattern as usable paths (for data.train etc.)."""
    result = json.loads(json.dumps(summary))
    result["out_dir"] = str(out_dir)
    for split in result["splits"].values():
        split["pattern"] = str(out_dir / split["pattern"])
    return result
