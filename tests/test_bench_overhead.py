"""benchmarks/bench_overhead.py runs (one rep of one step per variant at world size 1) and prints every variant's
ratio to the bare loop: a smoke test, so the benchmark keeps up with the training step it times. It checks no
timing (tests never check wall-clock time)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_overhead_benchmark_prints_a_ratio_per_variant():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "benchmarks/bench_overhead.py", "--world", "1", "--reps", "1", "--steps",
                           "1", "--batch", "4", "model.vision.depth=1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.startswith("tiny config with model.vision.depth=1, micro-batch 4")
    rows = dict(re.findall(r"^\s*(\S+) \|\s+[\d.]+ \|\s+([\d.]+)$", proc.stdout, re.M))
    assert set(rows) == {"bare", "zero2", "zero2+noise", "zero3", "zero3+noise", "zero3-hooked"}
    assert rows["bare"] == "1.00"


def test_a_bad_override_is_refused_before_any_process_starts():
    proc = subprocess.run([sys.executable, "benchmarks/bench_overhead.py", "model.vision.width=-3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "model.vision.width" in proc.stderr, proc.stderr[-2000:]
