"""Multi-node launches without SLURM, on one machine: two "nodes" of one rank each must train exactly as one node
with two ranks (same per-step losses), through

- `deepspeed --num_nodes 2 --no_ssh --node_rank {0,1} --hostfile H --master_addr 127.0.0.1` (two launchers);
- `torchrun --nnodes 2 --node_rank {0,1} --master_addr 127.0.0.1` (two agents).

That world sizes 1, 2 and 4 agree on one global batch is tests/test_train_equivalence.py's; this file checks
that the multi-node launch paths map ranks the same way as a single-node launch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nlip_ds.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIMEOUT = 600


def _train_args(synth_dir: Path, tok: Path, run_dir: Path) -> list[str]:
    return ["train", "--config", "configs/tiny-cpu.yaml", f"data.train={synth_dir / 'train'}",
            f"data.val={synth_dir / 'val'}", f"data.test={synth_dir / 'test'}", f"data.tokenizer={tok}",
            f"train.output_dir={run_dir}", "train.epochs=1", "train.micro_batch_size=16", "eval.enabled=false",
            "monitor.progress=false", "monitor.log_every=2", "monitor.tensorboard=false"]


def _run_all(cmds: list[list[str]]) -> None:
    """Start every command at once (the nodes of one job) and wait for all; fail with their output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    try:
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"{' '.join(p.args[:8])} ... failed:\n{out[-6000:]}"


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}


@pytest.fixture(scope="module")
def tokenizer(synth_dir, tmp_path_factory) -> Path:
    """One tokenizer for every run, so that only the launch differs."""
    from nlip_ds.data.tokenizer import ensure_tokenizer

    out = tmp_path_factory.mktemp("mn_tok") / "tokenizer"
    ensure_tokenizer(None, str(synth_dir / "train"), out, 256)
    return out


@pytest.fixture(scope="module")
def single_node(synth_dir, tokenizer, tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("one_node") / "run"
    _run_all([[str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
               "nlip_ds.cli", *_train_args(synth_dir, tokenizer, run)]])
    return _losses(run)


@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_two_launchers_no_ssh_match_one_node(single_node, synth_dir, tokenizer, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")  # names only label the nodes: --no_ssh never connects
    run, port = tmp_path / "run", str(free_port())
    _run_all([[str(BIN / "deepspeed"), "--num_nodes", "2", "--num_gpus", "1", "--no_ssh", "--node_rank", str(r),
               "--hostfile", str(hostfile), "--master_addr", "127.0.0.1", "--master_port", port, "--module",
               "nlip_ds.cli", *_train_args(synth_dir, tokenizer, run)] for r in (0, 1)])
    losses = _losses(run)
    assert losses.keys() == single_node.keys() and len(losses) >= 2
    for step, value in single_node.items():
        assert losses[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_nodes_match_one_node(single_node, synth_dir, tokenizer, tmp_path):
    run, port = tmp_path / "run", str(free_port())
    _run_all([[str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r),
               "--master_addr", "127.0.0.1", "--master_port", port, "-m", "nlip_ds.cli",
               *_train_args(synth_dir, tokenizer, run)] for r in (0, 1)])
    losses = _losses(run)
    assert losses.keys() == single_node.keys() and len(losses) >= 2
    for step, value in single_node.items():
        assert losses[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step


def test_single_process_without_master_port_takes_a_free_port():
    """Two plain `nlip-ds train` processes on one machine must not both bind the default port 29500."""
    from nlip_ds.distributed import DEFAULT_MASTER_PORT, resolve_topology

    t = resolve_topology({})
    assert t.launcher == "single" and t.master_port != DEFAULT_MASTER_PORT
    with socket.socket() as s:
        s.bind(("127.0.0.1", t.master_port))  # free at the time of asking
    assert resolve_topology({"MASTER_PORT": "1234"}).master_port == 1234
