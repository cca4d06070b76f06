"""benchmarks/noisy_correspondence.py end to end at toy size (two cells, one seed): data, training, the report
section in the document, resumption. Marked slow: about two minutes on 2 cores."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "benchmarks/noisy_correspondence.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_toy_benchmark_writes_its_section_and_resumes(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkept text\n")
    args = ["--levels", "0.5", "--incomplete-levels", "--variants", "clip", "harmonization", "oracle", "--seeds", "1",
            "--multi-seed-levels", "--epochs", "2", "--jobs", "2", "--out", str(tmp_path / "nc"), "--doc", str(doc),
            "noise.warmup_epochs=1", "noise.trust_ratio=2.0"]
    out = _bench(*args)
    results = json.loads((tmp_path / "nc" / "results.json").read_text())
    assert [(r["variant"], r["level"], r["error"]) for r in results] == [("clip", 0.5, ""), ("harmonization", 0.5, ""),
                                                                         ("oracle", 0.5, "")]
    clip, harmonization, oracle = (r["metrics"] for r in results)
    for metrics in (clip, harmonization, oracle):
        assert {"zeroshot_top1", "linear_probe_top1", "i2t_r1", "t2i_r1"} <= metrics.keys()
        assert 0.0 <= metrics["zeroshot_top1"] <= 1.0
    assert "auc" in harmonization and "auc" not in clip
    text = doc.read_text()
    assert text.startswith("# Results\n\nkept text\n")
    assert "<!-- noisy-correspondence:digits -->" in text and "| shuffle | 50% | harmonization | 1/1 |" in text
    assert "raw pixels" in text and (tmp_path / "results" / "noisy_correspondence_digits.png").is_file()
    assert "| shuffle | 50% | oracle | 1/1 |" in text and "auc" in oracle  # the fits still run beside the oracle
    assert "3 runs" in out

    out = _bench(*args)  # a second call reuses the finished runs and replaces the section
    assert out.count(", reused)") == 3
    assert doc.read_text().count("<!-- noisy-correspondence:digits -->") == 1

    _bench(*args, "--section", "digits-toy")  # a second report beside the first, with its own plot
    text = doc.read_text()
    assert text.count("<!-- noisy-correspondence:digits -->") == 1
    assert text.count("<!-- noisy-correspondence:digits-toy -->") == 1
    assert "## Noisy correspondence: digits (digits-toy)" in text
    assert (tmp_path / "results" / "noisy_correspondence_digits-toy.png").is_file()
