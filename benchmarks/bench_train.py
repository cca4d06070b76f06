"""Training throughput of the tiny config, and the share of step time spent in the noise machinery.

Runs the real entry point (`nlip-ds train`, under the deepspeed launcher for world size 2) on synthetic data for
a fixed number of steps and reads samples/s from the run's metrics.jsonl (the mean over the logged steps after
the first log, so start-up and the first steps are excluded). The noise machinery (per-step all-gather of
per-sample losses into the bank, omega lookup, the soft-target term, GMM refits) is measured as an A/B:
the same run with noise.enabled=false; its share is 1 - (samples/s with noise) / (samples/s without).

    python benchmarks/bench_train.py [--steps 60] [--repeats 2] [--data DIR]

Prints a table; copy it into docs/performance.md with the command.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nlip_ds.distributed import free_port  # noqa: E402


def ensure_data(path: Path) -> Path:
    if not (path / "train" / "index.json").is_file():
        subprocess.run([sys.executable, "-m", "nlip_ds.cli", "data", "synth", "--out", str(path), "--num-samples",
                        "4000", "--shard-size", "250"], cwd=ROOT, check=True)
    return path


def run(data: Path, world: int, steps: int, noise: bool, workdir: Path) -> float:
    run_dir = workdir / f"ws{world}-noise{int(noise)}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data.train={data / 'train'}", f"data.test={data / 'test'}", f"data.tokenizer={data / 'tokenizer'}",
                 f"train.output_dir={run_dir}", f"train.max_steps={steps}", "train.epochs=100",
                 f"noise.enabled={str(noise).lower()}", "noise.warmup_epochs=0", "eval.enabled=false",
                 "monitor.log_every=5", "monitor.progress=false", "monitor.tensorboard=false"]
    train = ["--module", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml", *overrides]
    if world == 1:
        cmd = [sys.executable, "-m", *train[1:]]  # python -m nlip_ds.cli train ...
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world), "--master_port",
               str(free_port()), *train]
    threads = max(1, (os.cpu_count() or 1) // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["throughput/samples_per_s"] for line in lines if "throughput/samples_per_s" in line]
    return rates[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=ROOT / "demo_data")
    args = parser.parse_args()
    data = ensure_data(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for world in (1, 2):
            with_noise, without = [], []
            for _ in range(args.repeats):  # alternate, so drifting machine load hits both variants alike
                with_noise.append(run(data, world, args.steps, True, Path(tmp)))
                without.append(run(data, world, args.steps, False, Path(tmp)))
            a, b = statistics.median(with_noise), statistics.median(without)
            rows.append((world, a, b, 1 - a / b))
            print(f"world size {world}: with noise {with_noise}, without {without}", file=sys.stderr)
    print(f"tiny config (configs/tiny-cpu.yaml), {args.steps} steps, median of {args.repeats} alternating runs each, "
          f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"{'world size':>10} | {'samples/s (NLIP)':>16} | {'samples/s (noise off)':>21} | {'noise share':>11}")
    for world, a, b, share in rows:
        print(f"{world:>10} | {a:>16.1f} | {b:>21.1f} | {share:>10.1%}")
    print(f"scaling 1 -> 2 ranks: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
