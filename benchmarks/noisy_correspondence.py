"""Noisy-correspondence benchmark: NLIP against the CLIP loss on real labelled images, by the standard protocol.

The data is scikit-learn's handwritten digits turned into captioned pairs (`nlip-ds data digits`: varied
templates, a stratified train/val/test split) or, with `--dataset synthetic`, the synthetic shapes of
`nlip-ds data synth`. Noise enters the training split only, by the protocol used since NCR (NeurIPS 2021):

    shuffle      a fraction r of the pairs has its captions permuted among themselves (noisy: index changed;
                 on the synthetic data, captions of another class's image)
    incomplete   a fraction r of the captions is replaced by non-descriptive web-style strings

Each cell trains the tiny model at an equal budget (same data, config, epochs, global batch) with each variant:

    clip           the CLIP loss only (no noise estimator)
    harmonization  the noise estimator and noise-harmonization (the config's L_NITC form)
    harmonization-rank
                   harmonization with the rank assignment (`noise.epsilon=rank`, `noise.em_init=median`,
                   `noise.trust_ratio=0.9`: docs/noise.md, "Rank assignment"); not in the default grid
    nlip           harmonization and noise-completion: the full method
    oracle         harmonization with perfect detection from the first step (`noise.oracle`: ε is the data's own
                   noise label, `noise.warmup_epochs=0`): the ceiling of any detector at this budget. Not in the
                   default grid, and not run at r = 0, where it is the CLIP loss

and reads, on the clean test split: zero-shot top-1, the linear probe's top-1 (logistic regression on the
learned image features of the training images with their true labels, scored on the test images), retrieval
R@1 both ways, and the estimator's detection AUC at its last refit. A logistic regression on the raw pixels of
the same images is the reference the learned features must beat.

    python benchmarks/noisy_correspondence.py                      # the full report -> docs/results.md
    python benchmarks/noisy_correspondence.py --levels 0 0.5 --variants clip harmonization --seeds 1 \\
        --incomplete-levels --epochs 2 --out /tmp/nc --doc /tmp/nc/report.md           # a toy run

Levels default to r = 0, 0.2, 0.5, 0.8 (shuffle) and 0.5 (incomplete); 3 seeds at r = 0 and 0.5 (both kinds),
1 elsewhere. The seed is the training seed (model init, data order, augmentation); the split and the noise are
fixed (data seed 0), so the seeds of a cell differ in training alone.
Runs are single processes (DeepSpeed ZeRO-3 at world size 1), `--jobs` at a time with the cores split between
them; a finished run is reused, so an interrupted benchmark continues where it stopped (`--fresh` retrains).
The report goes into the section between `<!-- noisy-correspondence:SECTION -->` markers of --doc (appended
when absent; SECTION is --section, by default the dataset), so the digits and synthetic reports, and a report
at another budget, live side by side in docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from noise_robustness import fmt, nlip_ds  # noqa: E402

VARIANTS = {
    "clip": ["noise.enabled=false", "completion.enabled=false"],
    "harmonization": ["noise.enabled=true", "completion.enabled=false"],
    "harmonization-rank": ["noise.enabled=true", "noise.epsilon=rank", "noise.em_init=median", "noise.trust_ratio=0.9",
                           "completion.enabled=false"],
    "nlip": ["noise.enabled=true", "completion.enabled=true"],
    "oracle": ["noise.enabled=true", "noise.oracle=true", "noise.warmup_epochs=0", "completion.enabled=false"],
}
DEFAULT_VARIANTS = ("clip", "harmonization", "nlip")
METRICS = (("zeroshot_top1", "zero-shot top-1"), ("linear_probe_top1", "linear probe"), ("i2t_r1", "i2t R@1"),
           ("t2i_r1", "t2i R@1"), ("auc", "noise AUC"))
DATASETS = {"digits": {"epochs": 12}, "synthetic": {"epochs": 10, "samples": 4000}}


@dataclass
class Run:
    kind: str
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
    p.add_argument("--dataset", choices=list(DATASETS), default="digits")
    p.add_argument("--out", default=None, help="data and run folders (default runs/noisy_correspondence/DATASET)")
    p.add_argument("--doc", default="docs/results.md", help="markdown report (plots go to <doc stem>/)")
    p.add_argument("--section", default=None, help="name of the report's section of --doc and of its plot "
                   "(default: the dataset's; another name keeps a second report, e.g. at another budget, beside it)")
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--levels", type=float, nargs="*", default=[0.0, 0.2, 0.5, 0.8], help="shuffle noise rates")
    p.add_argument("--incomplete-levels", type=float, nargs="*", default=[0.5], help="incomplete noise rates")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                   help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds at the --multi-seed-levels")
    p.add_argument("--multi-seed-levels", type=float, nargs="*", default=[0.0, 0.5],
                   help="levels that get --seeds seeds (the others get one)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (digits 12, synthetic 10: the demo's)")
    p.add_argument("--samples", type=int, default=4000, help="synthetic training samples (the demo's)")
    p.add_argument("--batch", type=int, default=32, help="global batch (one process)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (the cores are split between them)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")
    args = p.parse_args(argv)
    args.epochs = args.epochs or DATASETS[args.dataset]["epochs"]
    args.out = args.out or f"runs/noisy_correspondence/{args.dataset}"
    args.section = args.section or args.dataset
    if not 0 < args.jobs <= 16 or args.seeds < 1 or args.epochs < 1 or args.samples < 10:
        p.error("--jobs must be in 1..16, --seeds >= 1, --epochs >= 1, --samples >= 10")
    bad = [lvl for lvl in args.levels + args.incomplete_levels if not 0.0 <= lvl < 1.0]
    if bad:
        p.error(f"noise levels must lie in [0, 1): {bad}")
    if not args.levels and not args.incomplete_levels:
        p.error("no noise level to run")
    return args


# ------------------------------------------------------------------------------------------------ running


def make_data(args: argparse.Namespace, out: Path, kind: str, level: float) -> Path:
    data = out / "data" / f"{kind}{round(level * 100):02d}"
    if not (data / "test" / "index.json").is_file():
        data.parent.mkdir(parents=True, exist_ok=True)
        print(f"[nc] making {args.dataset} data, {kind} noise {level:.0%} -> {data}", flush=True)
        log = data.parent / f"{data.name}.log"
        if args.dataset == "digits":
            nlip_ds("data", "digits", "--out", str(data), "--noise-rate", str(level), "--noise-kind", kind,
                    log=log, threads=os.cpu_count() or 1)
        else:
            rate = "--incorrect-rate" if kind == "shuffle" else "--incomplete-rate"
            other = "--incomplete-rate" if kind == "shuffle" else "--incorrect-rate"
            nlip_ds("data", "synth", "--out", str(data), "--num-samples", str(args.samples), "--seed", "0",
                    rate, str(level), other, "0", "--overwrite", log=log, threads=os.cpu_count() or 1)
    # The tokenizer now, once: the variants of a cell train at the same time and would each train it.
    from nlip_ds.config import load_config
    from nlip_ds.data.tokenizer import ensure_tokenizer

    ensure_tokenizer(str(data / "tokenizer"), str(data / "train"), data / "tokenizer",
                     load_config(args.config, list(args.overrides)).data.vocab_size)
    return data


def train_and_score(run: Run, args: argparse.Namespace, threads: int) -> Run:
    start = time.monotonic()
    timing = run.folder / "seconds.txt"
    try:
        run.reused = not args.fresh and (run.folder / "summary.json").is_file()
        if not run.reused:
            if run.folder.exists():
                shutil.rmtree(run.folder)  # a run that did not finish: start it again
            run.folder.mkdir(parents=True)
            train(run, args, threads)
            timing.write_text(f"{time.monotonic() - start:.1f}\n")
        run.metrics = collect(run)
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the benchmark
        run.error = str(exc)
    run.seconds = float(timing.read_text()) if timing.is_file() else time.monotonic() - start
    status = "failed" if run.error else ", ".join(f"{k} {v:.3f}" for k, v in run.metrics.items())
    print(f"[nc] {run.name}: {status} ({run.seconds:.0f} s{', reused' if run.reused else ''})", flush=True)
    return run


def train(run: Run, args: argparse.Namespace, threads: int) -> None:
    d = run.data
    nlip_ds("train", "--config", args.config, f"data.train={d / 'train'}", f"data.val={d / 'val'}",
            f"data.test={d / 'test'}", f"data.tokenizer={d / 'tokenizer'}",
            f"completion.vocabulary={d / 'concepts.txt'}",
            f"eval.probe_data={d / 'train'}", "eval.tasks=[zeroshot,retrieval,linear_probe]",
            f"train.output_dir={run.folder / 'run'}", f"train.seed={run.seed}", f"train.epochs={args.epochs}",
            f"train.micro_batch_size={args.batch}", "data.workers=0", "monitor.progress=false",
            "monitor.tensorboard=false", *VARIANTS[run.variant], *args.overrides,
            log=run.folder / "train.log", threads=threads)
    shutil.copy(run.folder / "run" / "summary.json", run.folder / "summary.json")


def collect(run: Run) -> dict:
    summary = json.loads((run.folder / "summary.json").read_text())
    metrics = {k: float(summary["eval"][k]) for k, _ in METRICS if k in summary.get("eval", {})}
    if "noise/auc" in summary.get("noise", {}):
        metrics["auc"] = float(summary["noise"]["noise/auc"])
    if run.variant == "nlip" and (run.folder / "run" / "checkpoints" / "latest").is_file():
        from bench_completion import caption_shares

        shares = caption_shares(run.folder / "run", run.data)
        metrics.update(captions_generated=shares["synthetic_captions"], captions_kept=shares["kept_captions"])
        if shares["kept_captions"]:
            metrics.update(synthetic_names_class=shares["kept_name_main"],
                           originals_name_class=shares["kept_originals_name_main"])
    return metrics


def plan(args: argparse.Namespace, out: Path) -> list[Run]:
    runs = []
    cells = [("shuffle", lvl) for lvl in args.levels] + [("incomplete", lvl) for lvl in args.incomplete_levels
                                                        if lvl > 0]
    for kind, level in cells:
        data = make_data(args, out, kind, level)
        seeds = args.seeds if level in args.multi_seed_levels else 1
        for variant in args.variants:
            if variant == "oracle" and level == 0:
                continue  # no noisy pair: ε is 0 throughout, the CLIP loss
            for seed in range(seeds):
                folder = out / "runs" / f"{kind}{round(level * 100):02d}-{variant}-seed{seed}"
                runs.append(Run(kind, level, variant, seed, folder, data))
    return runs


def raw_pixel_probe(data: Path) -> float:
    """Top-1 of a logistic regression on the raw pixels (the eval transform's, flattened): train -> test."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    from nlip_ds.data.samples import eval_transform
    from nlip_ds.eval.data import open_records

    def load(split: str):
        pixels, labels = [], []
        for record in open_records(str(data / split)):
            if record.label >= 0:
                raw = record.image if isinstance(record.image, bytes) else Path(record.image).read_bytes()
                image = Image.open(io.BytesIO(raw)).convert("RGB")
                pixels.append(eval_transform(image, 32).float().flatten().numpy() / 255.0)
                labels.append(record.label)
        return np.stack(pixels), np.array(labels)

    x_train, y_train = load("train")
    x_test, y_test = load("test")
    return float(LogisticRegression(max_iter=3000).fit(x_train, y_train).score(x_test, y_test))


# ------------------------------------------------------------------------------------------------ report


def cell_values(runs: list[Run], kind: str, level: float, variant: str, key: str) -> list[float]:
    return [r.metrics[key] for r in runs
            if (r.kind, r.level, r.variant) == (kind, level, variant) and key in r.metrics]


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def paired_gains(runs: list[Run], level: float, variant: str, key: str, *, kind: str = "shuffle",
                 baseline: str = "clip") -> list[float]:
    """The variant's metric minus the baseline's at the same seed (the same init and data order), seed order."""
    by_seed = {r.seed: r.metrics[key] for r in runs
               if (r.kind, r.level, r.variant) == (kind, level, baseline) and key in r.metrics}
    return [r.metrics[key] - by_seed[r.seed] for r in sorted(runs, key=lambda r: r.seed)
            if (r.kind, r.level, r.variant) == (kind, level, variant) and key in r.metrics
            and r.seed in by_seed]


def summary_lines(runs: list[Run], args: argparse.Namespace) -> list[str]:
    """The issue's criteria at r = 0.5 (shuffle): NLIP's retention of its own clean accuracy, the share of the
    CLIP loss's drop it recovers, and whether every NLIP seed beats every CLIP seed; and the gain over the CLIP
    loss seed by seed, which the spread between seeds (larger than the gain at this size) does not hide."""
    lines = []
    key = "zeroshot_top1"
    clip0, clip50 = (cell_values(runs, "shuffle", lvl, "clip", key) for lvl in (0.0, 0.5))
    for variant in [v for v in args.variants if v != "clip"]:
        own0, own50 = (cell_values(runs, "shuffle", lvl, variant, key) for lvl in (0.0, 0.5))
        if variant == "oracle":
            own0 = clip0  # with no noisy pair the oracle is the CLIP loss (not run at r = 0)
        if not (clip0 and clip50 and own0 and own50):
            continue
        lost = mean(clip0) - mean(clip50)
        recovered = (mean(own50) - mean(clip50)) / lost if lost > 0 else float("nan")
        lines.append(f"- {variant} at 50% shuffled captions: keeps {mean(own50) / mean(own0):.0%} of its own 0%-noise "
                     f"zero-shot accuracy ({mean(own50):.3f} / {mean(own0):.3f}), recovers {recovered:.0%} of the "
                     f"{lost:.3f} the CLIP loss loses to the noise; every seed above every CLIP seed: "
                     f"{'yes' if min(own50) > max(clip50) else 'no'} ({', '.join(f'{v:.3f}' for v in own50)} vs "
                     f"{', '.join(f'{v:.3f}' for v in clip50)}).")
        gains = paired_gains(runs, 0.5, variant, key)
        if gains:
            lines.append(f"  Gain over the CLIP loss at the same seed: {', '.join(f'{g:+.3f}' for g in gains)} "
                         f"({sum(g > 0 for g in gains)} of {len(gains)} seeds ahead).")
    for level in sorted({r.level for r in runs if r.kind == "incomplete"}):  # issue 19: completion's own gain
        for title, metric in (("zero-shot", key), ("i2t R@1", "i2t_r1"), ("t2i R@1", "t2i_r1")):
            gains = paired_gains(runs, level, "nlip", metric, kind="incomplete", baseline="harmonization")
            if gains:
                lines.append(f"- nlip against harmonization alone at {level:.0%} incomplete captions, {title} at the "
                             f"same seed: {', '.join(f'{g:+.3f}' for g in gains)} ({sum(g > 0 for g in gains)} of "
                             f"{len(gains)} seeds ahead).")
    return lines


CAPTIONS = (("captions_generated", "synthetic captions"), ("captions_kept", "kept by the filter"),
            ("synthetic_names_class", "kept, naming the class"),
            ("originals_name_class", "their originals, naming it"))


def caption_table(runs: list[Run]) -> list[str]:
    """What the NLIP runs' final caption stores hold, against the ground truth (benchmarks/bench_completion.py)."""
    cells = sorted({(r.kind, r.level) for r in runs if r.variant == "nlip" and "captions_generated" in r.metrics},
                   key=lambda c: (c[0] != "shuffle", c[1]))
    if not cells:
        return []
    lines = ["Synthetic captions of the nlip runs: the final caption store against each training image's class "
             "(a caption names the class when it holds its name or numeral); the filter keeps a caption only if "
             "the model's embeddings put it closer to the image than the original and than the batch's median "
             "clean pair (`completion.filter`, `completion.filter_to_clean`).", "",
             "| noise | r | " + " | ".join(t for _, t in CAPTIONS) + " |", "|---|---|" + "---|" * len(CAPTIONS)]
    for kind, level in cells:
        counts = [_spread(cell_values(runs, kind, level, "nlip", k), "{:.0f}") for k, _ in CAPTIONS[:2]]
        shares = [_spread(cell_values(runs, kind, level, "nlip", k), "{:.1%}") for k, _ in CAPTIONS[2:]]
        lines.append(f"| {kind} | {level:.0%} | " + " | ".join(counts + shares) + " |")
    return lines + [""]


def _spread(values: list[float], form: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return form.format(values[0])
    return f"{form.format(mean(values))} ± {form.format(statistics.stdev(values))}"


def plot(runs: list[Run], args: argparse.Namespace, figures: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 3.6), dpi=100)
    levels = sorted(set(args.levels))
    for m, (key, title) in enumerate(METRICS[:2]):
        ax = fig.add_subplot(1, 2, m + 1)
        for variant in args.variants:
            cells = [cell_values(runs, "shuffle", lvl, variant, key) for lvl in levels]
            xs = [lvl for lvl, c in zip(levels, cells) if c]
            ys = [mean(c) for c in cells if c]
            errs = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cells if c]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=variant)
        ax.set_xlabel("shuffled captions r")
        ax.set_title(title)
    fig.axes[0].legend(fontsize="small")
    fig.tight_layout()
    figures.mkdir(parents=True, exist_ok=True)
    path = figures / f"noisy_correspondence_{args.section}.png"
    fig.savefig(path)
    return path


