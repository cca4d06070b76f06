"""Non-finite steps on 2 gloo ranks under DeepSpeed ZeRO-3: a NaN on one rank makes both ranks skip the same
optimizer step (model, optimizer and schedule untouched) and training goes on; train.max_nonfinite_steps
skips in a row stop the run with a checkpoint of the last good state, from which it resumes.

The NaNs are injected by a test driver (below) that wraps the real entry point: nothing in nlip_ds knows about it.
Each rank is a plain process with RANK/WORLD_SIZE set, as torchrun or SLURM would start it.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlip_ds.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent

# Runs `nlip-ds train` with NaNs injected on rank INJECT["rank"] at the given train_step calls (0-based):
#   loss  - a constant NaN added to that rank's loss (its gradients stay finite without the guard),
#   image - that rank's images are NaN (the NaN reaches every rank's loss through the gathered embeddings),
#   grad  - the loss stays finite but its gradient is NaN (torch.where's gradient through a NaN branch).
# After every step it appends what it sees to probe_rank<r>.jsonl: engine counters, the scheduler position and
# digests of this rank's ZeRO-3 parameter and optimizer-state partitions.
DRIVER = r"""
import json, os, sys
import torch
import deepspeed.runtime.engine as ds_engine
from nlip_ds.train import loop, task

INJECT = json.loads(sys.argv[1])
RANK = int(os.environ["RANK"])
calls, now = [0], set()

def mine(kind):
    return RANK == INJECT["rank"] and kind in now

forward = task.NLIPTask.forward
def poisoned_forward(self, batch, omega, clean_prob):
    terms = forward(self, batch, omega, clean_prob)
    if mine("loss"):
        terms["loss"] = terms["loss"] + float("nan")
    return terms
task.NLIPTask.forward = poisoned_forward

backward = ds_engine.DeepSpeedEngine.backward
def poisoned_backward(self, loss, *args, **kwargs):
    if mine("grad"):
        loss = torch.where(torch.ones((), dtype=torch.bool), loss, torch.sqrt(loss - 1e9))
    return backward(self, loss, *args, **kwargs)
ds_engine.DeepSpeedEngine.backward = poisoned_backward

def digest(tensors):
    return [float(sum(t.double().sum() for t in tensors)), float(sum(t.double().abs().sum() for t in tensors))]

