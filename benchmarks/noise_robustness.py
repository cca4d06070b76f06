"""The noise-robustness report: what NLIP buys over the CLIP loss on noisy synthetic data.

For each train noise level (incorrect and incomplete captions in equal parts; val and test stay clean) it
trains the tiny model at an equal budget (same data, epochs, global batch and seed) with each variant:

    clip            the CLIP loss only (no noise estimator)
    harmonization   + the noise estimator and noise-harmonization (L_NITC with omega = lambda * epsilon, and the
                    caption loss weighted by the clean probability)
    completion      + the noise estimator and noise-completion, lambda = 0 (no L_NITC re-weighting)
    nlip            both: the full method

then evaluates each run on the clean test split: zero-shot top-1 and retrieval R@1 both ways (the run's own
end-of-training evaluation) and caption CIDEr (`nlip-ds eval --task caption`), and reads the estimator's
noise-detection AUC at its last refit. It writes the table and PNG plots (per-sample loss histograms with the
fitted mixture at several epochs, coloured by ground truth; ROC of noise detection; metric bars per variant)
into a markdown report.

    python benchmarks/noise_robustness.py                        # the full report -> docs/results.md
    python benchmarks/noise_robustness.py --levels 0.5 --variants clip nlip --seeds 1 --samples 400 \\
        --epochs 2 --out /tmp/report --doc /tmp/report/results.md        # a toy run

Runs are plain single processes (world size 1, DeepSpeed ZeRO-3 as in any run), `--jobs` at a time with the
cores split between them. A finished run (summary.json and caption scores present) is reused, so an
interrupted report continues where it stopped; `--fresh` retrains everything. A failed run is reported as
failed (its log is in its run folder) and the report goes on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "clip": ["noise.enabled=false", "completion.enabled=false"],
    "harmonization": ["noise.enabled=true", "completion.enabled=false"],
    "completion": ["noise.enabled=true", "noise.lambda_=0.0", "completion.enabled=true"],
    "nlip": ["noise.enabled=true", "completion.enabled=true"],
}
METRICS = (("zeroshot_top1", "zero-shot top-1"), ("i2t_r1", "i2t R@1"), ("t2i_r1", "t2i R@1"),
           ("cider", "CIDEr"), ("auc", "noise AUC"))


@dataclass
class Run:
    level: float
    variant: str
    seed: int
    folder: Path
    data: Path
    metrics: dict = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0
    reused: bool = False

    @property
    def name(self) -> str:
        return self.folder.name


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/noise_robustness", help="data and run folders")
    p.add_argument("--doc", default="docs/results.md", help="the markdown report (plots go to <doc stem>/)")
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.2, 0.5], help="train noise rates")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=1, help="seeds per setting")
    p.add_argument("--seeds-at-max-level", type=int, default=2, help="seeds at the highest noise level")
    p.add_argument("--samples", type=int, default=4000, help="training samples per dataset (the demo's)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (the demo's)")
    p.add_argument("--batch", type=int, default=64, help="global batch (one process)")
    p.add_argument("--caption-samples", type=int, default=200, help="test images captioned for CIDEr")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (the cores are split between them)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides applied to every variant (e.g. noise.warmup_epochs=3)")
    args = p.parse_args(argv)
    if not 0 < args.jobs <= 16 or args.seeds < 1 or args.samples < 10 or args.epochs < 1:
        p.error("--jobs must be in 1..16, --seeds >= 1, --samples >= 10, --epochs >= 1")
    bad = [lvl for lvl in args.levels if not 0.0 <= lvl < 1.0]
    if bad:
        p.error(f"--levels must lie in [0, 1): {bad}")
    return args


# ------------------------------------------------------------------------------------------------ running


def nlip_ds(*args: str, log: Path, threads: int) -> None:
    """Run `python -m nlip_ds.cli ARGS` with its output in `log`; raise with the log's tail on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)  # one plain process each, whatever launched the report
    with open(log, "a") as out:
        status = subprocess.run([sys.executable, "-m", "nlip_ds.cli", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT).returncode
    if status != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"`nlip-ds {args[0]}` exited with {status}; the end of {log}:\n" + "\n".join(tail))