def report(runs: list[Run], args: argparse.Namespace, doc: Path, elapsed: float, command: str,
           pixels: float | None) -> str:
    figures = doc.parent / doc.stem
    chart = plot(runs, args, figures)
    source = ("scikit-learn's handwritten digits (`nlip-ds data digits`: 1,197 train / 200 val / 400 test images, "
              "10 classes)" if args.dataset == "digits" else
              f"synthetic shapes (`nlip-ds data synth`, {args.samples} training samples, 8 classes)")
    title = args.dataset if args.section == args.dataset else f"{args.dataset} ({args.section})"
    lines = [f"## Noisy correspondence: {title}", "",
             f"Produced by `{command}` ({os.cpu_count()} cores, {args.jobs} run(s) at a time): the runs took "
             f"{sum(r.seconds for r in runs) / 60:.1f} minutes in total, this call {elapsed / 60:.1f} minutes of "
             f"wall time ({sum(r.reused for r in runs)} of {len(runs)} runs reused). Data: {source}; config "
             f"`{args.config}`, {args.epochs} epochs, global batch {args.batch}, one process per run"
             + (f", overrides `{' '.join(args.overrides)}`" if args.overrides else "") + ". Metrics on the clean "
             "test split; mean ± standard deviation over seeds where a cell has more than one.", ""]
    if pixels is not None:
        lines += [f"Reference: logistic regression on the raw pixels of the same train/test images reaches "
                  f"**{pixels:.3f}** top-1 (the linear probe's setting).", ""]
    lines += ["| noise | r | variant | seeds | " + " | ".join(t for _, t in METRICS) + " |",
              "|---|---|---|---|" + "---|" * len(METRICS)]
    cells = sorted({(r.kind, r.level) for r in runs}, key=lambda c: (c[0] != "shuffle", c[1]))
    for kind, level in cells:
        for variant in args.variants:
            group = [r for r in runs if (r.kind, r.level, r.variant) == (kind, level, variant)]
            if not group:  # the oracle at r = 0
                continue
            done = [r for r in group if not r.error]
            lines.append(f"| {kind} | {level:.0%} | {variant} | {len(done)}/{len(group)} | "
                         + " | ".join(fmt(cell_values(runs, kind, level, variant, k) or None) for k, _ in METRICS)
                         + " |")
    failed = [r for r in runs if r.error]
    if failed:
        lines += ["", "Failed runs (their logs are in the run folders):", ""]
        lines += [f"- `{r.name}`: {r.error.splitlines()[0]}" for r in failed]
    lines += ["", "`-`: no estimator (no AUC); `n/a`: no noisy pair to detect.", ""]
    lines += summary_lines(runs, args)
    lines += [""] + caption_table(runs)
    lines += [f"![accuracy against noise]({figures.name}/{chart.name})", ""]
    return "\n".join(lines)


