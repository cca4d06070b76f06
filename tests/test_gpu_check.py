"""scripts/gpu_check.sh --dry-run: every stage of the one-call GPU check runs on the CPU at tiny sizes and the
report lands in the given folder, so the script is known to work before a GPU is lent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["environment", "wheels", "build", "selfcheck", "loss", "tests", "train-tiny", "train-vitb32"]


@pytest.mark.slow
@pytest.mark.timeout(3000)  # eight stages, each a fresh python (and two DeepSpeed runs): minutes on a busy CPU
def test_dry_run_runs_every_stage_and_writes_the_report(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=2700)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == STAGES, proc.stdout[-3000:]
    failed = {n: s["detail"] for n, s in stages.items() if s["status"] not in ("ok", "skipped")}
    assert not failed and proc.returncode == 0, failed
    assert stages["selfcheck"]["data"]["ok"]
    loss = stages["loss"]["data"]
    assert loss["impl"] == "cpu" and loss["gemm_tflops"] > 0
    assert [r["n"] for r in loss["process"] + loss["rank"]] == [512, 128]
    for name in ("train-tiny", "train-vitb32"):
        assert stages[name]["data"]["status"] == 0 and stages[name]["data"]["peak_mib"] > 0, name
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| stage | status |" in markdown and "naive / fused" in markdown
