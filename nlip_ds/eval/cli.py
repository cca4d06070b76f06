"""`nlip-ds eval --checkpoint RUN_OR_EXPORT --task zeroshot|retrieval|caption --data ...`

One process, or several under torchrun / the deepspeed launcher (WORLD_SIZE > 1): every rank consolidates the
checkpoint, evaluates every world_size-th record and the features are gathered; rank 0 prints the table and
writes the results JSON and the eval/ TensorBoard tags. A bad path or input prints one `error:` line on stderr
naming the file and returns 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

logger = logging.getLogger(__name__)


def add_subcommands(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot, retrieval or captioning metrics of a run folder or an export")
    p.add_argument("--checkpoint", required=True, help="training run folder (ZeRO-3 checkpoint) or exported model")
    p.add_argument("--tag", help="checkpoint tag of a run folder (default: latest)")
    p.add_argument("--task", required=True, choices=("zeroshot", "retrieval", "caption"))
    p.add_argument("--data", required=True, help="shards (folder, .tar or brace pattern), an ImageFolder tree, "
                   "or a Karpathy-style caption .json")
    p.add_argument("--image-root", help="folder the .json's filenames are relative to (default: its folder)")
    p.add_argument("--split", default="test", help="split of the .json to evaluate (default: test)")
    p.add_argument("--classes", help="class names, one per line (default: classes.txt beside the data)")
    p.add_argument("--templates", help="zero-shot prompt templates, one per line with {} (default: CLIP's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-samples", type=int, help="evaluate the first N records only")
    p.add_argument("--linear-probe", action="store_true", help="also fit logistic regression on frozen image "
                   "features of --train-data and report its accuracy on --data")
    p.add_argument("--train-data", help="labelled training images for --linear-probe")
    p.add_argument("--probe-c", type=float, default=1.0, help="inverse regularization strength of the probe")
    p.add_argument("--strategy", choices=("greedy", "beam"), default="greedy", help="caption decoding")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--min-tokens", type=int, default=1)
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU when there is one)")
    p.add_argument("--out", help="results JSON (default: RUN/eval/<task>.json, or EXPORT/eval/<task>.json)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write eval/ tags")
    p.set_defaults(func=run)


def _positive(args) -> None:
    for name in ("batch_size", "max_samples", "max_tokens", "num_beams"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _options(args):
    from nlip_ds.eval.embed import GenerateOptions
    from nlip_ds.eval.tasks import EvalOptions

    _positive(args)
    return EvalOptions(task=args.task, data=args.data, image_root=args.image_root, split=args.split,
                       classes=args.classes, templates=args.templates, batch_size=args.batch_size,
                       max_samples=args.max_samples, linear_probe=args.linear_probe, train_data=args.train_data,
                       probe_c=args.probe_c, generate=GenerateOptions(args.strategy, args.max_tokens,
                                                                      args.min_tokens, args.num_beams))


def start_processes(device_arg):
    """(Topology, device); a process group (NCCL on GPUs, gloo otherwise) only when WORLD_SIZE > 1."""
    import torch.distributed as dist

    from nlip_ds.distributed import export_topology, resolve_topology

    topo = resolve_topology()
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{topo.local_rank}" if device_arg == "cuda" else device_arg)
    if topo.world_size > 1:
        export_topology(topo)  # SLURM names rank and world differently from env:// rendezvous
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return topo, device


def run_on_processes(command: str, device_arg, body) -> int:
    """Run `body(topo, device)` on one process or on every rank of a launcher (`nlip-ds eval`, `nlip-ds
    caption`): a bad input becomes one line `nlip-ds COMMAND: error: ...` and exit status 2, and the process
    group is left before returning."""
    import torch.distributed as dist

    from nlip_ds.config import ConfigError
    from nlip_ds.monitor import setup_logging

    topo, device = start_processes(device_arg)
    setup_logging(topo.rank)
    try:
        return body(topo, device)
    except (OSError, ValueError, ConfigError) as exc:
        print(f"nlip-ds {command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    return run_on_processes("eval", args.device, lambda topo, device: _evaluate_and_report(args, topo, device))


def _evaluate_and_report(args, topo, device) -> int:
    from nlip_ds.eval.checkpoint import load_for_eval
    from nlip_ds.eval.report import format_table, log_tensorboard, write_results
    from nlip_ds.eval.tasks import Runtime, evaluate

    opts = _options(args)
    loaded = load_for_eval(args.checkpoint, args.tag, device)
    results = evaluate(loaded.model, loaded.tokenizer, opts, Runtime(device, topo.rank, topo.world_size))
    results.update(checkpoint=str(args.checkpoint), step=loaded.step, world_size=topo.world_size)
    if topo.is_main:
        out = write_results(results, args.out or loaded.default_output(args.task))
        if not args.no_tensorboard:
            log_tensorboard(results, loaded.tensorboard_dir, loaded.step)
        print(format_table(results))
        print(f"results: {out}")
    return 0
