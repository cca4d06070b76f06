"""`nlip-ds`: the command-line entry point. Each command parses its arguments and calls one function.

    nlip-ds data synth|shards|inspect ...
    nlip-ds train --config configs/tiny-cpu.yaml [section.key=value ...]
    nlip-ds export --checkpoint RUN_DIR --out DIR [--format nlip|hf-clip|open_clip ...]
    nlip-ds caption --checkpoint RUN_OR_EXPORT --images DIR_OR_SHARDS --out captions.jsonl
    nlip-ds audit --checkpoint RUN_OR_EXPORT --data DIR_OR_SHARDS --out DIR   per-pair noise scores + report
    nlip-ds config [--config FILE] [section.key=value ...]     print the resolved config, or --keys
    nlip-ds doctor [--config FILE]                             environment, kernel self-check, config check

Under the DeepSpeed launcher: deepspeed --num_gpus G --module nlip_ds.cli train --config ...
"""
from __future__ import annotations

import argparse
import sys

from nlip_ds.config import ConfigError, describe, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (configs/...); defaults apply when omitted")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")


def cmd_train(args) -> int:
    from nlip_ds.distributed import leave_process_group
    from nlip_ds.train.loop import train

    train(load_config(args.config, args.overrides))
    leave_process_group()
    return 0


def cmd_export(args) -> int:
    from nlip_ds.interop.towers import ExportRefused
    from nlip_ds.train.export import export

    try:
        written = export(args.checkpoint, args.out, tag=args.tag, formats=args.format,
                         open_clip_name=args.open_clip_name)
    except ExportRefused as exc:
        print(f"nlip-ds export: refused: {exc}", file=sys.stderr)
        return 2
    for fmt, folder in written.items():
        print(f"exported {fmt} to {folder} (how to load it: {folder / 'README.md'})")
    return 0


def cmd_doctor(args) -> int:
    from nlip_ds.doctor import doctor

    return doctor(args.config, timing=not args.no_timing)


def cmd_config(args) -> int:
    import yaml

    from nlip_ds.config import to_dict

    if args.keys:
        for key, default, doc in describe():
            print(f"{key:<38} {default:<24} {doc}")
        return 0
    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlip-ds", description="Noise-robust language-image pre-training "
                                     "(NLIP) on DeepSpeed ZeRO-3")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True)

    from nlip_ds.data.cli import add_subcommands as add_data_commands
    from nlip_ds.interop import FORMATS

    add_data_commands(sub)
    from nlip_ds.eval.cli import add_subcommands as add_eval_commands
    add_eval_commands(sub)
    from nlip_ds.eval.caption_cli import add_subcommand as add_caption_command
    add_caption_command(sub)
    from nlip_ds.eval.audit_cli import add_subcommand as add_audit_command
    add_audit_command(sub)

    p = sub.add_parser("train", help="train a model (plain process, deepspeed, torchrun or SLURM srun)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="consolidate a ZeRO-3 run into NLIPModel, transformers CLIP or open_clip "
                       "format (docs/export.md)")
    p.add_argument("--checkpoint", required=True, help="run folder (or its checkpoints/ folder)")
    p.add_argument("--out", required=True, help="output folder (several formats: one sub-folder each)")
    p.add_argument("--tag", help="checkpoint tag (default: latest)")
    p.add_argument("--format", nargs="+", default=["nlip"], choices=FORMATS,
                   help="nlip: NLIPModel.from_pretrained, every module; hf-clip: transformers CLIPModel and "
                   "CLIPProcessor; open_clip: open_clip model config, weights and tokenizer (default: nlip)")
    p.add_argument("--open-clip-name", help="open_clip model name (default: nlip-<run folder name>)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("doctor", help="check versions, devices, kernels and a config; exit 1 if training is "
                       "blocked", description="Environment report with a fix for each problem (docs/doctor.md).")
    p.add_argument("--config", help="experiment YAML whose precision, ZeRO stage, batch and data to check")
    p.add_argument("--no-timing", action="store_true", help="skip the short fused-loss and GEMM timing")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("config", help="print the resolved config, or every key with --keys")
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every config key, its default and meaning")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"nlip-ds {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry(argv=None) -> None:
    """The process entry (`nlip-ds`, `python -m nlip_ds.cli`, the deepspeed launcher's `--module`): run the
    command, flush, and end the process without the interpreter's teardown. Everything is on disk and the
    process group is left by then, yet a rank sometimes still died in C++ static destructors at exit
    ("terminate called without an active exception", status -6), turning a finished run or a clean
    preemption into a failure; the thread at fault was not found. An uncaught error still ends the normal
    way, with its traceback."""
    import logging
    import os

    try:
        status = main(argv)
    except SystemExit as exc:  # argparse, a preemption (0), a non-finite stop (1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
