"""Noise detection works in a real training run, not only in the estimator's unit tests: `nlip-ds train` with
the demo's config on synthetic data at the demo's noise (30% incorrect, 20% incomplete captions), one process,
must reach a detection AUC above a floor at its last refit. Marked slow (about 80 s on 2 cores)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Measured: 0.919 at the last refit of this run (2,000 samples, 8 epochs, 2 of warm-up); 4 epochs on 1,000
# samples gave 0.595 (too short to learn), a model that learned nothing sits near 0.5, and the demo's 10 epochs
# on 4,000 samples reach 0.966 (README).
AUC_FLOOR = 0.85


@pytest.mark.slow
def test_training_run_detects_the_noisy_pairs(tmp_path):
    from nlip_ds.data.synthetic import synthesize

    data = tmp_path / "data"
    synthesize(data, 2000, incorrect_rate=0.3, incomplete_rate=0.2, seed=5)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
           f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"data.test={data / 'test'}",
           f"data.tokenizer={tmp_path / 'tokenizer'}", f"train.output_dir={run}", "train.epochs=8",
           "noise.warmup_epochs=2", "data.workers=0", "monitor.progress=false", "monitor.tensorboard=false",
           "eval.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    noise = json.loads((run / "summary.json").read_text())["noise"]
    assert noise["noise/true_rate"] == pytest.approx(0.5, abs=0.01)
    assert noise["noise/auc"] > AUC_FLOOR, noise