train_step = loop.train_step
def probed_train_step(engine, cfg, state, batch, acc, guard):
    now.clear()
    now.update(k for k in ("loss", "image", "grad") if calls[0] in INJECT.get(k, ()))
    if mine("image"):
        batch = {**batch, "image": torch.full(batch["image"].shape, float("nan"))}  # float: taken as normalized
    train_step(engine, cfg, state, batch, acc, guard)
    calls[0] += 1
    opt_state = [v for s in engine.optimizer.optimizer.state.values() for k, v in s.items() if k == "exp_avg"]
    steps = [float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s]
    record = {"call": calls[0] - 1, "step": state.step, "global_steps": engine.global_steps,
              "skipped_steps": engine.skipped_steps, "lr_epoch": engine.lr_scheduler.last_epoch,
              "params": digest([p.ds_tensor for p in engine.module.parameters()]), "exp_avg": digest(opt_state),
              "adam_steps": steps[:1], "nonfinite_skipped": state.nonfinite_skipped}
    with open(os.path.join(cfg.train.output_dir, f"probe_rank{RANK}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
loop.train_step = probed_train_step

from nlip_ds.cli import entry
entry(sys.argv[2:])
"""


def _launch(synth_dir: Path, run_dir: Path, inject: dict, *overrides: str, world: int = 2) -> list[tuple]:
    """Start `world` plain rank processes of the driver; (returncode, stderr) of each."""
    args = ["train", "--config", "configs/tiny-cpu.yaml", f"data.train={synth_dir / 'train'}",
            f"data.test={synth_dir / 'test'}", f"data.tokenizer={run_dir.parent / 'tokenizer'}",
            f"train.output_dir={run_dir}", "data.workers=0",
            "train.micro_batch_size=8", "eval.enabled=false", "monitor.progress=false", "monitor.log_every=1",
            "optim.warmup_steps=1", *overrides]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(inject), *args], cwd=ROOT,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, err))
    return results


def _probes(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"probe_rank{rank}.jsonl").read_text().splitlines()]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _unchanged(before: dict, after: dict) -> bool:
    return all(before[k] == after[k] for k in ("params", "exp_avg", "adam_steps", "lr_epoch"))


@pytest.mark.slow
@pytest.mark.dist
def test_a_nonfinite_step_is_skipped_on_every_rank_and_training_goes_on(synth_dir, tmp_path):
    run = tmp_path / "run"
    skipped_calls = {1: "loss not finite on rank(s) 1", 3: "loss not finite on rank(s) 0, 1",
                     4: "global gradient norm not finite"}
    results = _launch(synth_dir, run, {"rank": 1, "loss": [1], "image": [3], "grad": [4]}, "train.max_steps=6")
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    for rank in (0, 1):
        probes = _probes(run, rank)
        assert [p["call"] for p in probes] == list(range(6))
        for prev, cur in zip([None] + probes, probes):
            skipped = cur["call"] in skipped_calls
            assert cur["skipped_steps"] - (prev["skipped_steps"] if prev else 0) == int(skipped), cur
            if prev is not None:
                assert _unchanged(prev, cur) == skipped, f"rank {rank} call {cur['call']}: {prev} -> {cur}"
        assert probes[-1]["nonfinite_skipped"] == 3 and probes[-1]["global_steps"] == 6
    log = results[0][1]
    for call, cause in skipped_calls.items():
        assert f"step {call + 1} (optimizer step {call + 1}) skipped on every rank: {cause}" in log, log[-4000:]
    metrics = {m["step"]: m for m in _metrics(run)}
    assert [metrics[s]["train/nonfinite_skipped"] for s in range(1, 7)] == [0, 1, 1, 2, 3, 3]
    # Step 2's mean leaves out rank 1's NaN; step 4 had no finite loss on any rank; step 5's loss was finite.
    assert all(math.isfinite(metrics[s]["train/loss"]) for s in (1, 2, 3, 5, 6))
    assert math.isnan(metrics[4]["train/loss"])


@pytest.mark.slow
@pytest.mark.dist
def test_nonfinite_steps_in_a_row_stop_with_a_checkpoint_of_the_last_good_state(synth_dir, tmp_path):
    run = tmp_path / "run"
    results = _launch(synth_dir, run, {"rank": 1, "loss": [2, 3]}, "train.max_steps=8",
                      "train.max_nonfinite_steps=2")
    assert [rc for rc, _ in results] == [1, 1], results[0][1][-3000:] + results[1][1][-3000:]
    log = results[0][1]
    assert "stopped: 2 optimizer steps in a row were skipped" in log, log[-4000:]
    assert "loss not finite on rank(s) 1" in log and "train.max_nonfinite_steps=2" in log
    assert (run / "checkpoints" / "latest").read_text().strip() == "step4"
    for rank in (0, 1):
        probes = _probes(run, rank)
        assert [p["step"] for p in probes] == [1, 2, 3, 4]
        assert _unchanged(probes[1], probes[3]), "the skipped steps changed the model or optimizer state"

    results = _launch(synth_dir, run, {"rank": 1}, "train.max_steps=6", "train.resume=latest")
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-4000:]
    assert "resumed from" in results[0][1]
    resumed = _probes(run, 0)[4:]
    assert [p["step"] for p in resumed] == [5, 6] and resumed[0]["params"] != _probes(run, 0)[3]["params"]
    assert [m["train/nonfinite_skipped"] for m in _metrics(run) if m["step"] > 4] == [2, 2]


def _skip_counts_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from nlip_ds.train.loop import data_skip_metrics

    class Loader:  # what log_step reads: this epoch's skips by reason on this rank
        def stats(self):
            return {"skipped": [{"corrupt_image": 2, "empty_caption": 1}, {"corrupt_image": 3, "too_large": 4}][rank]}

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    metrics = data_skip_metrics(Loader())
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))


@pytest.mark.dist
def test_data_skip_counts_are_summed_over_ranks_by_reason(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_skip_counts_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    want = {"data/skipped/corrupt_image": 5, "data/skipped/empty_caption": 1, "data/skipped/too_large": 4}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == want
