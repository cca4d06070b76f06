"""Weak and strong scaling of one training step on CPU (gloo, ZeRO-3, the tiny config), with a step-time breakdown.

    python benchmarks/bench_scaling.py [--worlds 1 2 4] [--steps 8] [--weak-micro 32] [--strong-global 64]

Weak: micro-batch fixed per rank (global batch grows with the world size). Strong: global batch fixed.
Each world size runs in its own group of spawned processes on random batches (the data loader is measured by
benchmarks/bench_data.py). Per step, on rank 0, after one warm-up step:

    forward     the model's forward (ZeRO-3 parameter all-gathers included)
    loss        feature all-gather + fused contrastive loss + caption/MAE terms (task forward minus model forward)
    backward    engine.backward (gradient reduce-scatter and parameter re-gathers included)
    optimizer   engine.step
    noise       epsilon lookup by sample id + the per-sample loss all-gather into the bank
    collectives wall time inside torch.distributed calls, already part of the phases above

That world sizes give the same loss and epsilon is tests/test_train_equivalence.py's; the bytes per step are
benchmarks/comm_model.py's. On a machine with fewer cores than ranks the ranks share cores: the numbers then
measure contention, not scaling (the table says how many cores there were).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comm_model import ROOT, install_counter, new_counter  # noqa: E402  (benchmarks/ is not a package)

PHASES = ("forward", "loss", "backward", "optimizer", "noise", "collectives")
VOCAB = 64


def _batch(micro: int, rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(5, VOCAB, (micro, 12), generator=g)
    return {"image": torch.randn(micro, 3, 32, 32, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "sample_id": torch.arange(micro) + rank * micro + step * 10_000,
            "noise_type": torch.zeros(micro, dtype=torch.long), "pad": torch.zeros(micro, dtype=torch.bool)}


def _worker(rank: int, world: int, port: int, micro: int, steps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    comms = new_counter()
    install_counter(comms)  # before DeepSpeed binds the collectives
    from nlip_ds.config import load_config
    from nlip_ds.model import NLIPModel
    from nlip_ds.train import engine as E
    from nlip_ds.noise.estimator import NoiseEstimator
    from nlip_ds.train.task import NLIPTask

    cfg = load_config(str(ROOT / "configs/tiny-cpu.yaml"), [f"train.micro_batch_size={micro}",
                                                            "monitor.tensorboard=false"])
    E.init_distributed(cfg)
    torch.manual_seed(0)
    model = NLIPModel(cfg.model, vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2, sep_id=3)
    noise = NoiseEstimator(cfg.noise)
    engine = E.initialize(NLIPTask(model, cfg, noise), cfg, E.build_ds_config(cfg, world), total_steps=steps + 1)
    model_time = [0.0]
    model.register_forward_pre_hook(lambda *_: model_time.__setitem__(0, time.perf_counter()))
    model.register_forward_hook(lambda *_: model_time.__setitem__(0, time.perf_counter() - model_time[0]))
    rows = []
    for step in range(steps + 1):
        batch = _batch(micro, rank, step)
        comms.clear()
        t0 = time.perf_counter()
        weights = noise.weights(batch["sample_id"])
        t1 = time.perf_counter()
        terms = engine(batch, weights.omega, weights.clean_prob)
        t2 = time.perf_counter()
        engine.backward(terms["loss"])
        t3 = time.perf_counter()
        engine.step()
        t4 = time.perf_counter()
        noise.observe(batch["sample_id"], terms["per_sample_loss"])
        t5 = time.perf_counter()
        rows.append({"forward": model_time[0], "loss": (t2 - t1) - model_time[0], "backward": t3 - t2,
                     "optimizer": t4 - t3, "noise": (t1 - t0) + (t5 - t4), "total": t5 - t0,
                     "collectives": sum(c["seconds"] for c in comms.values())})
    if rank == 0:
        torch.save(rows[1:], out)  # the first step pays one-time set-up
    torch.distributed.barrier()


def run(world: int, micro: int, steps: int) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(world, port, micro, steps, out), nprocs=world, join=True)
        rows = torch.load(out, weights_only=True)
    med = {k: statistics.median(r[k] for r in rows) for k in (*PHASES, "total")}
    med["samples_per_s"] = micro * world / med["total"]
    return med


def table(title: str, results: list[tuple[int, int, dict]]) -> str:
    base = results[0][2]["samples_per_s"] / results[0][0]
    lines = [f"{title}", "", "| ranks | micro | global | " + " | ".join(f"{p} ms" for p in PHASES)
             + " | step ms | samples/s | efficiency |", "|" + "---|" * (len(PHASES) + 6)]
    for world, micro, m in results:
        eff = m["samples_per_s"] / (base * world) if "weak" in title else \
            m["samples_per_s"] / results[0][2]["samples_per_s"] / world
        lines.append(f"| {world} | {micro} | {micro * world} | "
                     + " | ".join(f"{m[p] * 1e3:.1f}" for p in PHASES)
                     + f" | {m['total'] * 1e3:.1f} | {m['samples_per_s']:.0f} | {eff:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--weak-micro", type=int, default=32)
    parser.add_argument("--strong-global", type=int, default=64)
    args = parser.parse_args()
    weak = [(w, args.weak_micro, run(w, args.weak_micro, args.steps)) for w in args.worlds]
    strong = [(w, args.strong_global // w, run(w, args.strong_global // w, args.steps)) for w in args.worlds]
    print(f"{os.cpu_count()} CPU cores, 1 thread per rank, tiny config, ZeRO-3 over gloo, median of {args.steps} "
          "steps after one warm-up\n")
    print(table(f"weak scaling (micro-batch {args.weak_micro} per rank); efficiency = samples/s per rank "
                "relative to 1 rank", weak))
    print()
    print(table(f"strong scaling (global batch {args.strong_global}); efficiency = speed-up / ranks", strong))


if __name__ == "__main__":
    main()
