"""`nlip-ds audit --checkpoint RUN_OR_EXPORT --data DIR_OR_SHARDS --out DIR` (docs/audit.md).

One process, or every rank of torchrun / the deepspeed launcher: each rank loads the model as `nlip-ds eval`
does and scores its share of the batches (eval/audit.py); rank 0 then fits the mixture and writes
OUT/scores.parquet (or .jsonl), OUT/summary.json, OUT/histogram.png and OUT/report.html.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from nlip_ds.choices import PRECISIONS
from nlip_ds.data.scores import FORMATS, resolve_format, write_table

logger = logging.getLogger(__name__)


def add_subcommand(sub) -> None:
    p = sub.add_parser("audit", help="score every image-text pair of a dataset for noise; write scores and an "
                       "HTML report", description="Score every pair of the shards with a trained model: its "
                       "contrastive loss against in-batch negatives and the clean probability of a two-component "
                       "mixture fitted on those losses (as training's noise estimator does). Writes "
                       "OUT/scores.parquet (or .jsonl), OUT/summary.json and OUT/report.html. Resumes a "
                       "half-done audit in OUT.")
    p.add_argument("--checkpoint", required=True, help="training run folder (ZeRO-3 checkpoint) or exported model")
    p.add_argument("--tag", help="checkpoint tag of a run folder (default: latest)")
    p.add_argument("--data", required=True, metavar="DIR_OR_SHARDS", help="split folder, .tar or brace pattern "
                   "('::' joins several)")
    p.add_argument("--out", required=True, help="output folder (a half-done audit there is continued)")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per batch, i.e. in-batch negatives + 1; "
                   "scores depend on it, not on the number of processes (default 256)")
    p.add_argument("--top", type=int, default=48, help="most suspicious pairs shown in the report (default 48)")
    p.add_argument("--recaption", action="store_true", help="also show a caption the model's decoder writes "
                   "for each shown image (greedy)")
    p.add_argument("--max-tokens", type=int, default=20, help="longest --recaption caption (default 20)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="scores file: parquet (needs pyarrow), "
                   "jsonl, or auto: parquet when pyarrow is importable (default)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU when there is one)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="dtype of the weights and activations (scores in float32); fp16 on GPUs only")
    p.set_defaults(func=run)


def options(args):
    from nlip_ds.eval.audit import AuditOptions

    opts = AuditOptions(checkpoint=args.checkpoint, data=args.data, out=Path(args.out), tag=args.tag,
                        batch_size=args.batch_size, top=args.top, recaption=args.recaption,
                        max_tokens=args.max_tokens, format=args.format, device=args.device,
                        precision=args.precision)
    opts.check()
    resolve_format(opts.format)
    return opts


def run(args: argparse.Namespace) -> int:
    from nlip_ds.distributed import run_on_processes  # the process-group runner of `nlip-ds eval` and `caption`

    return run_on_processes("audit", args.device, lambda topo, device: run_audit(options(args), topo, device))


def run_audit(opts, topo, device) -> int:
    """Every rank: load, score its share; rank 0: join, fit and write. `opts` is an audit.AuditOptions."""
    from nlip_ds.distributed import barrier
    from nlip_ds.eval import audit
    from nlip_ds.eval.checkpoint import load_for_eval

    audit.expected_batches(opts.data, opts.batch_size)  # a missing shard is named before the model loads
    loaded = load_for_eval(opts.checkpoint, opts.tag, device, opts.precision)
    meta = {"checkpoint": str(Path(opts.checkpoint).resolve()), "step": loaded.step, "data": opts.data,
            "batch_size": opts.batch_size}
    if opts.precision != "fp32":  # scores of another precision must not be mixed in (fp32: older audits' meta)
        meta["precision"] = opts.precision
    audit.check_meta(opts.out, meta, write=topo.is_main)
    barrier()
    scorer = audit.Scorer(loaded.model, loaded.tokenizer, opts, device)
    start = time.monotonic()
    num_batches = audit.score_share(scorer, opts, topo.rank, topo.world_size)
    barrier()
    if topo.is_main:
        summary = finish(opts, loaded, scorer, num_batches, topo.world_size, time.monotonic() - start)
        print(f"audit of {summary['pairs']} pairs ({summary['skipped']} skipped): estimated noise rate "
              f"{summary['mixture']['noise_rate']:.3f}"
              + (f", detection AUC {summary['detection']['audit']['auc']:.3f}" if "audit" in summary["detection"]
                 else "")
              + f"\n  scores: {summary['scores_file']} ({summary['scores_format']})\n  report: "
              f"{opts.out / 'report.html'}")
    return 0


@dataclass
class Scored:
    """The joined audit: score columns, skipped samples, the mixture and where its inputs came from."""
    columns: dict
    problems: list
    fit: object  # nlip_ds.noise.gmm.GMMFit
    clean: object  # (n,) float64 tensor
    flags: object  # (n,) ground truth: 1 noisy, 0 clean, -1 unknown
    gmm: dict  # the fit's settings and their source
    estimate: str  # where the training-time estimate came from, or why there is none


def score_columns(opts, loaded, num_batches: int) -> Scored:
    """Join the parts, fit the mixture with the run's settings, add the training-time estimate."""
    from nlip_ds.config import NoiseConfig
    from nlip_ds.eval import audit

    columns, problems = audit.joined_rows(opts.out, num_batches)
    if len(columns["loss"]) < 2:
        raise ValueError(f"{opts.data}: {len(columns['loss'])} readable pair(s); the mixture needs at least 2")
    cfg = audit.run_config(loaded)
    noise = cfg.noise if cfg is not None else NoiseConfig()
    fit, clean = audit.fit_losses(columns["loss"], noise)
    columns["clean_prob"] = clean.tolist()
    estimate, why = audit.training_estimate(loaded, cfg, opts.data, opts.tag)
    if estimate is not None:
        columns["train_clean_prob"] = [estimate.get(i, math.nan) for i in columns["sample_id"]]
    logger.info("training-time estimate: %s", "read from " + why if estimate is not None else f"none ({why})")
    flags = audit.noise_flags(columns["noise_type"])
    if not bool((flags >= 0).any()):
        del columns["noise_type"]
    gmm = {"reg_covar": noise.reg_covar, "tol": noise.tol, "max_iter": noise.max_iter,
           "from": "the run's noise.* config" if cfg is not None else "noise.* defaults (export)"}
    return Scored(columns, problems, fit, clean, flags, gmm, why if estimate is not None else f"none: {why}")


