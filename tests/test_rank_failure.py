"""Rank failure on the plain multi-process path (RANK/WORLD_SIZE set per process, as torchrun or SLURM srun start
them; no launcher that would kill the other ranks when one dies).

- kill -9 of one rank mid-training: the other ranks exit non-zero, long before the collective timeout, with an
  error that names the lost rank (rank 1 of 3, and rank 0, which hosts the rendezvous store, of 2);
- SIGTERM to one rank: every rank checkpoints after the same step and exits 0 (preemption).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nlip_ds.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD_S = 240  # survivors that waited for the collective timeout (600 s below) would hit this first


def _start(synth_dir: Path, run_dir: Path, world: int) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
           f"data.train={synth_dir / 'train'}", f"data.test={synth_dir / 'test'}",
           f"data.tokenizer={run_dir.parent / 'tokenizer'}", f"train.output_dir={run_dir}", "data.workers=0",
           "train.micro_batch_size=8", "eval.enabled=false", "monitor.progress=false", "monitor.log_every=1",
           "train.max_steps=400", "train.collective_timeout_s=600"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    return [subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def _wait_for_steps(run_dir: Path, procs: list[subprocess.Popen], steps: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert all(p.poll() is None for p in procs), "a rank ended before training got going"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=HANG_GUARD_S)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("world,victim", [(3, 1), (2, 0)])
def test_killed_rank_is_named_by_the_survivors(synth_dir, tmp_path, world, victim):
    run = tmp_path / "run"
    procs = _start(synth_dir, run, world)
    _wait_for_steps(run, procs, 2)
    procs[victim].send_signal(signal.SIGKILL)
    results = _finish([p for r, p in enumerate(procs) if r != victim])
    for rc, err in results:
        assert rc != 0, err[-3000:]
        assert f"lost rank {victim} (" in err, err[-3000:]
        assert "Timed out" not in err, "the survivors waited for the collective timeout"
        assert "RankLostError" in err


@pytest.mark.slow
@pytest.mark.dist
def test_sigterm_on_one_rank_checkpoints_every_rank_and_exits_cleanly(synth_dir, tmp_path):
    run = tmp_path / "run"
    procs = _start(synth_dir, run, 2)
    _wait_for_steps(run, procs, 2)
    procs[1].send_signal(signal.SIGTERM)
    results = _finish(procs)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    marker = json.loads((run / "preempted.json").read_text())
    assert marker["signal"] == "another rank's signal"  # rank 0 writes the marker; rank 1 got the signal
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert marker["checkpoint"] == tag
    assert sorted(p.name for p in (run / "checkpoints" / tag).glob("rank_state_*.pt")) == [
        "rank_state_00000.pt", "rank_state_00001.pt"]
