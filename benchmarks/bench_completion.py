"""Noise-completion against harmonization alone at equal training budget, on synthetic data whose noise is
mostly incomplete captions (by default 40% incomplete, 10% incorrect: issue 19's setting).

Trains the tiny model (`nlip-ds train`, configs/tiny-cpu.yaml) with the same data, epochs and batch for each
variant and seed:

    harmonization   noise estimator and noise-harmonization, completion off
    nlip            + noise-completion with the caption filter (completion.filter=true, the default)
    nlip-unfiltered + noise-completion, every synthetic caption trained on (completion.filter=false)

and prints, as markdown:

- per variant, mean ± standard deviation over seeds of the end-of-training zero-shot top-1 and image->text /
  text->image retrieval R@1 (clean test split), and the training time (steps x global batch / the run's own
  samples/s: startup and evaluation left out);
- the gain of each completion variant over harmonization alone at the same seed (same init and data order);
- what the final caption stores hold, against the ground-truth object lists of the training samples: synthetic
  captions generated and kept by the filter, the share of kept ones that name their image's main object and
  every object, next to the same shares for the original captions they replace and for all training captions.

    python benchmarks/bench_completion.py                           # 3 seeds, the demo's budget (about 25 min)
    python benchmarks/bench_completion.py --out /tmp/bc --samples 250 --epochs 3 --warmup-epochs 1 \\
        --start-epoch 1 --seeds 1 --variants harmonization nlip      # a toy run
    python benchmarks/bench_completion.py --out runs/bench_time --samples 250 --epochs 3 --warmup-epochs 1 \\
        --start-epoch 1 --seeds 1 --procs 2       # the time cost under ZeRO-3 on 2 CPU ranks

A finished run is reused (`--fresh` retrains), so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "harmonization": ["completion.enabled=false"],
    "nlip": ["completion.enabled=true", "completion.filter=true"],
    "nlip-unfiltered": ["completion.enabled=true", "completion.filter=false"],
}
METRICS = (("zeroshot_top1", "zero-shot top-1"), ("i2t_r1", "i2t R@1"), ("t2i_r1", "t2i R@1"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_completion", help="work folder (data, run folders, report)")
    p.add_argument("--samples", type=int, default=4000, help="training samples (the demo's 4000)")
    p.add_argument("--incomplete-rate", type=float, default=0.4, help="share of incomplete training captions")
    p.add_argument("--incorrect-rate", type=float, default=0.1, help="share of incorrect training captions")
    p.add_argument("--epochs", type=int, default=10, help="epochs (the demo's 10)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="noise.warmup_epochs E_w (default: the config's)")
    p.add_argument("--start-epoch", type=int, default=None, help="completion.start_epoch E_c (default: the config's)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch size")
    p.add_argument("--budget", type=int, default=None, help="completion.per_step_budget (default: the config's)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (the cores are split between them)")
    p.add_argument("--procs", type=int, default=1, help="training processes per run (ZeRO-3 ranks; >1 uses the "
                   "deepspeed launcher on CPU and runs one run at a time)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")
    return p.parse_args(argv)


def make_data(args: argparse.Namespace, out: Path) -> Path:
    from nlip_ds.data.synthetic import synthesize

    data = out / "data"
    synthesize(data, args.samples, incorrect_rate=args.incorrect_rate, incomplete_rate=args.incomplete_rate,
               val_samples=args.samples // 5, test_samples=args.samples // 5, shard_size=max(50, args.samples // 8),
               seed=0, overwrite=True)
    # The tokenizer now, once: parallel runs would each train it into the same folder.
    from nlip_ds.config import load_config
    from nlip_ds.data.tokenizer import ensure_tokenizer

    ensure_tokenizer(str(data / "tokenizer"), str(data / "train"), data / "tokenizer",
                     load_config(str(ROOT / "configs" / "tiny-cpu.yaml"), []).data.vocab_size)
    return data


def train(args: argparse.Namespace, data: Path, run: Path, variant: str, seed: int, threads: int) -> dict:
    """Train one run (or reuse a finished one); its end-of-training summary with the training time."""
    if not args.fresh and (run / "summary.json").is_file():
        return {**json.loads((run / "summary.json").read_text()), "train_seconds": train_seconds(run, args)}
    shutil.rmtree(run, ignore_errors=True)
    overrides = [f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"data.test={data / 'test'}",
                 f"data.tokenizer={data / 'tokenizer'}", f"train.output_dir={run}", "data.workers=0",
                 f"train.seed={seed}", f"train.epochs={args.epochs}", f"train.micro_batch_size={args.batch}",
                 "monitor.progress=false", "monitor.log_every=20", "monitor.tensorboard=false",
                 f"completion.vocabulary={data / 'concepts.txt'}", *VARIANTS[variant], *args.overrides]
    if args.warmup_epochs is not None:
        overrides.append(f"noise.warmup_epochs={args.warmup_epochs}")
    if args.start_epoch is not None:
        overrides.append(f"completion.start_epoch={args.start_epoch}")
    if args.budget is not None:
        overrides.append(f"completion.per_step_budget={args.budget}")
    launch = [sys.executable, "-m"] if args.procs == 1 else [str(Path(sys.executable).parent / "deepspeed"),
                                                             "--num_gpus", str(args.procs), "--module"]
    cmd = [*launch, "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    run.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{run.name}.log", "w") as log:
        status = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if status:
        tail = (run.parent / f"{run.name}.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"training failed ({run}):\n" + "\n".join(tail))
    return {**json.loads((run / "summary.json").read_text()), "train_seconds": train_seconds(run, args)}


def train_seconds(run: Path, args) -> float:
    """Training time from the last logged throughput: it is the mean samples/s since the run started."""
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in logged if "throughput/samples_per_s" in m][-1]
    return last["step"] * args.batch * args.procs / last["throughput/samples_per_s"]


def ground_truth(data: Path) -> dict[int, dict]:
    """sample id -> the json sidecar (objects, noise_type) and the caption of every training sample."""
    truth = {}
    for shard in sorted((data / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    caption = tar.extractfile(member.name[:-5] + ".txt").read().decode()
                    truth[meta["sample_id"]] = {**meta, "caption": caption}
    return truth


def names(caption: str, name: str) -> bool:
    """Whether `name` ("seven", "red circle") appears in the caption as whole words."""
    text = " ".join(caption.lower().split())
    return re.search(rf"\b{re.escape(name.lower())}\b", text) is not None


def names_all(caption: str, objects: list[str]) -> bool:
    return all(names(caption, name) for name in objects)


def names_main(caption: str, meta: dict) -> bool:
    """Whether the caption names the sample's main object: the first of its object list (the only one on the
    digits, whose captions may also write the class as a numeral: "the number 7 written by hand")."""
    aliases = [str(meta["label"])] if "source_index" in meta else []  # nlip-ds data digits
    return any(names(caption, name) for name in meta["objects"][:1] + aliases)


def final_captions(run: Path) -> dict:
    ckpt = run / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    for path in sorted((ckpt / tag).glob("*model_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("completion"):
            return state["completion"]["captions"]
    raise FileNotFoundError(f"no caption store in {ckpt / tag}")


def caption_shares(run: Path, data: Path, truth: dict | None = None) -> dict:
    """What the final caption store holds, against the ground truth of the training samples: every synthetic
    caption, and those the caption filter kept (the ones trained on; all of them without the filter)."""
    from nlip_ds.data.tokenizer import load_tokenizer

    truth = truth if truth is not None else ground_truth(data)
    store = final_captions(run)
    ids = store["ids"].tolist()
    kept = store["kept"].tolist() if "kept" in store else [True] * len(ids)
    synthetic = load_tokenizer(data / "tokenizer").decode(store["tokens"].long())
    share = lambda flags: sum(flags) / max(1, len(flags))
    kept_ids = [i for i, k in zip(ids, kept) if k]
    kept_text = [c for c, k in zip(synthetic, kept) if k]
    return {"synthetic_captions": len(ids), "kept_captions": len(kept_ids),
            "synthetic_name_main": share([names_main(c, truth[i]) for i, c in zip(ids, synthetic)]),
            "kept_name_main": share([names_main(c, truth[i]) for i, c in zip(kept_ids, kept_text)]),
            "kept_originals_name_main": share([names_main(truth[i]["caption"], truth[i]) for i in kept_ids]),
            "all_train_name_main": share([names_main(t["caption"], t) for t in truth.values()]),
            "kept_incomplete_share": share([truth[i]["noise_type"] == "incomplete" for i in kept_ids]),
            "kept_name_all": share([names_all(c, truth[i]["objects"]) for i, c in zip(kept_ids, kept_text)]),
            "kept_originals_name_all": share([names_all(truth[i]["caption"], truth[i]["objects"])
                                              for i in kept_ids]),
            "all_train_name_all": share([names_all(t["caption"], t["objects"]) for t in truth.values()])}


def examples(run: Path, data: Path, truth: dict, count: int = 8) -> list[str]:
    """Markdown rows: kept synthetic captions of incomplete pairs beside their originals and ground truth."""
    from nlip_ds.data.tokenizer import load_tokenizer

    store = final_captions(run)
    kept = store["kept"].tolist() if "kept" in store else [True] * len(store["ids"])
    rows = [(i, r) for r, (i, k) in enumerate(zip(store["ids"].tolist(), kept))
            if k and truth[i]["noise_type"] == "incomplete"][:count]
    text = load_tokenizer(data / "tokenizer").decode(store["tokens"][[r for _, r in rows]].long()) if rows else []
    return [f"| {i} | {truth[i]['caption']} | {c} | {', '.join(truth[i]['objects'])} |"
            for (i, _), c in zip(rows, text)]


def spread(values: list[float], form: str = "{:.3f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return form.format(values[0])
    return f"{form.format(statistics.mean(values))} ± {form.format(statistics.stdev(values))}"


def report(args: argparse.Namespace, data: Path, results: dict) -> str:
    truth = ground_truth(data)
    lines = [f"Synthetic data: {args.samples} training samples, {args.incomplete_rate:.0%} incomplete and "
             f"{args.incorrect_rate:.0%} incorrect captions; configs/tiny-cpu.yaml, {args.epochs} epochs, batch "
             f"{args.batch}, {args.procs} process(es) per run, seeds 0-{args.seeds - 1}"
             + (f", E_w {args.warmup_epochs}" if args.warmup_epochs is not None else "")
             + (f", E_c {args.start_epoch}" if args.start_epoch is not None else "")
             + (f", overrides `{' '.join(args.overrides)}`" if args.overrides else "") + ".", "",
             "| variant | seeds | " + " | ".join(t for _, t in METRICS) + " | train seconds |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    for variant in args.variants:
        done = [s for s in results[variant].values() if s]
        lines.append(f"| {variant} | {len(done)}/{args.seeds} | "
                     + " | ".join(spread([s["eval"][k] for s in done if k in s.get("eval", {})]) for k, _ in METRICS)
                     + f" | {spread([s['train_seconds'] for s in done], '{:.0f}')} |")
    lines.append("")
    base = results.get("harmonization", {})
    for variant in [v for v in args.variants if v != "harmonization"]:
        for key, title in METRICS:
            gains = [s["eval"][key] - base[seed]["eval"][key] for seed, s in sorted(results[variant].items())
                     if s and base.get(seed)]
            if gains:
                lines.append(f"- {variant} against harmonization alone, {title} at the same seed: "
                             f"{', '.join(f'{g:+.3f}' for g in gains)} ({sum(g > 0 for g in gains)} of "
                             f"{len(gains)} ahead).")
        times = [s["train_seconds"] / base[seed]["train_seconds"] - 1 for seed, s in sorted(results[variant].items())
                 if s and base.get(seed)]
        if times:
            lines.append(f"- {variant}: training time {statistics.mean(times):+.0%} against harmonization alone.")
    lines += ["", "Final caption stores against the ground-truth object lists (kept: the captions trained on):", "",
              "| variant | synthetic captions | kept | kept naming the main object | their originals naming it "
              "| kept naming every object | their originals naming every object |",
              "|---|---|---|---|---|---|---|"]
    completing = [v for v in args.variants if v != "harmonization"]
    for variant in completing:
        shares = [caption_shares(ROOT / args.out / "runs" / f"{variant}-seed{seed}", data, truth)
                  for seed, s in sorted(results[variant].items()) if s]
        pick = lambda key, form="{:.1%}": spread([s[key] for s in shares], form)
        lines.append(f"| {variant} | {pick('synthetic_captions', '{:.0f}')} | {pick('kept_captions', '{:.0f}')} | "
                     f"{pick('kept_name_main')} | {pick('kept_originals_name_main')} | {pick('kept_name_all')} | "
                     f"{pick('kept_originals_name_all')} |")
    everything = list(truth.values())
    main_share = sum(names_main(t["caption"], t) for t in everything) / len(everything)
    all_share = sum(names_all(t["caption"], t["objects"]) for t in everything) / len(everything)
    lines += ["", f"All training captions: {main_share:.1%} name their image's main object, {all_share:.1%} every "
              "object."]
    if completing and results[completing[0]].get(0):
        rows = examples(ROOT / args.out / "runs" / f"{completing[0]}-seed0", data, truth)
        if rows:
            lines += ["", f"Kept synthetic captions of incomplete pairs ({completing[0]}, seed 0):", "",
                      "| sample | original caption | synthetic caption | objects in the image |", "|---|---|---|---|",
                      *rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = ROOT / args.out
    data = make_data(args, out)
    jobs = 1 if args.procs > 1 else max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    plan = [(variant, seed) for seed in range(args.seeds) for variant in args.variants]
    print(f"[bench_completion] {len(plan)} runs, {jobs} at a time with {threads} thread(s) each", flush=True)

    def one(item):
        variant, seed = item
        try:
            summary = train(args, data, out / "runs" / f"{variant}-seed{seed}", variant, seed, threads)
        except RuntimeError as exc:  # one failed run must not stop the others
            print(f"[bench_completion] {variant} seed {seed}: {exc}", flush=True)
            return item, None
        print(f"[bench_completion] {variant} seed {seed}: zero-shot {summary['eval'].get('zeroshot_top1', 0):.3f}, "
              f"{summary['train_seconds']:.0f} s of training", flush=True)
        return item, summary

    results = {v: {} for v in args.variants}
    with ThreadPoolExecutor(jobs) as pool:
        for (variant, seed), summary in pool.map(one, plan):
            results[variant][seed] = summary
    text = report(args, data, results)
    (out / "report.md").write_text(text)
    brief = lambda r: {"eval": r["eval"], "train_seconds": r["train_seconds"]} if r else None
    runs = {v: {str(seed): brief(r) for seed, r in by_seed.items()} for v, by_seed in results.items()}
    (out / "bench_completion.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2) + "\n")
    print(text)
    return 0 if all(r for runs in results.values() for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
