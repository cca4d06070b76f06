"""Loader throughput (samples/s) for the tiny config, beside a bare webdataset read of the same shards.

Why: the loader adds work on top of reading tars (epoch planning, augmentation, tokenization, the
round-robin merge that makes epochs exact and resumable). The ratio to a bare webdataset pipeline on the same
shards, with the same number of worker processes, shows what that costs. The bare pipeline only reads, decodes
to float tensors and batches: no crop, no normalization, no tokenization, no merge. The nlip-ds figure includes
the normalization of the images (done on the device in training, on the CPU here).

    python benchmarks/bench_data.py                       # 4000 synthetic samples, 0/1/2 workers
    python benchmarks/bench_data.py --data demo_data --workers 0 2 4 --repeats 5

Each figure is the best of --repeats full epochs, timed from the first request (worker start-up included, as
a training epoch pays it too).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nlip_ds.config import DataConfig  # noqa: E402
from nlip_ds.data.pipeline import build_loader  # noqa: E402
from nlip_ds.data.shards import expand_pattern  # noqa: E402
from nlip_ds.data.synthetic import synthesize  # noqa: E402
from nlip_ds.data.tokenizer import ensure_tokenizer  # noqa: E402
from nlip_ds.model.vision import ImageEncoder  # noqa: E402

# The tiny config (configs/tiny-cpu.yaml): 32 px images, 32 tokens, micro-batch 64, shuffle buffer 500.
IMAGE_SIZE, CONTEXT, BATCH, SHUFFLE = 32, 32, 64, 500


def timed_epoch(batches) -> tuple[int, float]:
    """Samples and seconds of one epoch. nlip-ds batches are also normalized as the model does it on the device
    (ImageEncoder.pixels, on the CPU here): the loader yields uint8 images, so that work is part of the CPU path."""
    start, count = time.perf_counter(), 0
    for batch in batches:
        if isinstance(batch, dict):
            ImageEncoder.pixels(batch["image"])
        count += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch["sample_id"])
    return count, time.perf_counter() - start


def ours(train_dir: Path, tokenizer, workers: int):
    cfg = DataConfig(train=str(train_dir), workers=workers, shuffle_buffer=SHUFFLE)
    return build_loader(cfg, "train", tokenizer=tokenizer, image_size=IMAGE_SIZE, batch_size=BATCH, train=True,
                        context_length=CONTEXT, seed=0, workers=workers)


def bare(train_dir: Path, workers: int):
    urls = [str(p) for source in expand_pattern(str(train_dir)) for p in source]
    dataset = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(),
                               wds.decode("torchrgb"), wds.to_tuple("png", "txt"), wds.batched(BATCH))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                       prefetch_factor=2 if workers else None)


def rate(loader, epoch: int) -> tuple[float, int]:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    count, seconds = timed_epoch(loader)
    return count / seconds, count


def best_rates(train_dir: Path, tokenizer, workers: int, repeats: int) -> tuple[float, float, int]:
    """Best epoch rate of each pipeline; the two alternate, so a change in machine load hits both."""
    ours_rates, bare_rates = [], []
    for epoch in range(repeats):
        ours_rate, count = rate(ours(train_dir, tokenizer, workers), epoch)
        ours_rates.append(ours_rate)
        bare_rates.append(rate(bare(train_dir, workers), epoch)[0])
    return max(ours_rates), max(bare_rates), count


def prepare(args) -> tuple[Path, object]:
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="bench_data_"))
    if not (root / "train").is_dir():
        synthesize(root, args.samples, seed=0, image_size=IMAGE_SIZE)
    tokenizer = ensure_tokenizer(None, str(root / "train"), root / "tokenizer", 256)
    return root / "train", tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="dataset folder with train/ (default: synthesize one in a temp folder)")
    parser.add_argument("--samples", type=int, default=4000, help="training samples to synthesize")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per figure (the best is kept)")
    args = parser.parse_args()
    train_dir, tokenizer = prepare(args)
    torch.set_num_threads(1)
    print(f"shards: {train_dir}  batch {BATCH}  {IMAGE_SIZE} px  {CONTEXT} tokens  torch threads 1")
    print(f"{'workers':>7} | {'nlip-ds loader':>14} | {'bare webdataset':>15} | {'ratio':>5}")
    print(f"{'-' * 7}-+-{'-' * 14}-+-{'-' * 15}-+-{'-' * 5}")
    for workers in args.workers:
        ours_rate, bare_rate, count = best_rates(train_dir, tokenizer, workers, args.repeats)
        print(f"{workers:>7} | {ours_rate:>10.0f} /s | {bare_rate:>11.0f} /s | {ours_rate / bare_rate:>5.2f}")
    print(f"({count} samples per epoch, best of {args.repeats} epochs each)")


if __name__ == "__main__":
    main()
