"""Share of step time spent in the noise machinery, measured inside the training processes.

Each of `--world` gloo ranks builds the tiny model under DeepSpeed ZeRO-3 (as `nlip-ds train` does) and runs
`--steps` steps on a fixed random batch. Around every step it times, back to back:
  - the training step: engine forward (fused loss with omega), backward, optimizer step;
  - the per-step noise machinery: epsilon lookup by sample id, and the bank update (one all-gather of
    (id, loss, flag) rows from every rank, then the scatter into the bank);
and once, the GMM refit on one epoch's worth of losses (`--epoch-samples`), amortized over the steps of an
epoch. Timing both in the same processes, interleaved step by step, makes the ratio robust to machine load,
which A/B throughput runs on a shared 2-core machine are not.

    python benchmarks/bench_noise_share.py [--world 2] [--steps 40] [--micro-batch 32] [--epoch-samples 4000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.multiprocessing as mp

from nlip_ds.distributed import free_port

VOCAB = 256


def batch_for(rank: int, n: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(5, VOCAB, (n, 16), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def worker(rank: int, world: int, port: int, args, out: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from nlip_ds.config import load_config
    from nlip_ds.model import NLIPModel
    from nlip_ds.noise.bank import LossBank
    from nlip_ds.noise.gmm import fit_gmm
    from nlip_ds.noise.harmonize import NoiseState
    from nlip_ds.train import engine as E
    from nlip_ds.train.task import NLIPTask

    n = args.micro_batch
    cfg = load_config("configs/tiny-cpu.yaml", [f"train.micro_batch_size={n}", "monitor.tensorboard=false"])
    E.init_distributed(cfg)
    torch.manual_seed(0)
    model = NLIPModel(cfg.model, vocab_size=VOCAB, pad_id=0, bos_id=2, eos_id=3, sep_id=4)
    engine = E.initialize(NLIPTask(model, cfg), cfg, E.build_ds_config(cfg, world), total_steps=10_000)
    batch, bank, noise = batch_for(rank, n), LossBank(), NoiseState()
    flags = torch.zeros(n, dtype=torch.long)
    step_t, noise_t = [], []
    for i in range(args.steps + 3):
        ids = torch.arange(n) + (i * world + rank) * n  # fresh ids every step, as in an epoch
        t0 = time.perf_counter()
        eps = noise.epsilon_for(ids)
        t1 = time.perf_counter()
        terms = engine(batch, cfg.noise.lambda_ * eps, 1.0 - eps)
        engine.backward(terms["loss"])
        engine.step()
        t2 = time.perf_counter()
        bank.update(ids, terms["per_sample_loss"], flags=flags)
        t3 = time.perf_counter()
        if i >= 3:  # warm-up steps excluded
            step_t.append(t2 - t1)
            noise_t.append((t1 - t0) + (t3 - t2))
    losses = torch.rand(args.epoch_samples, dtype=torch.float64) * 4
    fits = []
    for _ in range(5):
        t0 = time.perf_counter()
        fit = fit_gmm(losses)
        noise.update(fit, torch.arange(args.epoch_samples))
        fits.append(time.perf_counter() - t0)
    if rank == 0:
        out.update(step=statistics.median(step_t), noise=statistics.median(noise_t), fit=statistics.median(fits),
                   steps_per_epoch=args.epoch_samples / (n * world))
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--epoch-samples", type=int, default=4000)
    args = parser.parse_args()
    out = mp.Manager().dict()
    mp.spawn(worker, args=(args.world, free_port(), args, out), nprocs=args.world, join=True)
    amortized = out["fit"] / out["steps_per_epoch"]
    share = (out["noise"] + amortized) / (out["step"] + out["noise"] + amortized)
    print(f"world size {args.world}, micro batch {args.micro_batch}, {args.steps} steps (medians), "
          f"epoch of {args.epoch_samples} samples, load average {os.getloadavg()[0]:.2f}")
    print(f"{'training step':<34} {out['step'] * 1e3:9.2f} ms")
    print(f"{'per-step noise machinery':<34} {out['noise'] * 1e3:9.2f} ms   (epsilon lookup + all-gather + bank)")
    print(f"{'GMM refit, amortized per step':<34} {amortized * 1e3:9.2f} ms   ({out['fit'] * 1e3:.1f} ms per refit)")
    print(f"{'noise machinery share of step time':<34} {share:9.2%}")


if __name__ == "__main__":
    main()