def detection_metrics(scored: Scored) -> dict:
    """{"audit": ..., "training_estimate": ...}, each only when the ground truth can judge it."""
    import torch

    from nlip_ds.eval import audit

    metrics = {"audit": audit.detection(scored.clean, scored.flags)}
    if "train_clean_prob" in scored.columns:
        train = torch.tensor(scored.columns["train_clean_prob"], dtype=torch.float64)
        known = ~torch.isnan(train)
        metrics["training_estimate"] = audit.detection(train[known], scored.flags[known])
    return {name: values for name, values in metrics.items() if values}


def finish(opts, loaded, scorer, num_batches: int, world_size: int, seconds: float) -> dict:
    """Write the scores table, summary.json, histogram.png and report.html; returns the summary. `seconds`:
    the scoring pass's wall time (all ranks; batches scored before a resume not included)."""
    import torch

    from nlip_ds.eval import audit
    from nlip_ds.noise.plots import render_fit_histogram

    scored = score_columns(opts, loaded, num_batches)
    fit, fmt = scored.fit, resolve_format(opts.format)
    scores_file = write_table(scored.columns, opts.out, fmt)
    metrics = detection_metrics(scored)
    has_truth = "noise_type" in scored.columns
    render_fit_histogram(fit, torch.tensor(scored.columns["loss"]), scored.flags if has_truth else None,
                         path=opts.out / "histogram.png")
    summary = {"checkpoint": str(opts.checkpoint), "step": loaded.step, "data": opts.data,
               "pairs": len(scored.clean), "skipped": len(scored.problems), "batch_size": opts.batch_size,
               "world_size": world_size, "scoring_seconds": round(seconds, 3), "gmm": scored.gmm,
               "mixture": {"noise_rate": fit.noise_rate, "means": list(fit.means), "variances": list(fit.variances),
                           "loss_bounds": list(fit.bounds), "converged": fit.converged},
               "training_estimate": scored.estimate, "detection": metrics, "scores_file": str(scores_file),
               "scores_format": fmt, "skipped_samples": [{"sample": w, "reason": r} for w, r in scored.problems]}
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    write_page(opts, loaded, scorer, scored, summary)
    return summary


def write_page(opts, loaded, scorer, scored: Scored, summary: dict) -> None:
    from nlip_ds.eval import audit
    from nlip_ds.eval.audit_report import write_report

    info = {"checkpoint": summary["checkpoint"], "checkpoint step": loaded.step, "data": opts.data,
            "pairs scored": summary["pairs"], "samples skipped": summary["skipped"], "batch size": opts.batch_size,
            "estimated noise rate": scored.fit.noise_rate,
            "pairs with clean probability < 0.5": int((scored.clean < 0.5).sum()),
            "training-time estimate": scored.estimate,
            "scores": f"{Path(summary['scores_file']).name} ({summary['scores_format']})"}
    titles = {"audit": "this audit's clean probability", "training_estimate": "the run's training-time estimate"}
    suspicious = audit.most_suspicious(scored.columns, opts.top, scorer, opts)
    write_report(opts.out / "report.html", info, {titles[k]: v for k, v in summary["detection"].items()},
                 (opts.out / "histogram.png").read_bytes(), suspicious)
