"""`nlip-ds eval` tasks on a plain NLIPModel: zeroshot, retrieval, caption, plus the optional linear probe.

evaluate() returns the same results dict on every rank (the features are gathered before any metric):
{"task", "data", "num_images", "metrics": {name: float}, "skipped": [{"file", "reason"}], ...task details}.
Only the caller decides which rank prints and writes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from nlip_ds.eval.captioning import score_captions
from nlip_ds.eval.data import for_rank, open_records
from nlip_ds.eval.embed import Embedded, GenerateOptions, embed_records, gather_embedded
from nlip_ds.eval.linear_probe import linear_probe
from nlip_ds.eval.retrieval import multi_caption_retrieval
from nlip_ds.eval.zeroshot import (CLIP_TEMPLATES, class_embeddings, load_class_names, load_templates,
                                   per_class_accuracy, zeroshot_accuracy)
from nlip_ds.optional import require

logger = logging.getLogger(__name__)

TASKS = ("zeroshot", "retrieval", "caption")
CLASS_FILE = "classes.txt"


@dataclass
class EvalOptions:
    task: str
    data: str  # shards (folder, .tar, brace pattern), an ImageFolder tree, or a Karpathy-style .json
    image_root: Optional[str] = None  # images of a .json (default: the JSON's folder)
    split: Optional[str] = "test"  # the .json split to evaluate
    classes: Optional[str] = None
    templates: Optional[str] = None
    batch_size: int = 64
    max_samples: Optional[int] = None
    linear_probe: bool = False
    train_data: Optional[str] = None  # the probe's training images (same formats as `data`)
    probe_c: float = 1.0
    generate: GenerateOptions = field(default_factory=GenerateOptions)


@dataclass(frozen=True)
class Runtime:
    device: object = "cpu"
    rank: int = 0
    world_size: int = 1


def evaluate(model, tokenizer, opts: EvalOptions, rt: Runtime = Runtime()) -> dict:
    if opts.task not in TASKS:
        raise ValueError(f"unknown task {opts.task!r}; choose from {', '.join(TASKS)}")
    if opts.linear_probe and not opts.train_data:
        raise ValueError("--linear-probe needs --train-data (labelled training images)")
    if opts.task == "caption":
        require("pycocoevalcap", "caption scoring (--task caption)")
    if opts.linear_probe:
        require("sklearn", "the linear probe (--linear-probe)")
    names = resolve_class_names(opts) if opts.task == "zeroshot" or opts.linear_probe else None
    emb = _embed(model, tokenizer, opts, opts.data, names, rt, task_inputs=True)
    results = {"task": opts.task, "data": opts.data, "num_images": int(emb.image.shape[0]), "metrics": {}}
    if opts.task == "zeroshot":
        results.update(run_zeroshot(model, tokenizer, emb, names, opts, rt.device))
    elif opts.task == "retrieval":
        results["num_captions"] = int(emb.text.shape[0])
        results["metrics"] = multi_caption_retrieval(emb.image, emb.text, emb.text_image)
    else:
        results.update(run_caption(emb))
    if opts.linear_probe:
        train = _embed(model, tokenizer, opts, opts.train_data, names, rt, task_inputs=False)
        results["metrics"].update(linear_probe(train.image, train.label, emb.image, emb.label, opts.probe_c))
        emb.problems += train.problems
    results["skipped"] = [{"file": w, "reason": r} for w, r in emb.problems]
    return results


def _embed(model, tokenizer, opts: EvalOptions, data: str, names, rt: Runtime, task_inputs: bool) -> Embedded:
    """Embed `data` on every rank and gather; `task_inputs` adds what the task needs beyond image features
    (captions for retrieval and caption, generation for caption), which the probe's training set does not."""
    records = open_records(data, image_root=opts.image_root, split=opts.split, class_names=names)
    task = opts.task if task_inputs else None
    local = embed_records(model, tokenizer, for_rank(records, rt.rank, rt.world_size, opts.max_samples),
                          batch_size=opts.batch_size, device=rt.device,
                          need_captions=task in ("retrieval", "caption"), embed_captions=task == "retrieval",
                          generate=opts.generate if task == "caption" else None)
    emb = gather_embedded(local)
    if emb.image.shape[0] == 0:
        raise ValueError(f"{data}: no usable images ({len(emb.problems)} skipped, see the warnings above)")
    logger.info("embedded %d images of %s (%d skipped)", emb.image.shape[0], data, len(emb.problems))
    return emb


def resolve_class_names(opts: EvalOptions) -> Optional[list[str]]:
    """--classes, else classes.txt in the data folder or the folder above it (the layout `nlip-ds data
    synth` writes), else None for an ImageFolder tree (its folder names)."""
    if opts.classes:
        return load_class_names(opts.classes)
    if opts.data.endswith(".json"):
        raise ValueError(f"{opts.data}: a caption JSON has no class labels; zero-shot needs shards with a "
                         f"`cls` field or an ImageFolder tree, and --classes")
    first = Path(opts.data.split("::")[0])
    folder = first if first.is_dir() else first.parent
    candidates = [folder / CLASS_FILE, folder.parent / CLASS_FILE]
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None:
        return load_class_names(found)
    if first.is_dir() and not any(first.glob("*.tar")):
        return None  # an ImageFolder tree: its sorted folder names
    raise FileNotFoundError(f"no class-name file: give --classes FILE (looked for {candidates[0]} and "
                            f"{candidates[1]})")


def _labelled(emb: Embedded, num_classes: int, opts: EvalOptions) -> torch.Tensor:
    """(N,) mask of images with a usable label; unlabelled ones are reported as skipped."""
    if (emb.label >= num_classes).any():
        bad = emb.where[int((emb.label >= num_classes).nonzero()[0])]
        raise ValueError(f"{bad}: label {int(emb.label.max())} but the class list has only {num_classes} names "
                         f"({opts.classes or 'classes.txt'})")
    keep = emb.label >= 0
    emb.problems += [(w, "no class label") for w, k in zip(emb.where, keep.tolist()) if not k]
    if not keep.any():
        raise ValueError(f"{opts.data}: no image has a class label (a `cls` member or \"label\" in the shard "
                         f"JSON, or an ImageFolder class folder)")
    return keep


def run_zeroshot(model, tokenizer, emb: Embedded, names, opts: EvalOptions, device) -> dict:
    names = names or sorted(p.name for p in Path(opts.data).iterdir() if p.is_dir())
    templates = load_templates(opts.templates) if opts.templates else list(CLIP_TEMPLATES)
    keep = _labelled(emb, len(names), opts)
    classes = class_embeddings(model, tokenizer, names, templates, model.config.text.context_length, device)
    image, label = emb.image[keep], emb.label[keep]
    metrics = zeroshot_accuracy(image, classes, label)
    per_class = per_class_accuracy(image, classes, label, names)
    metrics["zeroshot_mean_per_class_top1"] = sum(c["top1"] for c in per_class.values()) / len(per_class)
    return {"metrics": metrics, "per_class": per_class, "num_classes": len(names), "templates": templates}


def run_caption(emb: Embedded) -> dict:
    metrics, notes = score_captions(emb.captions, emb.generated)
    captions = [{"file": w, "generated": g, "references": r}
                for w, g, r in zip(emb.where, emb.generated, emb.captions)]
    return {"metrics": metrics, "notes": notes, "captions": captions}
