"""`nlip-ds data synth | digits | shards | inspect | concepts | filter`: make and look at the shards training reads,
build a concept vocabulary (noise-completion) from their captions, and copy them filtered by audit scores.

The `nlip-ds` entry point calls `add_subcommands(subparsers)`; `python -m nlip_ds.data.cli data ...` runs the
same commands alone. Each command's `func(args)` returns the exit status: a bad path or argument prints one
`error:` line on stderr (no traceback) and returns 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

from nlip_ds.data import shards, synthetic

logger = logging.getLogger(__name__)

USER_ERRORS = (OSError, ValueError)


def _progress_bar(total: Optional[int], unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def _fail(command: str, exc: Exception) -> int:
    print(f"nlip-ds data {command}: error: {exc}", file=sys.stderr)
    return 2


def run_synth(args: argparse.Namespace) -> int:
    total = args.num_samples + 2 * round(0.2 * args.num_samples)
    try:
        with _progress_bar(total, "samples") as bar:
            summary = synthetic.synthesize(
                args.out, args.num_samples, incorrect_rate=args.incorrect_rate,
                incomplete_rate=args.incomplete_rate, seed=args.seed, image_size=args.image_size,
                shard_size=args.shard_size, overwrite=args.overwrite, progress=bar.update)
    except USER_ERRORS as exc:
        return _fail("synth", exc)
    print(_synth_text(summary))
    return 0


def run_digits(args: argparse.Namespace) -> int:
    from nlip_ds.data import digits

    try:
        with _progress_bar(None, "samples") as bar:
            summary = digits.build(args.out, noise_rate=args.noise_rate, noise_kind=args.noise_kind, seed=args.seed,
                                   image_size=args.image_size, progress=bar.update)
    except (*USER_ERRORS, ImportError) as exc:
        return _fail("digits", exc)
    lines = [f"digits dataset in {args.out}"]
    for name, split in summary["splits"].items():
        noise = ", ".join(f"{k} {v}" for k, v in split["noise_types"].items() if v)
        lines.append(f"  {name:5s} {split['num_samples']:5d} samples  ids from {split['first_id']}  ({noise})")
    print("\n".join(lines))
    return 0


def _synth_text(summary: dict) -> str:
    lines = [f"synthetic dataset in {summary['out_dir']}"]
    for name, split in summary["splits"].items():
        noise = ", ".join(f"{k} {v}" for k, v in split["noise_types"].items() if v)
        lines.append(f"  {name:5s} {split['num_samples']:7d} samples  {split['num_shards']:4d} shards  ids from "
                     f"{split['first_id']}  ({noise})  {split['pattern']}")
    lines.append(f"  classes: {' '.join(summary['classes'])}")
    return "\n".join(lines)


def run_shards(args: argparse.Namespace) -> int:
    source = args.input or args.image_folder
    convert = shards.convert_jsonl if args.input else shards.convert_image_folder
    if not Path(source).exists():
        return _fail("shards", FileNotFoundError(f"{source} does not exist"))
    try:
        with _progress_bar(None, "items") as bar:
            report = convert(source, args.out, args.shard_size, split=args.split, start_id=args.start_id,
                             overwrite=args.overwrite, progress=bar.update)
    except USER_ERRORS as exc:
        return _fail("shards", exc)
    print(f"wrote {report['num_samples']} samples in {len(report['shards'])} shards to "
          f"{Path(args.out) / args.split}; skipped {report['num_skipped']}"
          + "".join(f"\n  {reason}: {n}" for reason, n in report["skipped_by_reason"].items())
          + f"\nreport: {report['report_path']}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    target = args.path
    if not Path(target).exists() and not any(c in target for c in "{:"):
        return _fail("inspect", FileNotFoundError(f"{target} does not exist"))
    try:
        if args.verify:
            return _verify(target, args.json)
        summary = shards.inspect(target, max_examples=args.examples)
    except USER_ERRORS as exc:
        return _fail("inspect", exc)
    print(json.dumps(summary, indent=1, ensure_ascii=False) if args.json else shards.format_inspect(summary))
    for name, split in summary["splits"].items():
        if split["index_samples"] not in (None, split["num_samples"]):
            print(f"nlip-ds data inspect: warning: [{name}] the index lists {split['index_samples']} samples but "
                  f"{split['num_samples']} are readable; run with --verify to find the damaged shards",
                  file=sys.stderr)
    return 0


def _verify(target: str, as_json: bool) -> int:
    """Read every shard fully; exit status 1 when a shard is damaged."""
    from nlip_ds.data.verify import format_verify, verify_split

    splits = shards.split_shards(target)
    with _progress_bar(sum(len(p) for p in splits.values()), "shards") as bar:
        report = {"path": target, "splits": {name: verify_split(paths, progress=bar.update)
                                             for name, paths in splits.items()}}
    print(json.dumps(report, indent=1, ensure_ascii=False) if as_json else format_verify(report))
    return 1 if any(s["damaged_shards"] for s in report["splits"].values()) else 0


def run_filter(args: argparse.Namespace) -> int:
    from nlip_ds.data.filter import FilterOptions, filter_dataset

    opts = FilterOptions(scores=args.scores, data=args.data, out=Path(args.out), min_clean=args.min_clean,
                         recaption_below=args.recaption_below, captions=args.captions, split=args.split,
                         shard_size=args.shard_size, overwrite=args.overwrite)
    try:
        with _progress_bar(None, "pairs") as bar:
            record = filter_dataset(opts, progress=bar.update)
    except USER_ERRORS as exc:
        return _fail("filter", exc)
    print(f"read {record['read']} pairs of {args.data}: kept {record['kept']} ({record['recaptioned']} "
          f"re-captioned), dropped {record['dropped']}, unscored {record['unscored']}\n"
          f"wrote {record['shards']} shards to {record['out']}\nrecord: {Path(args.out) / 'filter.json'}")
    return 0


def shard_captions(pattern: str, errors: Counter, progress=None) -> Iterator[str]:
    """The .txt caption of every sample of the shards of `pattern`, in shard order; samples without one and
    unreadable shards are counted in `errors`."""
    for source in shards.expand_pattern(pattern):
        for path in source:
            for sample in shards.iter_tar_samples(path, errors):
                if progress:
                    progress(1)
                if "txt" in sample:
                    yield sample["txt"].decode("utf-8", "replace")
                else:
                    errors["no_caption"] += 1


def run_concepts(args: argparse.Namespace) -> int:
    from nlip_ds.data.vocabulary import build_vocabulary, write_vocabulary

    errors: Counter = Counter()
    try:
        total = sum(s.num_samples for source in shards.expand_pattern(args.shards)
                    for s in shards.shard_counts(source))
        with _progress_bar(total, "captions") as bar:
            captions = _counting(shard_captions(args.shards, errors, bar.update))
            names = build_vocabulary(captions, args.top_k, min_count=args.min_count, max_words=args.max_words)
        if not names:
            raise ValueError(f"no word of the captions of {args.shards} occurs {args.min_count} times or more "
                             f"(--min-count)")
        out = write_vocabulary(names, args.out)
    except USER_ERRORS as exc:
        return _fail("concepts", exc)
    skipped = "".join(f"\n  skipped {reason}: {n}" for reason, n in sorted(errors.items()))
    print(f"read {captions.count} captions from {args.shards}{skipped}\n"
          f"wrote {len(names)} concept names to {out}\n  first: {', '.join(names[:20])}")
    return 0


class _counting:
    """An iterator wrapper that counts what went through it."""

    def __init__(self, items):
        self._items, self.count = iter(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.count += 1
        return item


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate synthetic noisy image-text shards with ground truth",
                       description="Draw scenes of 1-3 coloured shapes with captions, add incorrect and "
                       "incomplete captions to the train split at exact rates (val and test stay clean), and "
                       "write OUT/{train,val,test}/ shards plus classes.txt, concepts.txt and dataset.json.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, required=True, help="training samples (val and test: 20%% each)")
    p.add_argument("--incorrect-rate", type=float, default=0.3, help="share of train captions taken from "
                   "another image (default 0.3)")
    p.add_argument("--incomplete-rate", type=float, default=0.2, help="share of train captions that omit "
                   "objects or are web-style strings (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--shard-size", type=int, default=synthetic.DEFAULT_SHARD_SIZE,
                   help=f"samples per shard (default {synthetic.DEFAULT_SHARD_SIZE})")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already in OUT")
    p.set_defaults(func=run_synth)


def _add_digits(sub) -> None:
    from nlip_ds.data.digits import NOISE_KINDS

    p = sub.add_parser("digits", help="real labelled images as noisy pairs: scikit-learn's handwritten digits",
                       description="Caption scikit-learn's 1,797 handwritten digits from varied templates, split "
                       "them (train 1,197 / val 200 / test 400, stratified by the seed) and add noise to the train "
                       "split by the noisy-correspondence protocol: `shuffle` permutes the captions of a fraction "
                       "of the pairs among themselves, `incomplete` replaces them with web-style strings. Writes "
                       "OUT/{train,val,test}/ shards, classes.txt, concepts.txt and dataset.json.")
    p.add_argument("--out", required=True, help="output folder (its shards are replaced)")
    p.add_argument("--noise-rate", type=float, default=0.0, help="share of train pairs made noisy (default 0)")
    p.add_argument("--noise-kind", choices=NOISE_KINDS, default="shuffle", help="default shuffle")
    p.add_argument("--seed", type=int, default=0, help="split, captions and noise (default 0)")
    p.add_argument("--image-size", type=int, default=32, help="image side after bicubic upscaling (default 32)")
    p.set_defaults(func=run_digits)


def _add_shards(sub) -> None:
    p = sub.add_parser("shards", help="convert image-caption pairs into webdataset shards",
                       description="Convert a JSONL of {\"image\": path, \"caption\": text} lines (paths relative "
                       "to the JSONL's folder) or a folder of images with <name>.txt captions into "
                       "OUT/SPLIT/SPLIT-NNNNNN.tar shards. Bad items are skipped and listed in OUT/report.json.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="PAIRS.jsonl", help="JSONL file of image-caption pairs")
    src.add_argument("--image-folder", metavar="DIR", help="folder of images with .txt sidecar captions")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=shards.DEFAULT_SHARD_SIZE,
                   help=f"samples per shard (default {shards.DEFAULT_SHARD_SIZE})")
    p.add_argument("--split", default="train", help="split name: sub-folder and shard prefix (default train)")
    p.add_argument("--start-id", type=int, default=0, help="first sample id, to keep ids unique across "
                   "splits (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace shards of the same split in OUT")
    p.set_defaults(func=run_shards)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="summarize shards: counts, caption lengths, noise types, examples",
                       description="Summarize a dataset folder (with split sub-folders), one split folder, "
                       "a .tar file or a brace pattern of shards.")
    p.add_argument("path", metavar="DIR_OR_SHARDS", help="folder, .tar file or brace pattern")
    p.add_argument("--examples", type=int, default=3, help="examples shown per split (default 3)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--verify", action="store_true", help="read every shard to the end as the loader does and "
                   "report per shard: samples read and usable against index.json, truncation, skips by the "
                   "loader's reasons, duplicate sample ids; exit status 1 when a shard is damaged")
    p.set_defaults(func=run_inspect)


def _add_concepts(sub) -> None:
    p = sub.add_parser("concepts", help="build a concept vocabulary (noise-completion) from shard captions",
                       description="Count the content words (and two-word phrases frequent as a unit) of the "
                       "captions of the shards, without stop words and file-name-like tokens, and write the "
                       "TOP-K most frequent, one per line (docs/completion.md).")
    p.add_argument("--shards", required=True, metavar="PATTERN", help="split folder, .tar file or brace pattern")
    p.add_argument("--out", required=True, help="vocabulary file to write (e.g. concepts.txt)")
    p.add_argument("--top-k", type=int, default=1000, help="names kept at most (default 1000)")
    p.add_argument("--min-count", type=int, default=2, help="drop names seen fewer times (default 2)")
    p.add_argument("--max-words", type=int, default=2, help="longest phrase in words; 1: single words only "
                   "(default 2)")
    p.set_defaults(func=run_concepts)


def _add_filter(sub) -> None:
    p = sub.add_parser("filter", help="copy the shards keeping the pairs an audit scores as clean",
                       description="Write OUT/<split>/ shards (and index.json) holding the pairs of DATA whose "
                       "clean probability in the `nlip-ds audit` scores is at least --min-clean; with "
                       "--recaption-below P, pairs below P whose image has a caption in --captions (`nlip-ds "
                       "caption` output over the same shards) are kept with that caption instead. Sample ids, keys "
                       "and other members are kept; counts go to OUT/filter.json (docs/audit.md).")
    p.add_argument("--scores", required=True, help="scores.parquet or scores.jsonl of `nlip-ds audit`")
    p.add_argument("--data", required=True, metavar="DIR_OR_SHARDS", help="the audited split folder, .tar or "
                   "brace pattern")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--min-clean", type=float, default=0.5, help="keep pairs with at least this clean "
                   "probability (default 0.5)")
    p.add_argument("--recaption-below", type=float, metavar="P", help="replace the caption of pairs below this "
                   "clean probability with the one in --captions (and keep them)")
    p.add_argument("--captions", metavar="CAPTIONS.jsonl", help="`nlip-ds caption --images DATA` output")
    p.add_argument("--split", help="output split name (default: the data folder's name, else train)")
    p.add_argument("--shard-size", type=int, default=shards.DEFAULT_SHARD_SIZE,
                   help=f"samples per output shard (default {shards.DEFAULT_SHARD_SIZE})")
    p.add_argument("--overwrite", action="store_true", help="replace shards of the same split in OUT")
    p.set_defaults(func=run_filter)


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Register `data` with its `synth`, `digits`, `shards`, `inspect`, `concepts` and `filter` subcommands; returns the
    `data` parser."""
    data = subparsers.add_parser("data", help="make and inspect training shards",
                                 description="Make and inspect the webdataset shards that training reads.")
    sub = data.add_subparsers(dest="data_command", metavar="{synth,digits,shards,inspect,concepts,filter}",
                              required=True)
    _add_synth(sub)
    _add_digits(sub)
    _add_shards(sub)
    _add_inspect(sub)
    _add_concepts(sub)
    _add_filter(sub)
    return data


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nlip-ds", description="nlip-ds data commands")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
