"""Noise-completion on vs off at equal training budget, on synthetic data whose captions are 40% incomplete and
never incorrect (the issue's "Measured").

Trains the tiny model twice with the same data, seed, epochs and batch (`nlip-ds train`, configs/tiny-cpu.yaml),
once with completion.enabled=false and once with true, then prints side by side:

- the share of synthetic captions in the final caption store that name every object of their image (by the
  object list stored with each synthetic sample: "red circle" must appear in the caption), next to the same
  share for the training captions the synthetic ones replace and for all training captions;
- the end-of-training evaluation of each run: zero-shot top-1 and image->text / text->image retrieval R@1;
- the training time of each run (steps x global batch / the run's own samples/s, startup and evaluation left
  out) and the share completion adds to it.

    python benchmarks/bench_completion.py --out runs/bench_completion --samples 1000 --epochs 6
    python benchmarks/bench_completion.py --out runs/bench_time --samples 250 --epochs 3 --warmup-epochs 1 \
        --start-epoch 1 --procs 2      # the time cost under ZeRO-3 on 2 CPU ranks
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_completion", help="work folder (data, two run folders)")
    p.add_argument("--samples", type=int, default=1000, help="training samples")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--warmup-epochs", type=int, default=2, help="noise.warmup_epochs (E_w)")
    p.add_argument("--start-epoch", type=int, default=3, help="completion.start_epoch (E_c)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch size")
    p.add_argument("--budget", type=int, default=8, help="completion.per_step_budget")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the training process")
    p.add_argument("--procs", type=int, default=1, help="training processes (ZeRO-3 ranks; >1 uses the deepspeed "
                   "launcher on CPU)")
    return p.parse_args()


def make_data(out: Path, samples: int) -> Path:
    from nlip_ds.data.synthetic import synthesize

    data = out / "data"
    synthesize(data, samples, incorrect_rate=0.0, incomplete_rate=0.4, val_samples=samples // 5,
               test_samples=samples // 5, shard_size=max(50, samples // 8), seed=0)
    return data


def train(args, data: Path, run: Path, completion: bool) -> dict:
    overrides = [f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"data.test={data / 'test'}",
                 f"data.tokenizer={data / 'tokenizer'}", f"train.output_dir={run}", "data.workers=0",
                 f"train.epochs={args.epochs}", f"train.micro_batch_size={args.batch}",
                 f"noise.warmup_epochs={args.warmup_epochs}", "monitor.progress=false", "monitor.log_every=20",
                 f"optim.warmup_steps={max(1, args.samples // args.batch)}",
                 f"completion.enabled={str(completion).lower()}", f"completion.start_epoch={args.start_epoch}",
                 f"completion.vocabulary={data / 'concepts.txt'}", f"completion.per_step_budget={args.budget}",
                 "completion.refresh_concepts_every=20"]
    launch = [sys.executable, "-m"] if args.procs == 1 else [str(Path(sys.executable).parent / "deepspeed"),
                                                             "--num_gpus", str(args.procs), "--module"]
    cmd = [*launch, "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"training failed ({run}):\n{proc.stderr[-4000:]}")
    return {**json.loads((run / "summary.json").read_text()), "train_seconds": train_seconds(run, args)}


def train_seconds(run: Path, args) -> float:
    """Training time from the last logged throughput: it is the mean samples/s since the run started."""
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in logged if "throughput/samples_per_s" in m][-1]
    return last["step"] * args.batch * args.procs / last["throughput/samples_per_s"]


def ground_truth(data: Path) -> dict[int, dict]:
    """sample id -> the json sidecar (objects, noise_type) of every training sample."""
    truth = {}
    for shard in sorted((data / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    caption = tar.extractfile(member.name[:-5] + ".txt").read().decode()
                    truth[meta["sample_id"]] = {**meta, "caption": caption}
    return truth


def names_all(caption: str, objects: list[str]) -> bool:
    text = " ".join(caption.lower().split())
    return all(name in text for name in objects)


def final_captions(run: Path) -> dict:
    ckpt = run / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    for path in sorted((ckpt / tag).glob("*model_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("completion"):
            return state["completion"]["captions"]
    sys.exit(f"no caption store in {ckpt / tag}")


def caption_shares(run: Path, data: Path) -> dict:
    from nlip_ds.data.tokenizer import load_tokenizer

    truth = ground_truth(data)
    store = final_captions(run)
    ids = store["ids"].tolist()
    synthetic = load_tokenizer(data / "tokenizer").decode(store["tokens"].long())
    share = lambda flags: sum(flags) / max(1, len(flags))
    return {"synthetic_captions": len(ids),
            "synthetic_name_all": share([names_all(c, truth[i]["objects"]) for i, c in zip(ids, synthetic)]),
            "replaced_originals_name_all": share([names_all(truth[i]["caption"], truth[i]["objects"]) for i in ids]),
            "replaced_incomplete_share": share([truth[i]["noise_type"] == "incomplete" for i in ids]),
            "all_train_name_all": share([names_all(t["caption"], t["objects"]) for t in truth.values()])}


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    data = make_data(out, args.samples)
    runs = {"off": out / "completion_off", "on": out / "completion_on"}
    summaries = {name: train(args, data, run, name == "on") for name, run in runs.items()}
    shares = caption_shares(runs["on"], data)
    print(f"\nsynthetic data: {args.samples} train samples, 40% incomplete, 0% incorrect; {args.epochs} epochs, "
          f"E_w {args.warmup_epochs}, E_c {args.start_epoch}, batch {args.batch}, {args.procs} process(es)")
    print(f"synthetic captions in the caption store: {shares['synthetic_captions']} "
          f"({shares['replaced_incomplete_share']:.1%} of them for incomplete pairs)")
    print(f"share naming all objects: synthetic {shares['synthetic_name_all']:.1%} | the originals they replace "
          f"{shares['replaced_originals_name_all']:.1%} | all training captions {shares['all_train_name_all']:.1%}")
    print(f"\n{'metric':<16}{'off':>10}{'on':>10}")
    for key in ("zeroshot_top1", "i2t_r1", "t2i_r1"):
        values = [summaries[name]["eval"].get(key, float("nan")) for name in ("off", "on")]
        print(f"{key:<16}{values[0]:>10.4f}{values[1]:>10.4f}")
    seconds = [summaries[name]["train_seconds"] for name in ("off", "on")]
    print(f"{'train seconds':<16}{seconds[0]:>10.1f}{seconds[1]:>10.1f}   completion adds "
          f"{seconds[1] / seconds[0] - 1:+.1%}")
    (out / "bench_completion.json").write_text(json.dumps({"args": vars(args), "shares": shares,
                                                           "eval": {k: s["eval"] for k, s in summaries.items()},
                                                           "train_seconds": {k: s["train_seconds"]
                                                                             for k, s in summaries.items()}},
                                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
