"""Training options beyond the defaults: LAMB, gradient accumulation, ZeRO-2 and ZeRO-3 with CPU offload,
streaming refits (noise.refit_every), pruning to train.keep_last checkpoints."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlip_ds.config import load_config
from nlip_ds.train.optim import Lamb, build_optimizer

ROOT = Path(__file__).resolve().parent.parent


def test_lamb_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([0.5, -1.0])
    opt = Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)
    opt.step()
    update = torch.sign(torch.tensor([0.5, -1.0]))  # bias-corrected Adam's first step is the sign
    trust = 5.0 / update.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * trust * update)


def test_build_optimizer_by_name():
    params = [{"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.0}]
    assert isinstance(build_optimizer(params, load_config(None, ["optim.name=lamb"]).optim), Lamb)
    assert isinstance(build_optimizer(params, load_config(None).optim), torch.optim.AdamW)


def _train(synth_dir: Path, run_dir: Path, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
           f"data.train={synth_dir / 'train'}", f"data.test={synth_dir / 'test'}",
           f"data.tokenizer={run_dir.parent / 'tokenizer'}", f"train.output_dir={run_dir}", "data.workers=0",
           "train.micro_batch_size=16", "eval.enabled=false", "monitor.progress=false", "monitor.log_every=2",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("engine", [
    ("optim.name=lamb", "deepspeed.config=ds_configs/zero3.json"),  # LAMB's per-tensor trust ratios need ZeRO-3
    ("optim.name=adamw", "deepspeed.config=ds_configs/zero2.json"),
], ids=["lamb-zero3", "adamw-zero2"])
def test_accumulation_streaming_refits_and_pruning(synth_dir, tmp_path, engine):
    run = tmp_path / "run"
    metrics = _train(synth_dir, run, *engine, "train.grad_accum=2", "noise.warmup_epochs=0",
                     "noise.refit_every=96", "train.max_steps=8", "train.save_every=2", "train.keep_last=1")
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) >= 6 and all(torch.isfinite(torch.tensor(losses)))
    refit_steps = [m["step"] for m in metrics if "noise/rate" in m]
    assert len(refit_steps) >= 2, f"streaming refits every 96 samples, got refits at micro-steps {refit_steps}"
    tags = [p.name for p in (run / "checkpoints").iterdir() if p.is_dir()]
    assert tags == ["step16"], f"keep_last=1 should leave only the final checkpoint, found {tags}"


@pytest.mark.slow
def test_zero3_with_cpu_offload_trains(synth_dir, tmp_path):
    metrics = _train(synth_dir, tmp_path / "run", "deepspeed.config=ds_configs/zero3_offload.json",
                     "train.max_steps=4")
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 2 and losses[-1] < losses[0] + 1.0 and all(torch.isfinite(torch.tensor(losses)))
