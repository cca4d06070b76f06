"""Communication per training step under ZeRO-3, from the model's real parameter list, and the step time it
implies at stated link bandwidths; plus a cross-check of the byte counts against a real CPU run.

    python benchmarks/comm_model.py model [--config configs/vit-b32-yfcc26m.yaml]   # the table of docs/scaling.md
    python benchmarks/comm_model.py measure --world 2                                # counted vs predicted, tiny
    python benchmarks/comm_model.py noise [--config ...]                             # noise.state replicated/sharded

Per step and rank, for ring collectives (each rank sends and receives (W-1)/W of the full buffer):

- parameter all-gathers: every partitioned parameter gathered in the forward and again in the backward, per
  micro-step (parameters at most stage3_param_persistence_threshold elements stay resident, gathered once);
- gradient reduce-scatter: every parameter's gradient, per micro-step;
- feature all-gather: image and text features (N x d each) in the forward, and their gradients
  reduce-scattered in the backward (nlip_ds.distributed.all_gather_with_grad);
- per-sample loss all-gather: (sample id, loss, flag) as float64, N x 24 bytes (nlip_ds/noise/bank.py);
- GMM refit: no bytes; every rank fits the identical bank (nlip_ds/noise/estimator.py).

With noise.state=sharded (`noise` table) the loss all-gather is the same; each step adds the ε exchange of
NoiseEstimator.weights (an all-gather of the step's ids, N x 8 bytes, and an all-reduce of their ε, N x 4 bytes,
counted twice: a ring all-reduce moves its buffer out and back), and each refit the collectives of
nlip_ds/noise/gmm_sharded.py (three all-reduces of 2^16 int64 counts, a few counts, and per EM pass an all-gather
of 4 float64 per rank).

`measure` spawns W gloo processes that run real training steps of the tiny config with every
torch.distributed collective wrapped by a counter (installed before DeepSpeed is imported, which keeps
references to them), classifies each call by its caller, and prints the counted payload next to the prediction.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PERSISTENCE_THRESHOLD = 1e4  # ds_configs/zero3.json stage3_param_persistence_threshold
REDUCE_BUCKET = 5e7  # ds_configs/zero3.json reduce_bucket_size (elements)
BANK_ROW_BYTES = 3 * 8  # (id, loss, flag) as float64


@dataclass(frozen=True)
class Shape:
    """What the byte count needs from a model: parameter totals, fetch count, feature width, FLOPs."""
    params: int
    partitioned: int  # parameters above the persistence threshold: re-gathered every forward and backward
    fetch_modules: int  # modules owning partitioned parameters: one all-gather each, forward and backward
    embed_dim: int
    flops_per_sample: float  # forward + backward


def shape_of(model: torch.nn.Module, embed_dim: int, tokens: dict[str, float], lm_head: tuple[int, int, int]):
    """`tokens`: tokens per sample each top-level module processes; `lm_head`: (vocab, width, tokens) of the
    decoder's output layer (tied to the embedding, so not counted among the module's matmul weights)."""
    params = sum(p.numel() for p in model.parameters())
    partitioned = sum(p.numel() for p in model.parameters() if p.numel() > PERSISTENCE_THRESHOLD)
    fetch = sum(any(p.numel() > PERSISTENCE_THRESHOLD for p in m.parameters(recurse=False))
                for m in model.modules())
    flops = 0.0
    for name, child in model.named_children():
        embeddings = sum(p.numel() for m in child.modules() if isinstance(m, torch.nn.Embedding)
                         for p in m.parameters(recurse=False))
        # 2 FLOPs per weight per token forward, twice that backward; attention's T^2 terms are small at T <= 77.
        flops += 6 * tokens.get(name, 1) * (sum(p.numel() for p in child.parameters()) - embeddings)
    vocab, width, t = lm_head
    flops += 6 * t * vocab * width
    return Shape(params, partitioned, fetch, embed_dim, flops)


def paper_shape(config: str) -> tuple[Shape, object]:
    from nlip_ds.config import load_config
    from nlip_ds.model import NLIPModel

    cfg = load_config(config, [])
    m = cfg.model
    with torch.device("meta"):
        model = NLIPModel(m, vocab_size=cfg.data.vocab_size, pad_id=0, bos_id=1, eos_id=2, sep_id=3)
    patches = (m.vision.image_size // m.vision.patch_size) ** 2
    tokens = {"vision": patches * (1 - m.vision.mask_ratio) + 1, "text": m.text.context_length,
              "decoder": m.decoder.max_length, "mae": patches + 1}
    return shape_of(model, m.embed_dim, tokens, (cfg.data.vocab_size, m.decoder.width, m.decoder.max_length)), cfg


# ------------------------------------------------------------------------------------------------ byte model


def step_bytes(s: Shape, world: int, micro: int, accum: int, param_bytes: int = 2, grad_bytes: int = 2,
               feature_bytes: int = 2) -> dict[str, float]:
    """Payload per rank and step (the full buffer of each collective), by category."""
    n_global = micro * world  # the contrastive batch of one micro-step
    return {"param all-gather": accum * 2 * s.partitioned * param_bytes,
            "grad reduce-scatter": accum * s.params * grad_bytes,
            "feature all-gather": accum * 2 * 2 * n_global * s.embed_dim * feature_bytes,
            "loss all-gather": accum * n_global * BANK_ROW_BYTES,
            "GMM refit": 0.0}


def zero2_bytes(s: Shape, world: int, micro: int, accum: int) -> dict[str, float]:
    """The same step under ZeRO-2 (parameters replicated, gradients and optimizer state partitioned): no
    per-pass parameter gathers, one all-gather of the updated parameters per step (bf16)."""
    b = step_bytes(s, world, micro, accum)
    b["param all-gather"] = s.params * 2
    return b


def zero2_collectives(s: Shape, accum: int) -> dict[str, int]:
    c = collectives_per_step(s, accum)
    c["param all-gather"] = math.ceil(s.params / REDUCE_BUCKET)
    return c


def collectives_per_step(s: Shape, accum: int) -> dict[str, int]:
    return {"param all-gather": accum * 2 * s.fetch_modules,
            "grad reduce-scatter": accum * math.ceil(s.params / REDUCE_BUCKET),
            "feature all-gather": accum * 4, "loss all-gather": accum, "GMM refit": 0}


@dataclass(frozen=True)
class Fabric:
    name: str
    intra_gbs: float  # ring bus bandwidth inside a node (GB/s)
    inter_gbs: float  # ring bus bandwidth once the ring leaves the node: the node's NICs, per direction (GB/s)
    intra_lat_us: float  # latency per ring hop inside a node
    inter_lat_us: float  # latency per ring hop between nodes


FABRICS = (Fabric("8x200Gb/s IB", 230.0, 160.0, 1.0, 6.0), Fabric("2x100Gb/s Ethernet", 230.0, 20.0, 1.0, 15.0))
GPUS_PER_NODE = 8
GPU_EFFECTIVE_TFLOPS = 125.0  # A100 bf16 dense 312 TF/s at 40 % utilization


def collective_seconds(payload: float, count: int, nodes: int, f: Fabric) -> float:
    world = nodes * GPUS_PER_NODE
    if world == 1:
        return 0.0
    bw = (f.intra_gbs if nodes == 1 else f.inter_gbs) * 1e9
    # A ring laid out node by node: one inter-node hop per node, the other hops over NVLink.
    hops_lat = (nodes * f.inter_lat_us + (world - nodes) * f.intra_lat_us if nodes > 1
                else (world - 1) * f.intra_lat_us) * 1e-6
    return payload * (world - 1) / world / bw + count * hops_lat


def micro_and_accum(global_batch: int, world: int, max_micro: int = 256) -> tuple[int, int]:
    per_rank = global_batch // world
    accum = next(k for k in range(1, per_rank + 1) if per_rank % k == 0 and per_rank // k <= max_micro)
    return per_rank // accum, accum


def model_table(config: str) -> str:
    s, _ = paper_shape(config)
    lines = [f"model: {s.params:,} parameters, {s.partitioned:,} partitioned (> {PERSISTENCE_THRESHOLD:.0e} "
             f"elements), {s.fetch_modules} modules fetched per pass, about {s.flops_per_sample / 1e9:.0f} "
             f"GFLOP per sample (forward + backward); {GPUS_PER_NODE} GPUs per node at "
             f"{GPU_EFFECTIVE_TFLOPS:.0f} TFLOP/s effective; bf16 parameters, gradients and features", ""]
    for batch in (6144, 32768):
        for f in FABRICS:
            lines += [f"global batch {batch}, {f.name} (inter-node bus {f.inter_gbs:.0f} GB/s, hop "
                      f"{f.inter_lat_us:.0f} us; NVLink bus {f.intra_gbs:.0f} GB/s, hop {f.intra_lat_us:.0f} us)", "",
                      "| nodes | GPUs | micro x accum | params AG GB | grads RS GB | features MB | losses MB "
                      "| compute ms | comm ms | step ms | bottleneck | ZeRO-2 step ms |", "|" + "---|" * 12]
            for nodes in (1, 2, 4, 8, 16, 32, 64, 128):
                world = nodes * GPUS_PER_NODE
                micro, accum = micro_and_accum(batch, world)
                b = step_bytes(s, world, micro, accum)
                c = collectives_per_step(s, accum)
                t = {k: collective_seconds(b[k], c[k], nodes, f) for k in b}
                t["compute"] = batch / world * s.flops_per_sample / (GPU_EFFECTIVE_TFLOPS * 1e12)
                comm = sum(v for k, v in t.items() if k != "compute")
                lat = sum(c[k] for k in c) * collective_seconds(0, 1, nodes, f)
                largest = max((k for k in t if k != "compute"), key=t.get)
                neck = ("compute" if t["compute"] >= comm else
                        f"{largest} ({'latency' if lat > 0.5 * comm else 'bandwidth'})")
                b2, c2 = zero2_bytes(s, world, micro, accum), zero2_collectives(s, accum)
                zero2 = t["compute"] + sum(collective_seconds(b2[k], c2[k], nodes, f) for k in b2)
                lines.append(f"| {nodes} | {world} | {micro} x {accum} | {b['param all-gather'] / 1e9:.2f} | "
                             f"{b['grad reduce-scatter'] / 1e9:.2f} | {b['feature all-gather'] / 1e6:.1f} | "
                             f"{b['loss all-gather'] / 1e6:.2f} | {t['compute'] * 1e3:.0f} | {comm * 1e3:.0f} | "
                             f"{(t['compute'] + comm) * 1e3:.0f} | {neck} | {zero2 * 1e3:.0f} |")
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- measured at small scale

def _category(op: str) -> str:
    files = [f.filename for f in traceback.extract_stack()]
    if any(p.endswith(os.path.join("noise", "bank.py")) for p in files):
        return "loss all-gather"
    if any(p.endswith(os.path.join("nlip_ds", "distributed.py")) for p in files):
        return "feature all-gather"
    if any(os.sep + "deepspeed" + os.sep in p for p in files):
        return "param all-gather" if "gather" in op or op == "broadcast" else "grad reduce-scatter"
    return "other"


# Which argument of each collective is its full buffer (gathered output, unscattered input, reduced tensor).
FULL_BUFFER_ARG = {"all_gather_into_tensor": 0, "_all_gather_base": 0, "all_gather_single": 0, "all_gather": 0,
                   "all_reduce": 0, "broadcast": 0, "reduce_scatter_tensor": 1, "_reduce_scatter_base": 1,
                   "reduce_scatter_single": 1, "reduce_scatter": 1}


def new_counter() -> dict:
    return defaultdict(lambda: {"bytes": 0, "calls": 0, "seconds": 0.0})


def install_counter(counts: dict) -> None:
    import inspect

    import torch.distributed as dist

    def wrap(name, fn):
        params = list(inspect.signature(fn).parameters)

        def counted(*args, **kwargs):
            i = FULL_BUFFER_ARG[name]
            t = args[i] if len(args) > i else kwargs[params[i]]
            nbytes = sum(x.numel() * x.element_size() for x in (t if isinstance(t, (list, tuple)) else [t]))
            cat = _category(name)
            start = time.perf_counter()
            result = fn(*args, **kwargs)  # gloo collectives block, so the wall time is the collective's
            counts[cat]["seconds"] += time.perf_counter() - start
            counts[cat]["bytes"] += nbytes
            counts[cat]["calls"] += 1
            return result
        return counted

    for name in FULL_BUFFER_ARG:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def _measure_worker(rank: int, world: int, port: int, micro: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    counts = new_counter()
    install_counter(counts)  # before DeepSpeed and nlip_ds bind the collectives
    from nlip_ds.config import load_config
    from nlip_ds.model import NLIPModel
    from nlip_ds.train import engine as E
    from nlip_ds.noise.estimator import NoiseEstimator
    from nlip_ds.train.task import NLIPTask

    cfg = load_config(str(ROOT / "configs/tiny-cpu.yaml"), [f"train.micro_batch_size={micro}",
                                                            "monitor.tensorboard=false"])
    E.init_distributed(cfg)
    vocab = 64
    torch.manual_seed(0)
    model = NLIPModel(cfg.model, vocab_size=vocab, pad_id=0, bos_id=1, eos_id=2, sep_id=3)
    noise = NoiseEstimator(cfg.noise)
    engine = E.initialize(NLIPTask(model, cfg, noise), cfg, E.build_ds_config(cfg, world), total_steps=10)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(5, vocab, (micro, 12), generator=g)
    batch = {"image": torch.randn(micro, 3, 32, 32, generator=g), "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "sample_id": torch.arange(micro) + rank * micro,
             "noise_type": torch.zeros(micro, dtype=torch.long), "pad": torch.zeros(micro, dtype=torch.bool)}
    zeros = torch.zeros(micro)
    for step in range(2):  # the first step also pays one-time set-up collectives: count the second only
        if step == 1:
            counts.clear()
        terms = engine(batch, zeros, 1.0 - zeros)
        engine.backward(terms["loss"])
        engine.step()
        noise.observe(batch["sample_id"], terms["per_sample_loss"])
    if rank == 0:
        with torch.device("meta"):
            meta = NLIPModel(cfg.model, vocab_size=vocab, pad_id=0, bos_id=1, eos_id=2, sep_id=3)
        s = shape_of(meta, cfg.model.embed_dim, {}, (vocab, cfg.model.decoder.width, 1))
        predicted = step_bytes(s, world, micro, 1, param_bytes=4, grad_bytes=4, feature_bytes=4)
        torch.save({"counted": {k: dict(v) for k, v in counts.items()}, "predicted": predicted,
                    "predicted_calls": collectives_per_step(s, 1)}, out)
    torch.distributed.barrier()


def measure(world: int, micro: int) -> str:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "counts.pt")
        mp.spawn(_measure_worker, args=(world, port, micro, out), nprocs=world, join=True)
        r = torch.load(out, weights_only=True)
    lines = [f"tiny config, world size {world}, micro-batch {micro}, float32, one training step (rank 0)", "",
             "| category | predicted bytes | counted bytes | predicted calls | counted calls |",
             "|---|---|---|---|---|"]
    for cat in sorted(set(r["predicted"]) | set(r["counted"])):
        c = r["counted"].get(cat, {"bytes": 0, "calls": 0, "seconds": 0.0})
        p, pc = r["predicted"].get(cat), r["predicted_calls"].get(cat, "-")
        lines.append(f"| {cat} | {'-' if p is None else f'{p:,.0f}'} | {c['bytes']:,} | {pc} | {c['calls']} |")
    return "\n".join(lines)


EPS_EXCHANGE_ROW_BYTES = 8 + 2 * 4  # id all-gather (int64) + ε all-reduce (float32, out and back)
RADIX_BYTES = 3 * (1 << 16) * 8  # the bounds' radix select: three all-reduces of 2^16 int64 counts
EM_PASSES = 25  # moments + hard split + EM iterations (tol 1e-4 on bimodal losses: about 20) + final posterior


def noise_state_bytes(world: int, micro: int, accum: int) -> dict[str, float]:
    """Payload of the noise state per rank: per step (both layouts) and per refit (sharded; replicated sends
    nothing), as full buffers (an all-reduce counted twice)."""
    n_global = micro * world
    return {"step loss all-gather": accum * n_global * BANK_ROW_BYTES,
            "step eps exchange": accum * n_global * EPS_EXCHANGE_ROW_BYTES,
            "refit": RADIX_BYTES + 2 * 3 * 8 + EM_PASSES * 4 * 8 * world + 16 * world}


def noise_table(config: str, global_batch: int = 32768) -> str:
    """Per-step and per-refit communication of noise.state=sharded at 8, 64 and 512 ranks, and the step's
    extra time against the modelled step of the paper model (ZeRO-3, first fabric)."""
    s, _ = paper_shape(config)
    f = FABRICS[0]
    lines = [f"noise state, global batch {global_batch}, {f.name}: bytes per rank (full buffers); the extra "
             "step time is the ε exchange (two collectives) over the modelled ZeRO-3 step", "",
             "| GPUs | micro x accum | loss all-gather MB/step (both) | eps exchange MB/step (sharded) "
             "| eps exchange ms | step ms | extra % | refit KB (sharded; replicated 0) |", "|" + "---|" * 8]
    for world in (8, 64, 512):
        nodes = max(1, world // GPUS_PER_NODE)
        micro, accum = micro_and_accum(global_batch, world)
        b, c = step_bytes(s, world, micro, accum), collectives_per_step(s, accum)
        step = global_batch / world * s.flops_per_sample / (GPU_EFFECTIVE_TFLOPS * 1e12)
        step += sum(collective_seconds(b[k], c[k], nodes, f) for k in b)
        nb = noise_state_bytes(world, micro, accum)
        extra = collective_seconds(nb["step eps exchange"], 2 * accum, nodes, f)
        lines.append(f"| {world} | {micro} x {accum} | {nb['step loss all-gather'] / 1e6:.2f} | "
                     f"{nb['step eps exchange'] / 1e6:.2f} | {extra * 1e3:.2f} | {(step + extra) * 1e3:.0f} | "
                     f"{100 * extra / step:.2f} | {nb['refit'] / 1e3:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model")
    p.add_argument("--config", default=str(ROOT / "configs/vit-b32-yfcc26m.yaml"))
    p = sub.add_parser("measure")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--micro", type=int, default=8)
    p = sub.add_parser("noise")
    p.add_argument("--config", default=str(ROOT / "configs/vit-b32-yfcc26m.yaml"))
    args = parser.parse_args()
    if args.command == "noise":
        print(noise_table(args.config))
        return
    print(model_table(args.config) if args.command == "model" else measure(args.world, args.micro))


if __name__ == "__main__":
    main()