def make_data(out: Path, level: float, samples: int) -> Path:
    data = out / "data" / f"noise{round(level * 100):02d}"
    if not (data / "train" / "index.json").is_file():
        data.parent.mkdir(parents=True, exist_ok=True)
        print(f"[report] synthesizing {samples} training samples at noise {level:.0%} -> {data}", flush=True)
        log = data.parent / f"{data.name}.log"
        nlip_ds("data", "synth", "--out", str(data), "--num-samples", str(samples), "--seed", "0",
                "--incorrect-rate", str(level / 2), "--incomplete-rate", str(level / 2), "--overwrite",
                log=log, threads=os.cpu_count() or 1)
    return data


def finished(run: Run) -> bool:
    return (run.folder / "summary.json").is_file() and (run.folder / "eval" / "caption.json").is_file()


def train_and_score(run: Run, args: argparse.Namespace, threads: int) -> Run:
    start = time.monotonic()
    timing = run.folder / "seconds.txt"  # wall time of training and captioning, kept for a reused run
    try:
        run.reused = not args.fresh and finished(run)
        if not run.reused:
            if run.folder.exists():
                shutil.rmtree(run.folder)  # a run that did not finish: start it again
            run.folder.mkdir(parents=True)
            train(run, args, threads)
            caption(run, args, threads)
            timing.write_text(f"{time.monotonic() - start:.1f}\n")
        run.metrics = collect(run)
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the report
        run.error = str(exc)
    run.seconds = float(timing.read_text()) if timing.is_file() else time.monotonic() - start
    status = "failed" if run.error else ", ".join(f"{k} {v:.3f}" for k, v in run.metrics.items())
    print(f"[report] {run.name}: {status} ({run.seconds:.0f} s)", flush=True)
    return run


def train(run: Run, args: argparse.Namespace, threads: int) -> None:
    log = run.folder / "train.log"
    nlip_ds("train", "--config", args.config, f"data.train={run.data / 'train'}", f"data.val={run.data / 'val'}",
            f"data.test={run.data / 'test'}", f"data.tokenizer={run.data / 'tokenizer'}",
            f"completion.vocabulary={run.data / 'concepts.txt'}",
            f"train.output_dir={run.folder / 'run'}", f"train.seed={run.seed}", f"train.epochs={args.epochs}",
            f"train.micro_batch_size={args.batch}", "data.workers=0", "monitor.progress=false",
            "monitor.save_refit_data=true", *VARIANTS[run.variant],
            *args.overrides, log=log, threads=threads)
    shutil.copy(run.folder / "run" / "summary.json", run.folder / "summary.json")


def caption(run: Run, args: argparse.Namespace, threads: int) -> None:
    (run.folder / "eval").mkdir(exist_ok=True)
    nlip_ds("eval", "--checkpoint", str(run.folder / "run"), "--task", "caption", "--data", str(run.data / "test"),
            "--max-samples", str(args.caption_samples), "--out", str(run.folder / "eval" / "caption.json"),
            "--no-tensorboard", log=run.folder / "caption.log", threads=threads)


def collect(run: Run) -> dict:
    summary = json.loads((run.folder / "summary.json").read_text())
    scores = json.loads((run.folder / "eval" / "caption.json").read_text())["metrics"]
    metrics = {k: float(summary["eval"][k]) for k in ("zeroshot_top1", "i2t_r1", "t2i_r1") if k in summary["eval"]}
    metrics["cider"] = float(scores["cider"])
    if "noise/auc" in summary.get("noise", {}):
        metrics["auc"] = float(summary["noise"]["noise/auc"])
    return metrics


