"""`nlip-ds caption --checkpoint RUN_OR_EXPORT --images DIR_OR_SHARDS --out captions.jsonl`

For each image: the top-k concepts of a vocabulary by cosine with its image embedding, then a caption that
C_d writes from the image and those concepts (nucleus sampling), as one JSONL line in input order:

    {"path": "imgs/a.png", "concepts": ["dog", "ball", ...], "caption": "a dog with a ball"}      (folder)
    {"key": "000000012", "shard": "data/test/test-000000.tar", "concepts": [...], "caption": "..."}  (shards)

The checkpoint is loaded as `nlip-ds eval` loads it (a run folder is consolidated in memory, an export read
as it is), so every rank holds the whole plain model and no rank waits on another while generating. Under
torchrun or the deepspeed launcher the input is cut into batches of --batch-size in input order and rank r
captions batches r, r + W, ...; each batch samples with its own generator seeded by (--seed, batch number),
so the lines do not depend on the number of processes. Rank 0 gathers them and writes the file.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

from nlip_ds.choices import PRECISIONS, STRATEGIES

logger = logging.getLogger(__name__)


def add_subcommand(sub) -> None:
    p = sub.add_parser("caption", help="retrieve concepts and write a caption for each image (JSONL)",
                       description="Load a run folder or an export, embed a concept vocabulary, and for each "
                       "image write its top-k concepts and a generated caption as one JSONL line, in input order.")
    p.add_argument("--checkpoint", required=True, help="training run folder (ZeRO-3 checkpoint) or exported model")
    p.add_argument("--tag", help="checkpoint tag of a run folder (default: latest)")
    p.add_argument("--images", required=True, metavar="DIR_OR_SHARDS", help="a folder of images (searched "
                   "recursively), one image file, or shards (split folder, .tar or brace pattern)")
    p.add_argument("--concepts", help="concept vocabulary, one name per line (default: the shipped generic one)")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--top-k", type=int, default=5, help="concepts per image (default 5)")
    p.add_argument("--strategy", choices=tuple(STRATEGIES), default="nucleus",
                   help="decoding: nucleus sampling (default, as noise-completion samples), greedy or beam")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--num-beams", type=int, default=3, help="beams of --strategy beam (default 3)")
    p.add_argument("--min-tokens", type=int, default=5, help="shortest caption in tokens (default 5)")
    p.add_argument("--max-tokens", type=int, default=30, help="longest caption in tokens (default 30)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--template", default="a photo of a {}.", help="prompt that embeds each concept name")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU when there is one)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="dtype of the weights and activations; fp16 on GPUs only")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ inputs


def caption_records(images: str) -> Iterator:
    """EvalRecords of an image folder (every image below it, sorted by path), one image file, or shards."""
    from nlip_ds.data.samples import IMAGE_EXTENSIONS
    from nlip_ds.eval.data import EvalRecord, shard_records

    def is_image(file: Path) -> bool:
        return file.is_file() and file.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS

    path = Path(images)
    if is_image(path):
        return iter([EvalRecord(0, str(path), path)])
    if path.is_dir() and not any(path.glob("*.tar")):
        files = sorted(f for f in path.rglob("*") if is_image(f))
        if not files:
            raise FileNotFoundError(f"{path} holds no images and no .tar shards")
        return (EvalRecord(i, str(f), f) for i, f in enumerate(files))
    return shard_records(images)


def own_batches(records, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[int, list]]:
    """(batch number, records) of this rank: batches of `batch_size` consecutive records, every world_size-th."""
    for number, group in itertools.groupby(records, key=lambda r: r.index // batch_size):
        if number % world_size == rank:
            yield number, list(group)


def _location(where: str, image) -> dict:
    if isinstance(image, Path) or ":" not in where:
        return {"path": where}
    shard, key = where.rsplit(":", 1)
    return {"key": key, "shard": shard}


# ------------------------------------------------------------------------------------------------ captioning


@torch.no_grad()
def caption_batch(model, tokenizer, cache, images: torch.Tensor, args, generator: torch.Generator):
    """(concept names per image, caption per image) of one batch of normalized images (B, 3, S, S)."""
    top = cache.retrieve(model.encode_image(images), args.top_k)  # (B, k)
    concept_ids, concept_mask = cache.prefix(top, tokenizer, model.config.text.context_length)
    ids = model.generate(images, concept_ids, concept_mask, args.generation, generator=generator)
    return cache.names(top), tokenizer.decode(ids)


def caption_share(model, tokenizer, cache, args, rank: int, world_size: int, device):
    """This rank's lines as (record index, line dict) and its skipped inputs as (file, reason)."""
    from nlip_ds.eval.data import Problems, image_batches

    problems, lines = Problems(), []
    records = caption_records(args.images)
    for number, batch in own_batches(records, args.batch_size, rank, world_size):
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + number)  # CPU: same on any device
        locations = {r.index: _location(r.where, r.image) for r in batch}
        for images, kept in image_batches(batch, model.config.vision.image_size, len(batch), problems):
            names, captions = caption_batch(model, tokenizer, cache, images.to(device), args, generator)
            lines += [(r.index, {**locations[r.index], "concepts": c, "caption": t})
                      for r, c, t in zip(kept, names, captions)]
        if rank == 0:
            logger.info("captioned %d images (batch %d)", len(lines), number)
    return lines, problems.items


def _check(args) -> None:
    """Refuse bad options by their flag, then keep the decoding options as one GenerationOptions."""
    from nlip_ds.model.generation import GenerationOptions

    for name in ("top_k", "batch_size", "max_tokens", "num_beams"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.min_tokens > args.max_tokens:
        raise ValueError(f"--min-tokens {args.min_tokens} exceeds --max-tokens {args.max_tokens}")
    args.generation = GenerationOptions(args.strategy, args.max_tokens, args.min_tokens, args.top_p,
                                        args.num_beams).validate()


def write_jsonl(lines: list[dict], out: Path) -> Path:
    """Write atomically: a reader never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out)
    return out


def _caption_and_write(args, topo, device) -> int:
    from nlip_ds.completion.concepts import ConceptCache, load_vocabulary
    from nlip_ds.distributed import all_gather_object
    from nlip_ds.eval.checkpoint import load_for_eval

    _check(args)
    cache = ConceptCache(load_vocabulary(args.concepts), args.template)
    loaded = load_for_eval(args.checkpoint, args.tag, device, args.precision)
    model, tokenizer = loaded.model, loaded.tokenizer
    cache.refresh(model.encode_text, tokenizer, device, max_length=model.config.text.context_length)
    lines, problems = caption_share(model, tokenizer, cache, args, topo.rank, topo.world_size, device)
    shares = all_gather_object((lines, problems)) if topo.world_size > 1 else [(lines, problems)]
    if not topo.is_main:
        return 0
    lines = [line for _, line in sorted((x for share in shares for x in share[0]), key=lambda x: x[0])]
    problems = [p for share in shares for p in share[1]]
    for where, reason in problems:
        print(f"skipped {where}: {reason}", file=sys.stderr)
    if not lines:
        raise ValueError(f"no image of {args.images} could be read ({len(problems)} skipped)")
    out = write_jsonl(lines, Path(args.out))
    print(f"captioned {len(lines)} images ({len(problems)} skipped) with {len(cache)} concepts on "
          f"{topo.world_size} process(es): {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from nlip_ds.distributed import run_on_processes

    return run_on_processes("caption", args.device, lambda topo, device: _caption_and_write(args, topo, device))
