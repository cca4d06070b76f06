"""`nlip-ds eval --checkpoint RUN_OR_EXPORT --task zeroshot|retrieval|caption|linear_probe --data ...`

One process, or several under torchrun / the deepspeed launcher (WORLD_SIZE > 1): every rank consolidates the
checkpoint, evaluates every world_size-th record and the features are gathered; rank 0 prints the table and
writes the results JSON and the eval/ TensorBoard tags. A bad path or input prints one `error:` line on stderr
naming the file and returns 2.
"""
from __future__ import annotations

import argparse
import logging

from nlip_ds.choices import EVAL_STRATEGIES, EVAL_TASKS, PRECISIONS
from nlip_ds.config import EvalConfig

logger = logging.getLogger(__name__)


def add_subcommands(sub) -> None:
    defaults = EvalConfig()  # the caption decoding defaults of the end-of-training evaluation
    p = sub.add_parser("eval", help="zero-shot, retrieval, captioning or linear-probe metrics of a run folder or "
                       "an export")
    p.add_argument("--checkpoint", required=True, help="training run folder (ZeRO-3 checkpoint) or exported model")
    p.add_argument("--tag", help="checkpoint tag of a run folder (default: latest)")
    p.add_argument("--task", required=True, choices=tuple(EVAL_TASKS),
                   help="; ".join(f"{name}: {doc}" for name, doc in EVAL_TASKS.items()))
    p.add_argument("--data", required=True, help="shards (folder, .tar or brace pattern), an ImageFolder tree, "
                   "or a Karpathy-style caption .json")
    p.add_argument("--image-root", help="folder the .json's filenames are relative to (default: its folder)")
    p.add_argument("--split", default="test", help="split of the .json to evaluate (default: test)")
    p.add_argument("--classes", help="class names, one per line (default: classes.txt beside the data)")
    p.add_argument("--templates", help="zero-shot prompt templates, one per line with {} (default: CLIP's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-samples", type=int, help="evaluate the first N records only")
    p.add_argument("--linear-probe", action="store_true", help="also fit logistic regression on frozen image "
                   "features of --train-data and report its accuracy on --data (the linear_probe task)")
    p.add_argument("--train-data", help="labelled training images for --linear-probe")
    p.add_argument("--probe-c", type=float, default=defaults.probe_c,
                   help="inverse regularization strength of the probe")
    p.add_argument("--strategy", choices=EVAL_STRATEGIES, default=defaults.strategy, help="caption decoding")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    p.add_argument("--min-tokens", type=int, default=defaults.min_tokens)
    p.add_argument("--num-beams", type=int, default=defaults.num_beams)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU when there is one)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="dtype of the weights and activations (scores in float32); fp16 on GPUs only")
    p.add_argument("--out", help="results JSON (default: RUN/eval/<task>.json, or EXPORT/eval/<task>.json)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write eval/ tags")
    p.set_defaults(func=run)


def _positive(args) -> None:
    for name in ("batch_size", "max_samples", "max_tokens", "num_beams"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def options_from_args(args):
    """The EvalOptions of `nlip-ds eval`: --task, plus linear_probe with --linear-probe."""
    from nlip_ds.eval.tasks import EvalOptions
    from nlip_ds.eval.zeroshot import load_templates
    from nlip_ds.model.generation import GenerationOptions

    _positive(args)
    tasks = tuple(dict.fromkeys([args.task] + (["linear_probe"] if args.linear_probe else [])))
    if "linear_probe" in tasks and not args.train_data:
        raise ValueError("--linear-probe needs --train-data (labelled training images)")
    return EvalOptions(tasks, args.data, image_root=args.image_root, split=args.split, classes=args.classes,
                       templates=load_templates(args.templates) if args.templates else None,
                       batch_size=args.batch_size, max_samples=args.max_samples, probe_data=args.train_data,
                       probe_c=args.probe_c, generation=GenerationOptions(args.strategy, args.max_tokens,
                                                                          args.min_tokens, num_beams=args.num_beams))


def run(args: argparse.Namespace) -> int:
    from nlip_ds.distributed import run_on_processes

    return run_on_processes("eval", args.device, lambda topo, device: _evaluate_and_report(args, topo, device))


def _evaluate_and_report(args, topo, device) -> int:
    from nlip_ds.eval.checkpoint import load_for_eval
    from nlip_ds.eval.report import format_table, log_tensorboard, write_results
    from nlip_ds.eval.tasks import Runtime, evaluate

    opts = options_from_args(args)
    loaded = load_for_eval(args.checkpoint, args.tag, device, args.precision)
    results = evaluate(loaded.model, loaded.tokenizer, opts, Runtime(device, topo.rank, topo.world_size))
    results.update(task=args.task, checkpoint=str(args.checkpoint), step=loaded.step, world_size=topo.world_size,
                   precision=args.precision)
    if topo.is_main:
        out = write_results(results, args.out or loaded.default_output(args.task))
        if not args.no_tensorboard:
            log_tensorboard(results, loaded.tensorboard_dir, loaded.step)
        print(format_table(results))
        print(f"results: {out}")
    return 0
