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
                           "1", "--batch", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = dict(re.findall(r"^\s*(\S+) \|\s+[\d.]+ \|\s+([\d.]+)$", proc.stdout, re.M))
    assert set(rows) == {"bare", "zero2", "zero2+noise", "zero3", "zero3+noise"} and rows["bare"] == "1.00"
