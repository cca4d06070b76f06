"""Fused contrastive loss vs the naive PyTorch CLIP loss, forward plus backward, side by side in one run.

    python benchmarks/bench_contrastive.py [--sizes 1024 4096 8192 16384] [--dim 256] [--reps 5] [--device cpu]

For each N (= n, one process, fp32): median time of
  naive     logits = scale * img @ txt.T, (CE(logits) + CE(logits.T)) / 2, as open_clip's ClipLoss
  fused     fused_contrastive_loss(img, txt, img, txt, scale): the shared-tile path a single process takes
  gathered  the same with img_all / txt_all as separate tensors: the path of one rank of many (two tile
            products per block instead of one), shown for reference
  floor     the three n x N x d products the naive loss cannot avoid (img @ txt.T, G @ txt, G.T @ img), timed
            with torch.mm at these shapes; the sgemm rate printed is 3 * 2nNd / floor
and the peak memory of one forward plus backward, gradients included: RSS high-water mark above the RSS before
it on the CPU (Linux /proc/self/clear_refs; glibc is told to give every allocation above 64 KiB back to the
system when freed, so the RSS follows live memory instead of reused free lists), max allocated above
allocated before it on a GPU. Timings of the variants are
interleaved rep by rep, so load from other processes hits them alike. Prints a markdown table and the targets.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
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


def make_steps(n: int, d: int, device: str) -> dict:
    """name -> zero-argument callable running one forward + backward (or the floor's three products)."""
    gen = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device).requires_grad_() for _ in "it")
    img_all, txt_all = (x.detach().clone().requires_grad_() for x in (img, txt))
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    grad_logits = torch.randn(n, n, generator=gen).to(device)  # (N, N) stand-in for the naive backward's G

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


def measure(n: int, d: int, reps: int, device: str) -> dict:
    steps, clear = make_steps(n, d, device)
    for step in steps.values():  # warm-up: extension load, allocator, MKL buffers
        step()
    memory = {name: peak_memory(steps[name], clear, device) for name in ("naive", "fused", "gathered")}
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(timed(step, clear, device))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    row = {"N": n, **{f"t_{k}": v for k, v in median.items()}, **{f"m_{k}": v for k, v in memory.items()}}
    row["gflops"] = 3 * 2 * n * n * d / median["floor"] / 1e9
    return row


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        release_freed_memory()
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, {cpu}, "
          f"d = {args.dim}, fp32, median of {args.reps}; load average {os.getloadavg()[0]:.1f}")
    rows = []
    for n in args.sizes:
        rows.append(measure(n, args.dim, args.reps, args.device))
        print(f"N={n} done (fused ran: {contrastive.last_impl})", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    print(table(rows))
    print("\n".join(targets(rows)))


if __name__ == "__main__":
    main()
