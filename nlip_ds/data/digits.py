"""Real labelled images as noisy image-caption pairs: scikit-learn's handwritten digits (1,797 scans of 8x8
pixels, 10 classes, shipped inside scikit-learn, so nothing is downloaded).

Each image gets a caption from varied templates that name its digit ("a handwritten seven", "the number 7
written by hand"). The training split then receives noise by the noisy-correspondence protocol used since NCR
(Huang et al., NeurIPS 2021):

- shuffle: a fraction r of the training pairs, drawn at random, has its captions permuted among themselves;
  a pair is noisy ("incorrect") when its caption index changed, so the clean mask is "index unchanged";
- incomplete: a fraction r of the training captions is replaced by a non-descriptive web-style string
  ("IMG_0042.jpg", "my photo"), the caption noise that NLIP's noise-completion targets.

Val and test stay clean. The split is stratified and fixed by the seed, so every noise level of one seed shares
the same train/val/test images. The layout is that of `nlip-ds data synth`: OUT/{train,val,test}/ shards with
png/txt/json/cls members, classes.txt, concepts.txt and dataset.json.
"""
from __future__ import annotations

import io
import re
import json
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from nlip_ds.data.shards import ShardWriter, json_bytes, prepare_split_dir, sample_key
from nlip_ds.data.synthetic import DATASET_FILE, web_string

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten {name}", "a photo of a handwritten {name}", "the digit {name}",
             "the number {digit} written by hand", "a scan of the digit {name}", "a {name} written in ink",
             "handwriting of the number {name}", "a picture of a {name}", "{name}, the digit {digit}",
             "an image of a handwritten digit {name}")
NOISE_KINDS = ("shuffle", "incomplete")
SPLITS = {"test": 400, "val": 200}  # the rest (1,197) is train


def caption(label: int, rng: random.Random) -> str:
    text = rng.choice(TEMPLATES).format(name=NAMES[label], digit=label)
    return re.sub(r"\ba (eight)\b", r"an \1", text)


def _load(image_size: int) -> tuple[list[Image.Image], np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits dataset ships with scikit-learn: pip install scikit-learn "
                          "(or nlip-ds[eval])") from exc
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), ink bright on black
    images = [Image.fromarray(p, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
              for p in pixels]
    return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, seed: int) -> dict[str, list[int]]:
    """Stratified: each split holds every class in proportion; fixed by `seed` alone."""
    rng = random.Random(f"digits-split-{seed}")
    by_class = [[i for i in range(len(labels)) if labels[i] == c] for c in range(len(NAMES))]
    for members in by_class:
        rng.shuffle(members)
    out: dict[str, list[int]] = {name: [] for name in ("train", "val", "test")}
    total = len(labels)
    for members in by_class:
        start = 0
        for name, size in SPLITS.items():
            take = round(size * len(members) / total)
            out[name] += members[start:start + take]
            start += take
        out["train"] += members[start:]
    for name in out:
        rng.shuffle(out[name])
    return out


def noisy_captions(captions: list[str], rate: float, kind: str, seed: int) -> tuple[list[str], list[str]]:
    """(captions, noise types) of the training split at noise `rate` of `kind`."""
    rng = random.Random(f"digits-noise-{kind}-{seed}")
    chosen = sorted(rng.sample(range(len(captions)), round(rate * len(captions))))
    result, types = list(captions), ["clean"] * len(captions)
    if kind == "shuffle":
        permuted = list(chosen)
        rng.shuffle(permuted)
        for i, j in zip(chosen, permuted):
            result[i] = captions[j]
            types[i] = "clean" if i == j else "incorrect"
    else:
        for i in chosen:
            result[i], types[i] = web_string(rng), "incomplete"
    return result, types


def build(out_dir, *, noise_rate: float = 0.0, noise_kind: str = "shuffle", seed: int = 0, image_size: int = 32,
          shard_size: int = 500, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Write the dataset into `out_dir` (replacing the shards of an earlier one); returns dataset.json's summary."""
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must lie in [0, 1], got {noise_rate}")
    if noise_kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind must be one of {', '.join(NOISE_KINDS)}, got {noise_kind!r}")
    if not 8 <= image_size <= 512:
        raise ValueError(f"image_size must lie in [8, 512] pixels, got {image_size}")
    images, labels = _load(image_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits, first_id = {}, 0
    for name, members in split_indices(labels, seed).items():
        rng = random.Random(f"digits-captions-{seed}-{name}")
        clean = [caption(int(labels[i]), rng) for i in members]
        if name == "train":
            text, types = noisy_captions(clean, noise_rate, noise_kind, seed)
        else:
            text, types = clean, ["clean"] * len(clean)
        split_dir = prepare_split_dir(out_dir, name, overwrite=True)
        with ShardWriter(split_dir, name, shard_size) as writer:
            for k, i in enumerate(members):
                buf = io.BytesIO()
                images[i].save(buf, format="PNG")
                meta = {"sample_id": first_id + k, "clean_caption": clean[k], "objects": [NAMES[labels[i]]],
                        "label": int(labels[i]), "noise_type": types[k], "source_index": i}
                writer.write(sample_key(first_id + k), {"png": buf.getvalue(), "txt": text[k].encode("utf-8"),
                                                        "json": json_bytes(meta), "cls": str(labels[i]).encode()})
                if progress:
                    progress(1)
        splits[name] = {"num_samples": len(members), "first_id": first_id,
                        "noise_types": {t: types.count(t) for t in ("clean", "incorrect", "incomplete")}}
        first_id += len(members)
    summary = {"source": "sklearn.datasets.load_digits",
               "params": {"noise_rate": noise_rate, "noise_kind": noise_kind, "seed": seed, "image_size": image_size},
               "splits": splits, "classes": list(NAMES), "concepts": list(NAMES)}
    (out_dir / "classes.txt").write_text("".join(f"{n}\n" for n in NAMES))
    (out_dir / "concepts.txt").write_text("".join(f"{n}\n" for n in NAMES))
    (out_dir / DATASET_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
