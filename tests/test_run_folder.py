"""An output folder that holds another run is refused before any work, naming the folder, unless the run resumes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlip_ds.config import ConfigError, load_config
from nlip_ds.train.loop import RUN_FILES, check_run_folder

ROOT = Path(__file__).resolve().parent.parent


def _cfg(run_dir: Path, *overrides: str):
    return load_config(None, [f"train.output_dir={run_dir}", *overrides])


def test_a_new_or_empty_folder_or_one_without_a_run_is_accepted(tmp_path):
    check_run_folder(_cfg(tmp_path / "new"))
    check_run_folder(_cfg(tmp_path))
    (tmp_path / "notes.txt").write_text("not a run")
    check_run_folder(_cfg(tmp_path))


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_folder_with_a_previous_run_is_refused_unless_resuming(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(ConfigError) as err:
        check_run_folder(_cfg(tmp_path))
    assert str(tmp_path) in str(err.value) and name in str(err.value)
    assert "train.resume=latest" in str(err.value) and "train.output_dir" in str(err.value)
    check_run_folder(_cfg(tmp_path, "train.resume=latest"))


def test_cli_refuses_before_writing_anything(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    cmd = [sys.executable, "-m", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
           f"train.output_dir={run}", f"data.tokenizer={tmp_path / 'tokenizer'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"train.output_dir: {run} holds a previous run (metrics.jsonl)" in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert not (tmp_path / "tokenizer").exists()
