"""benchmarks/bench_completion.py end to end at toy size (one seed, harmonization against completion with and
without the caption filter): training, the caption stores read against the ground truth, the report, reuse.
Marked slow: about three minutes on 2 cores."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "benchmarks/bench_completion.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_toy_completion_benchmark_reports_variants_and_caption_stores(tmp_path):
    out = tmp_path / "bc"
    args = ["--out", str(out), "--samples", "160", "--epochs", "2", "--warmup-epochs", "1", "--start-epoch", "1",
            "--batch", "16", "--seeds", "1", "--budget", "4",
            "noise.trust_ratio=10", "noise.max_rate=1",  # 2 epochs learn too little for the trust test
            "completion.max_tokens=8", "completion.min_tokens=2", "eval.tasks=[zeroshot,retrieval]"]
    stdout = _bench(*args)
    runs = json.loads((out / "bench_completion.json").read_text())["runs"]
    assert set(runs) == {"harmonization", "nlip", "nlip-unfiltered"}
    assert all(0.0 <= r["0"]["eval"]["zeroshot_top1"] <= 1.0 and r["0"]["train_seconds"] > 0 for r in runs.values())
    report = (out / "report.md").read_text()
    assert "40% incomplete and 10% incorrect" in report
    for variant in runs:
        assert f"| {variant} | 1/1 |" in report
    assert "nlip against harmonization alone, zero-shot top-1 at the same seed" in report

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_completion import caption_shares

    unfiltered = caption_shares(out / "runs" / "nlip-unfiltered-seed0", out / "data")
    filtered = caption_shares(out / "runs" / "nlip-seed0", out / "data")
    assert unfiltered["synthetic_captions"] > 0 and unfiltered["kept_captions"] == unfiltered["synthetic_captions"]
    assert filtered["synthetic_captions"] > 0 and filtered["kept_captions"] <= filtered["synthetic_captions"]
    assert f"| nlip-unfiltered | {unfiltered['synthetic_captions']} | {unfiltered['kept_captions']} |" in report
    assert "[bench_completion] 3 runs" in stdout

    trained = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    _bench(*args)  # finished runs are reused: nothing trains again
    assert len(trained) == 3 and {p: p.stat().st_mtime_ns for p in trained} == trained
    assert (out / "report.md").read_text() == report
