"""The one evaluator: `EvalOptions` (from a run's config or from `nlip-ds eval`'s arguments), the task table,
and evaluate(), which the end of training and `nlip-ds eval` both call on a plain NLIPModel.

evaluate() returns the same results dict on every rank (the features are gathered before any metric):
{"tasks", "data", "num_images", "metrics": {name: float}, "skipped": [{"file", "reason"}], ...task details}.
Only the caller decides which rank prints and writes. docs/eval.md describes every task and metric.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from nlip_ds.choices import EVAL_TASKS
from nlip_ds.config import Config, EvalConfig
from nlip_ds.eval.captioning import score_captions
from nlip_ds.eval.data import for_rank, open_records
from nlip_ds.eval.embed import Embedded, embed_records, gather_embedded
from nlip_ds.eval.linear_probe import linear_probe
from nlip_ds.eval.retrieval import multi_caption_retrieval
from nlip_ds.eval.zeroshot import (CLIP_TEMPLATES, class_embeddings, load_class_names, per_class_accuracy,
                                   zeroshot_accuracy)
from nlip_ds.model.generation import GenerationOptions
from nlip_ds.optional import require

logger = logging.getLogger(__name__)

CLASS_FILE = "classes.txt"


def eval_generation(e: EvalConfig) -> GenerationOptions:
    """The caption task's decoding from the eval section (greedy by default: the same captions on any number
    of processes)."""
    return GenerationOptions(e.strategy, e.max_tokens, e.min_tokens, num_beams=e.num_beams)


@dataclass
class EvalOptions:
    tasks: tuple  # names of EVAL_TASKS, run in this order on one embedding pass of `data`
    data: str  # shards (folder, .tar, brace pattern), an ImageFolder tree, or a Karpathy-style .json
    image_root: Optional[str] = None  # images of a .json (default: the JSON's folder)
    split: Optional[str] = "test"  # the .json split to evaluate
    classes: Optional[str] = None  # class-name file (default: classes.txt beside the data)
    templates: Optional[list[str]] = None  # zero-shot prompts (default: CLIP's ensemble)
    batch_size: int = 64
    max_samples: Optional[int] = None
    probe_data: Optional[str] = None  # the linear probe's labelled training images (same formats as `data`)
    probe_c: float = 1.0
    generation: GenerationOptions = field(default_factory=lambda: eval_generation(EvalConfig()))

    @classmethod
    def from_config(cls, cfg: Config) -> "EvalOptions":
        """The end-of-training evaluation: eval.* on data.test, the probe trained on eval.probe_data or
        data.val. config.py has refused whatever cannot run."""
        e = cfg.eval
        return cls(tuple(e.tasks), cfg.data.test, classes=e.classes, templates=list(e.templates),
                   batch_size=e.batch_size, max_samples=e.max_samples, probe_data=e.probe_data or cfg.data.val,
                   probe_c=e.probe_c, generation=eval_generation(e))


@dataclass(frozen=True)
class Runtime:
    device: object = "cpu"
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class Task:
    """What a task needs from the embedding pass over the evaluation data, and the function that scores it:
    run(model, tokenizer, emb, class_names, opts, rt) -> {"metrics": {...}, ...details}."""
    run: Callable
    class_names: bool = False  # labels from a class list (zero-shot prompts, the probe's ImageFolder labels)
    captions: bool = False  # records need reference captions
    embed_captions: bool = False
    generate: bool = False


def evaluate(model, tokenizer, opts: EvalOptions, rt: Runtime = Runtime()) -> dict:
    check_options(opts)
    tasks = [TASKS[name] for name in opts.tasks]
    names = resolve_class_names(opts) if any(t.class_names for t in tasks) else None
    emb = _embed(model, tokenizer, opts, opts.data, names, rt, tasks)
    results = {"tasks": list(opts.tasks), "data": opts.data, "num_images": int(emb.image.shape[0]), "metrics": {}}
    for task in tasks:
        details = task.run(model, tokenizer, emb, names, opts, rt)
        results["metrics"].update(details.pop("metrics"))
        results.update(details)
    results["skipped"] = [{"file": w, "reason": r} for w, r in emb.problems]
    return results


def check_options(opts: EvalOptions) -> None:
    unknown = [t for t in opts.tasks if t not in TASKS]
    if unknown or not opts.tasks:
        raise ValueError(f"unknown task {unknown[0] if unknown else None!r}; choose from {', '.join(TASKS)}")
    if "linear_probe" in opts.tasks and not opts.probe_data:
        raise ValueError("linear_probe needs labelled training images (--train-data, or eval.probe_data)")
    if "caption" in opts.tasks:
        require("pycocoevalcap", "caption scoring (the caption task)")
    if "linear_probe" in opts.tasks:
        require("sklearn", "the linear probe (the linear_probe task)")


def _embed(model, tokenizer, opts: EvalOptions, data: str, names, rt: Runtime, tasks: list[Task]) -> Embedded:
    """Embed `data` on every rank and gather, with what `tasks` need beyond image features (captions,
    caption embeddings, generated captions)."""
    records = open_records(data, image_root=opts.image_root, split=opts.split, class_names=names)
    generate = any(t.generate for t in tasks)
    local = embed_records(model, tokenizer, for_rank(records, rt.rank, rt.world_size, opts.max_samples),
                          batch_size=opts.batch_size, device=rt.device,
                          need_captions=any(t.captions for t in tasks),
                          embed_captions=any(t.embed_captions for t in tasks),
                          generate=opts.generation if generate else None)
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


# ------------------------------------------------------------------------------------------------ tasks


def run_zeroshot(model, tokenizer, emb: Embedded, names, opts: EvalOptions, rt: Runtime) -> dict:
    names = names or sorted(p.name for p in Path(opts.data).iterdir() if p.is_dir())
    templates = list(opts.templates or CLIP_TEMPLATES)
    keep = _labelled(emb, len(names), opts)
    classes = class_embeddings(model, tokenizer, names, templates, model.config.text.context_length, rt.device)
    image, label = emb.image[keep], emb.label[keep]
    metrics = zeroshot_accuracy(image, classes, label)
    per_class = per_class_accuracy(image, classes, label, names)
    metrics["zeroshot_mean_per_class_top1"] = sum(c["top1"] for c in per_class.values()) / len(per_class)
    return {"metrics": metrics, "per_class": per_class, "num_classes": len(names), "templates": templates}


def run_retrieval(model, tokenizer, emb: Embedded, names, opts: EvalOptions, rt: Runtime) -> dict:
    return {"metrics": multi_caption_retrieval(emb.image, emb.text, emb.text_image),
            "num_captions": int(emb.text.shape[0])}


def run_caption(model, tokenizer, emb: Embedded, names, opts: EvalOptions, rt: Runtime) -> dict:
    metrics, notes = score_captions(emb.captions, emb.generated)
    captions = [{"file": w, "generated": g, "references": r}
                for w, g, r in zip(emb.where, emb.generated, emb.captions)]
    return {"metrics": metrics, "notes": notes, "captions": captions}


def run_linear_probe(model, tokenizer, emb: Embedded, names, opts: EvalOptions, rt: Runtime) -> dict:
    """Fit on the image features of opts.probe_data, score on the evaluation images; the training set's skipped
    inputs are reported with the evaluation set's."""
    train = _embed(model, tokenizer, opts, opts.probe_data, names, rt, [])
    emb.problems += train.problems
    return {"metrics": linear_probe(train.image, train.label, emb.image, emb.label, opts.probe_c)}


TASKS = {
    "zeroshot": Task(run_zeroshot, class_names=True),
    "retrieval": Task(run_retrieval, captions=True, embed_captions=True),
    "caption": Task(run_caption, captions=True, generate=True),
    "linear_probe": Task(run_linear_probe, class_names=True),
}
assert tuple(TASKS) == tuple(EVAL_TASKS), "the task table and nlip_ds.choices.EVAL_TASKS must name the same tasks"
