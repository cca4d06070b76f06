"""Fused contrastive loss vs the naive PyTorch CLIP loss, forward plus backward, side by side in one run.

    python benchmarks/bench_contrastive.py [--sizes 1024 4096 8192 16384] [--dim 256] [--reps 5] [--device cpu]
        [--dtype fp32|bf16|fp16] [--local-rows n] [--json FILE]

For each N (= n, one process, fp32): median time of
  naive     logits = scale * img @ txt.T, (CE(logits) + CE(logits.T)) / 2, as open_clip's ClipLoss
  fused     fused_contrastive_loss(img, txt, img, txt, scale): the shared-tile path a single process takes
  gathered  the same with img_all / txt_all as separate tensors: the path of one rank of many (two tile
            products per block instead of one), shown for reference
  floor     the three n x N x d products the naive loss cannot avoid (img @ txt.T, G @ txt, G.T @ img), timed
            with torch.mm at these shapes; the sgemm rate printed is 3 * 2nNd / floor
With --local-rows n, a second table times one rank of N / n: its n local rows against the N gathered ones
(naive: the two (n, N) logit matrices and their cross-entropies; fused: the gathered path with row_offset; floor:
the six n x N x d products). Both tables give each loss's rate in TFLOP/s, counting the products the naive loss
computes (3 x 2nNd per direction pair), against the device's GEMM rate measured at --dtype (a square 8192 product
on a GPU, 2048 on the CPU). --json writes every row for scripts (scripts/gpu_check.sh).
Also printed: the peak memory of one forward plus backward, gradients included: RSS high-water mark above the RSS before
it on the CPU (Linux /proc/self/clear_refs; glibc is told to give every allocation above 64 KiB back to the
system when freed, so the RSS follows live memory instead of reused free lists), max allocated above
allocated before it on a GPU. Timings of the variants are
interleaved rep by rep, so load from other processes hits them alike. Prints a markdown table and the targets.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import nlip_ds.ops.contrastive as contrastive
from nlip_ds.ops import fused_contrastive_loss

MIB = 2**20


def naive_clip_loss(img, txt, scale):
    logits = scale * img @ txt.T  # (N, N)
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def features(rows: int, d: int, device: str, dtype, gen) -> torch.Tensor:
    return F.normalize(torch.randn(rows, d, generator=gen), dim=1).to(device, dtype).requires_grad_()


def make_steps(n: int, d: int, device: str, dtype=torch.float32) -> dict:
    """name -> zero-argument callable running one forward + backward (or the floor's three products)."""
    gen = torch.Generator().manual_seed(0)
    img, txt = (features(n, d, device, dtype, gen) for _ in "it")
    img_all, txt_all = (x.detach().clone().requires_grad_() for x in (img, txt))
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    grad_logits = torch.randn(n, n, generator=gen).to(device, dtype)  # (N, N) stand-in for the naive backward's G

    def clear():
        for x in (img, txt, img_all, txt_all, scale):
            x.grad = None

    def naive():
        naive_clip_loss(img, txt, scale).backward()

    def fused():
        fused_contrastive_loss(img, txt, img, txt, scale)[0].backward()

    def gathered():
        fused_contrastive_loss(img, txt, img_all, txt_all, scale)[0].backward()

    def floor():
        with torch.no_grad():
            img @ txt.T
            grad_logits @ txt
            grad_logits.T @ img

    return {"naive": naive, "fused": fused, "gathered": gathered, "floor": floor}, clear


def naive_rank_loss(img_local, txt_local, img_all, txt_all, scale, offset):
    """One rank's naive loss: its n rows against the N gathered columns, in both directions."""
    labels = torch.arange(img_local.shape[0], device=img_local.device) + offset
    i2t = scale * img_local @ txt_all.T  # (n, N)
    t2i = scale * txt_local @ img_all.T  # (n, N)
    return (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2


def make_rank_steps(n: int, N: int, d: int, device: str, dtype) -> tuple[dict, callable]:
    """As make_steps for one rank: n local rows (the block at offset (N - n) / 2) of N gathered."""
    gen = torch.Generator().manual_seed(0)
    img_all, txt_all = (features(N, d, device, dtype, gen) for _ in "it")
    offset = (N - n) // 2 // n * n
    img_local, txt_local = (x.detach()[offset:offset + n].clone().requires_grad_() for x in (img_all, txt_all))
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    grad_logits = torch.randn(n, N, generator=gen).to(device, dtype)  # (n, N)
    args = (img_local, txt_local, img_all, txt_all, scale, offset)

    def clear():
        for x in (img_local, txt_local, img_all, txt_all, scale):
            x.grad = None

    def floor():
        with torch.no_grad():
            for x, y in ((img_local, txt_all), (txt_local, img_all)):
                x @ y.T
                grad_logits @ y
                grad_logits.T @ x

    return {"naive": lambda: naive_rank_loss(*args).backward(),
            "fused": lambda: fused_contrastive_loss(*args)[0].backward(), "floor": floor}, clear


def gemm_rate(device: str, dtype) -> float:
    """TFLOP/s of a square product at dtype on the device (median of 5 after a warm-up)."""
    size = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in "ab")
    times = [timed(lambda: a @ b, lambda: None, device) for _ in range(6)][1:]
    return 2 * size**3 / statistics.median(times) / 1e12


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step, clear, device: str) -> float:
    clear()
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_freed_memory() -> None:
    """glibc: serve allocations above 64 KiB by mmap, so that freeing them lowers the RSS at once."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        print("note: not glibc; the RSS deltas may undercount reused memory")


def peak_memory(step, clear, device: str) -> float:
    """MiB the step needs above what is allocated before it (gradients included)."""
    clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the RSS high-water mark (VmHWM) to the current RSS
    step()
    return (_status_kib("VmHWM") - before) / 1024


def time_steps(steps: dict, clear, reps: int, device: str) -> dict:
    """Medians (t_*) and peak memory (m_*, the losses only) of interleaved reps, after one warm-up each."""
    for step in steps.values():  # warm-up: extension load, allocator, MKL buffers
        step()
    memory = {name: peak_memory(steps[name], clear, device) for name in steps if name != "floor"}
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(timed(step, clear, device))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {**{f"t_{k}": v for k, v in median.items()}, **{f"m_{k}": v for k, v in memory.items()}}


def measure(n: int, d: int, reps: int, device: str, dtype=torch.float32) -> dict:
    row = {"N": n, "n": n, **time_steps(*make_steps(n, d, device, dtype), reps, device)}
    row["flop"] = 3 * 2 * n * n * d
    row["gflops"] = row["flop"] / row["t_floor"] / 1e9
    return row


def measure_rank(n: int, N: int, d: int, reps: int, device: str, dtype) -> dict:
    row = {"N": N, "n": n, **time_steps(*make_rank_steps(n, N, d, device, dtype), reps, device)}
    row["flop"] = 2 * 3 * 2 * n * N * d
    return row


def rate_table(rows: list[dict], gemm_tflops: float) -> str:
    """Time, memory and TFLOP/s (the naive loss's products over the time) of naive and fused, side by side."""
    head = ("| n of N | naive s | fused s | naive / fused | naive peak MiB | fused peak MiB | fused / naive memory "
            f"| naive TFLOP/s | fused TFLOP/s | fused / GEMM rate ({gemm_tflops:.3g}) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        naive, fused = r["flop"] / r["t_naive"] / 1e12, r["flop"] / r["t_fused"] / 1e12
        lines.append(
            f"| {r['n']} of {r['N']} | {r['t_naive']:.4f} | {r['t_fused']:.4f} | {r['t_naive'] / r['t_fused']:.2f}x "
            f"| {r['m_naive']:.0f} | {r['m_fused']:.1f} | {100 * r['m_fused'] / r['m_naive']:.2f}% | {naive:.3g} "
            f"| {fused:.3g} | {100 * fused / gemm_tflops:.1f}% |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| N | naive s | fused s | naive / fused | GEMM floor s (sgemm GFLOP/s) | fused / floor | naive peak MiB "
            "| fused peak MiB | fused / naive memory | gathered path s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['t_naive']:.3f} | {r['t_fused']:.3f} | {r['t_naive'] / r['t_fused']:.1f}x "
            f"| {r['t_floor']:.3f} ({r['gflops']:.0f}) | {r['t_fused'] / r['t_floor']:.2f} | {r['m_naive']:.0f} "
            f"| {r['m_fused']:.1f} | {100 * r['m_fused'] / r['m_naive']:.1f}% | {r['t_gathered']:.3f} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, met or missed."""
    by_n = {r["N"]: r for r in rows}
    checks = []
    if 8192 in by_n:
        r = by_n[8192]
        checks += [("N=8192 fused >= 2x faster than naive", r["t_naive"] / r["t_fused"] >= 2),
                   ("N=8192 fused within 1.5x of the GEMM floor", r["t_fused"] / r["t_floor"] <= 1.5),
                   ("N=8192 fused peak memory <= 5% of naive", r["m_fused"] <= 0.05 * r["m_naive"])]
    if 16384 in by_n:
        r = by_n[16384]
        checks.append(("N=16384 fused >= 5x faster than naive", r["t_naive"] / r["t_fused"] >= 5))
    return [f"{'met   ' if ok else 'MISSED'} {name}" for name, ok in checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="feature dtype")
    parser.add_argument("--local-rows", type=int, default=None, metavar="n",
                        help="also time one rank's n rows of each N gathered (n must divide N)")
    parser.add_argument("--json", default=None, help="write the measured rows and rates to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        release_freed_memory()
    cpu = platform.processor() or platform.machine()
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    print(f"torch {torch.__version__}, device {args.device} ({name}), {torch.get_num_threads()} threads, "
          f"d = {args.dim}, {args.dtype}, median of {args.reps}; load average {os.getloadavg()[0]:.1f}")
    gemm = gemm_rate(args.device, dtype)
    print(f"device GEMM rate at {args.dtype}: {gemm:.3g} TFLOP/s", flush=True)
    rows, rank_rows = [], []
    for n in args.sizes:
        rows.append(measure(n, args.dim, args.reps, args.device, dtype))
        print(f"N={n} done (fused ran: {contrastive.last_impl})", flush=True)
        if args.local_rows:
            rank_rows.append(measure_rank(args.local_rows, n, args.dim, args.reps, args.device, dtype))
            print(f"n={args.local_rows} of N={n} done (fused ran: {contrastive.last_impl})", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    print(table(rows))
    print("\n".join(targets(rows)))
    print("\nOne process (n = N), then one rank (n of N), side by side:")
    print(rate_table(rows + rank_rows, gemm))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "dtype": args.dtype, "dim": args.dim, "gemm_tflops": gemm,
                       "impl": contrastive.last_impl, "process": rows, "rank": rank_rows}, f, indent=1)


if __name__ == "__main__":
    main()