def write_section(doc: Path, section: str, text: str) -> None:
    """Replace (or append) the section between this section's markers, leaving the rest of the document."""
    start, end = f"<!-- noisy-correspondence:{section} -->", f"<!-- /noisy-correspondence:{section} -->"
    old = doc.read_text() if doc.is_file() else ""
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = (old.rstrip() + "\n\n" if old else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    command = "python benchmarks/noisy_correspondence.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.monotonic()
    runs = plan(args, out)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"[nc] {len(runs)} runs, {args.jobs} at a time with {threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda r: train_and_score(r, args, threads), runs))
    pixels = raw_pixel_probe(runs[0].data) if args.dataset == "digits" else None
    doc = Path(args.doc).resolve()
    text = report(runs, args, doc, time.monotonic() - start, command.strip(), pixels)
    write_section(doc, args.section, text)
    (out / "results.json").write_text(json.dumps(
        [{"kind": r.kind, "level": r.level, "variant": r.variant, "seed": r.seed, "metrics": r.metrics,
          "error": r.error, "seconds": round(r.seconds, 1)} for r in runs], indent=2) + "\n")
    print(text)
    print(f"[nc] wrote {doc} ({sum(not r.error for r in runs)}/{len(runs)} runs finished)", flush=True)
    return 1 if all(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