def plan(args: argparse.Namespace, out: Path) -> list[Run]:
    runs = []
    top = max(args.levels)
    for level in args.levels:
        data = make_data(out, level, args.samples)
        seeds = max(args.seeds, args.seeds_at_max_level) if level == top and level > 0 else args.seeds
        for variant in args.variants:
            for seed in range(seeds):
                folder = out / "runs" / f"noise{round(level * 100):02d}-{variant}-seed{seed}"
                runs.append(Run(level, variant, seed, folder, data))
    return runs


# ------------------------------------------------------------------------------------------------ report


def aggregate(runs: list[Run]) -> dict:
    """(level, variant) -> metric -> list of per-seed values (finished runs only)."""
    table: dict = {}
    for run in runs:
        cell = table.setdefault((run.level, run.variant), {})
        for key, value in run.metrics.items():
            cell.setdefault(key, []).append(value)
    return table


def fmt(values: list[float] | None) -> str:
    if not values:
        return "-"
    if any(math.isnan(v) for v in values):
        return "n/a"  # e.g. detection AUC without noisy pairs
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def refit_files(run: Run) -> list[Path]:
    return sorted((run.folder / "run" / "noise").glob("refit_*.pt"))


def plot_histograms(run: Run, figures: Path) -> list[Path]:
    """The fitted mixture over the per-sample losses at the first, middle and last refit of `run`."""
    from nlip_ds.noise.gmm import GMMFit
    from nlip_ds.noise.plots import render_fit_histogram

    files = refit_files(run)
    chosen = sorted({0, len(files) // 2, len(files) - 1}) if files else []
    paths = []
    for i in chosen:
        record = torch.load(files[i], weights_only=True)
        path = figures / f"hist_{run.name}_epoch{record['epoch']:02d}.png"
        render_fit_histogram(GMMFit.from_state_dict(record["fit"]), record["losses"], record["flags"].long(),
                             path=path)
        paths.append(path)
    return paths


def roc_curve(scores: torch.Tensor, flags: torch.Tensor) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) over every threshold of `scores`; flags 1 noisy, 0 clean."""
    known = flags >= 0
    scores, flags = scores[known].double(), flags[known].long()
    order = torch.argsort(scores, descending=True)
    positives = flags[order].cumsum(0).double()
    negatives = (1 - flags[order]).cumsum(0).double()
    tpr = positives / max(int(flags.sum()), 1)
    fpr = negatives / max(int((1 - flags).sum()), 1)
    return [0.0] + fpr.tolist(), [0.0] + tpr.tolist()


def plot_roc(runs: list[Run], level: float, figures: Path) -> Path | None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.4), dpi=100)
    ax = fig.add_subplot()
    drawn = 0
    for run in runs:
        files = refit_files(run)
        if run.level != level or run.seed != 0 or not files:
            continue
        record = torch.load(files[-1], weights_only=True)
        if not bool((record["flags"] == 1).any()):
            continue  # nothing noisy to detect (0% noise)
        fpr, tpr = roc_curve(record["epsilon"], record["flags"].long())
        ax.plot(fpr, tpr, label=f"{run.variant} (AUC {run.metrics.get('auc', float('nan')):.3f})")
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (noisy flagged)")
    ax.set_title(f"noise detection at the last refit, {level:.0%} noise")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = figures / f"roc_noise{round(level * 100):02d}.png"
    fig.savefig(path)
    return path


def plot_bars(table: dict, levels: list[float], variants: list[str], figures: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(METRICS), 3.6), dpi=100)
    width = 0.8 / len(variants)
    for m, (key, title) in enumerate(METRICS):
        ax = fig.add_subplot(1, len(METRICS), m + 1)
        for v, variant in enumerate(variants):
            means = [statistics.mean(table.get((lvl, variant), {}).get(key) or [float("nan")]) for lvl in levels]
            ax.bar([i + v * width for i in range(len(levels))], means, width, label=variant)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(levels))], [f"{lvl:.0%}" for lvl in levels])
        ax.set_title(title)
        ax.set_xlabel("train noise")
    fig.axes[0].legend(fontsize="small")
    fig.tight_layout()
    path = figures / "metrics_by_variant.png"
    fig.savefig(path)
    return path


def write_report(runs: list[Run], args: argparse.Namespace, doc: Path, elapsed: float, command: str) -> None:
    figures = doc.parent / doc.stem
    figures.mkdir(parents=True, exist_ok=True)
    table = aggregate(runs)
    levels, variants = sorted(set(args.levels)), list(args.variants)
    lines = ["# Noise-robustness report", "",
             f"Produced by `{command}` on this machine ({os.cpu_count()} cores, {args.jobs} run(s) at a time): "
             f"the runs took {sum(r.seconds for r in runs) / 60:.1f} minutes of training and captioning in "
             f"total, this call {elapsed / 60:.1f} minutes of wall time ({sum(r.reused for r in runs)} of "
             f"{len(runs)} runs reused from an earlier call). Synthetic data (`nlip-ds data synth`, "
             f"{args.samples} training samples, incorrect and incomplete captions in equal parts, clean test "
             f"split), config `{args.config}` with {args.epochs} epochs, global batch {args.batch}, one process per "
             "run" + (f", overrides `{' '.join(args.overrides)}`" if args.overrides else "") + ". "
             "Mean ± standard deviation over seeds where a setting has more than one.", "",
             "| train noise | variant | seeds | " + " | ".join(t for _, t in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for level in levels:
        for variant in variants:
            group = [r for r in runs if r.level == level and r.variant == variant]
            done = [r for r in group if not r.error]
            cell = table.get((level, variant), {})
            lines.append(f"| {level:.0%} | {variant} | {len(done)}/{len(group)} | "
                         + " | ".join(fmt(cell.get(k)) for k, _ in METRICS) + " |")
    failed = [r for r in runs if r.error]
    if failed:
        lines += ["", "Failed runs (their logs are in the run folders):", ""]
        lines += [f"- `{r.name}`: {r.error.splitlines()[0]}" for r in failed]
    lines += ["", "`-` marks a metric a variant does not produce (no estimator, no AUC) or a failed run; `n/a` an "
              "AUC without noisy pairs to detect (0% noise).", ""]
    bars = plot_bars(table, levels, variants, figures)
    lines += ["## Metrics by variant", "", f"![metrics]({figures.name}/{bars.name})", ""]
    top = max(levels)
    for level in levels:
        roc = plot_roc(runs, level, figures)
        if roc is not None:
            lines += [f"## Noise detection at {level:.0%} noise", "", f"![roc]({figures.name}/{roc.name})", ""]
    focus = next((r for r in runs if r.level == top and r.variant == "nlip" and r.seed == 0 and refit_files(r)),
                 next((r for r in runs if r.level == top and refit_files(r)), None))
    if focus is not None:
        lines += [f"## Per-sample losses and the fitted mixture ({focus.name})", "",
                  "Stacked histograms of the per-sample contrastive loss at a refit, clean and noisy pairs by the "
                  "ground truth the synthetic data stores, with the two fitted Gaussians.", ""]
        lines += [f"![histogram]({figures.name}/{p.name})" for p in plot_histograms(focus, figures)]
        lines.append("")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
    (Path(args.out) / "results.json").write_text(json.dumps(
        [{"level": r.level, "variant": r.variant, "seed": r.seed, "metrics": r.metrics, "error": r.error,
          "seconds": round(r.seconds, 1)} for r in runs], indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    command = "python benchmarks/noise_robustness.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.monotonic()
    runs = plan(args, out)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"[report] {len(runs)} runs, {args.jobs} at a time with {threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda r: train_and_score(r, args, threads), runs))
    doc = Path(args.doc).resolve()
    write_report(runs, args, doc, time.monotonic() - start, command.strip())
    print(f"[report] wrote {doc} ({sum(not r.error for r in runs)}/{len(runs)} runs finished)", flush=True)
    return 1 if all(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
