"""benchmarks/noise_robustness.py: the report's own arithmetic, and the whole script at a toy size."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlip_ds.noise.metrics import detection_auc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "noise_robustness.py"


def _report_module():
    spec = importlib.util.spec_from_file_location("noise_robustness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_roc_curve_area_equals_the_detection_auc():
    report = _report_module()
    g = torch.Generator().manual_seed(0)
    flags = (torch.rand(500, generator=g) < 0.4).long()
    scores = torch.rand(500, generator=g) + 0.5 * flags  # distinct scores, noisy ones higher on average
    flags[:7] = -1  # unknown ground truth is left out of both
    fpr, tpr = report.roc_curve(scores, flags)
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert fpr[-1] == pytest.approx(1.0) and tpr[-1] == pytest.approx(1.0)
    assert area == pytest.approx(detection_auc(scores, flags), abs=1e-9)


def test_mean_and_spread_over_seeds_are_formatted():
    report = _report_module()
    assert report.fmt(None) == "-"
    assert report.fmt([0.5]) == "0.500"
    assert report.fmt([0.2, 0.4]) == "0.300 ± 0.141"
    assert report.fmt([float("nan")]) == "n/a"


@pytest.mark.slow
def test_report_runs_end_to_end_at_a_toy_size(tmp_path):
    doc = tmp_path / "results.md"
    cmd = [sys.executable, str(SCRIPT), "--levels", "0.5", "--variants", "clip", "harmonization", "--seeds", "1",
           "--seeds-at-max-level", "1", "--samples", "200", "--epochs", "2", "--caption-samples", "10",
           "--out", str(tmp_path / "out"), "--doc", str(doc), "noise.warmup_epochs=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["variant"], r["error"]) for r in runs] == [("clip", ""), ("harmonization", "")]
    for run in runs:
        assert {"zeroshot_top1", "i2t_r1", "t2i_r1", "cider"} <= set(run["metrics"])
        assert all(0.0 <= v <= 10.0 for v in run["metrics"].values())
    assert "auc" not in runs[0]["metrics"] and 0.0 <= runs[1]["metrics"]["auc"] <= 1.0
    text = doc.read_text()
    assert "| 50% | clip | 1/1 |" in text and "| 50% | harmonization | 1/1 |" in text
    figures = sorted(p.name for p in (tmp_path / "results").glob("*.png"))
    assert "metrics_by_variant.png" in figures and "roc_noise50.png" in figures
    assert any(name.startswith("hist_noise50-harmonization-seed0_epoch") for name in figures)
    assert all((tmp_path / "results" / name).stat().st_size > 1000 for name in figures)
    # a second call reuses the finished runs instead of training again
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "synthesizing" not in again.stdout
    assert "(2 of 2 runs reused from an earlier call)" in doc.read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())[0]["metrics"] == runs[0]["metrics"]
