"""Process topology and the few collectives nlip-ds needs.

This is the only module that reads RANK / WORLD_SIZE / SLURM_* variables. `resolve_topology()` maps each way a
job can be launched (deepspeed launcher, torchrun, SLURM srun, a plain python process) onto one `Topology`, and
`export_topology()` writes the variables torch.distributed and DeepSpeed expect before they initialize.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500

# torch 2.13 renamed the tensor collectives (the old names warn); keep both working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "deepspeed" | "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_master_addr(env) -> str:
    """First host of the allocation. Node names need not resolve (a local test cluster), so ask scontrol for
    the node's address and fall back to the name itself."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
        first = hosts[0]
        info = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True,
                              check=True, timeout=30).stdout
        for token in info.split():
            if token.startswith("NodeAddr="):
                return token.split("=", 1)[1]
        return first
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (single-node rendezvous; tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_topology(env=None) -> Topology:
    """Work out rank, local rank, world size and rendezvous address from the launcher's environment."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        # deepspeed's launcher and torchrun both export RANK/LOCAL_RANK/WORLD_SIZE; torchrun also sets
        # TORCHELASTIC_RUN_ID, which tells the two apart (only for the log).
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        return Topology(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                        env.get("MASTER_ADDR", "127.0.0.1"), port, launcher)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _slurm_master_addr(env)
        return Topology(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                        addr, port, "slurm")
    # One process rendezvous only with itself: any free port does, and the fixed default collides with every other
    # single-process run on the machine (EADDRINUSE).
    port = port if "MASTER_PORT" in env else free_port()
    return Topology(0, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def export_topology(topo: Topology) -> None:
    """Write the variables torch.distributed's env:// rendezvous and DeepSpeed read."""
    os.environ.update(RANK=str(topo.rank), LOCAL_RANK=str(topo.local_rank), WORLD_SIZE=str(topo.world_size),
                      MASTER_ADDR=topo.master_addr, MASTER_PORT=str(topo.master_port))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def leave_process_group() -> None:
    """Every rank, together, before a deliberate exit from inside training (preemption, a stopped run): left to
    the exit-time destructors, the process group's threads can die joinable and abort the rank (std::terminate)."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def start_processes(device_arg: str | None) -> tuple[Topology, torch.device]:
    """(Topology, device) of a command that runs on one process or on every rank of a launcher; a process
    group (NCCL on GPUs, gloo otherwise) only when WORLD_SIZE > 1."""
    topo = resolve_topology()
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{topo.local_rank}" if device_arg == "cuda" else device_arg)
    if topo.world_size > 1:
        export_topology(topo)  # SLURM names rank and world differently from env:// rendezvous
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return topo, device


def run_on_processes(command: str, device_arg: str | None, body: Callable[[Topology, torch.device], int]) -> int:
    """Run `body(topo, device)` on one process or on every rank of a launcher (`nlip-ds eval`, `nlip-ds
    caption`): a bad input becomes one line `nlip-ds COMMAND: error: ...` and exit status 2, and the process
    group is left before returning."""
    from nlip_ds.config import ConfigError
    from nlip_ds.monitor import setup_logging

    topo, device = start_processes(device_arg)
    setup_logging(topo.rank)
    try:
        return body(topo, device)
    except (OSError, ValueError, ConfigError) as exc:
        print(f"nlip-ds {command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's block (a reduce-scatter).

    With each rank's loss a mean over its own rows and the engine averaging gradients over ranks, this gives
    every rank the gradient of the global-batch loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x.contiguous())
        return out  # (world * n, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out = torch.empty((grad.shape[0] // world, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        _reduce_scatter_single(out, grad.contiguous())
        return out


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (n, ...) of every rank in rank order -> (world * n, ...), differentiable.

    Every rank must pass the same n. With one process it returns `x` itself.
    """
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (n, ...) of every rank in rank order, without gradient. Every rank passes the same n."""
    if get_world_size() == 1:
        return x
    out = torch.empty((get_world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous())
    return out


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (pickled; for small, rare messages only)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def collective_device() -> torch.device:
    """Where tensors of a collective must live: the current CUDA device under NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of `x` over ranks (a new tensor; `x` itself with one process). Every rank passes the
    same shape, on a device the backend can reduce on (CUDA for NCCL)."""
    if get_world_size() == 1:
        return x
    out = x.clone()
    dist.all_reduce(out)
    return out


def all_reduce_max(value: int, device: torch.device | str = "cpu") -> int:
    """Largest `value` over ranks (used for lockstep loops: keep going while any rank has work).

    `device` must be one the backend can reduce on (CUDA for NCCL)."""
    if get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ------------------------------------------------------------------------------------------ rank failure

HEARTBEAT_S = 2.0  # how often every rank tells the peer store it is alive
STORE_GRACE_S = 60.0  # how long the peer store outlives a rank 0 that ended without a clean exit
_PREFIX = "nlip/peers/"
# The peer store's server: prints its port, then serves until rank 0 says "done" (a clean end of the run) or,
# when rank 0's end closes the pipe without it, STORE_GRACE_S longer, while the other ranks find out who was lost.
_STORE_SERVER = """
import sys, time
import torch.distributed as dist
store = dist.TCPStore(sys.argv[1], 0, is_master=True, wait_for_workers=False)
print(store.port, flush=True)
if sys.stdin.readline().strip() != "done":
    time.sleep(float(sys.argv[2]))
"""


class RankLostError(RuntimeError):
    """A collective failed because another rank died, hung or stopped with its own error; the message names it."""


class PeerWatch:
    """Context manager that turns a failed collective into an error naming the rank that was lost.

    gloo reports a dead peer within about a second ("Connection reset by peer", with an address but no rank) and a
    hung one after the collective timeout; neither names the rank. So every rank writes a heartbeat (a counter and
    its current step) into a peer store from a daemon thread. When anything fails inside the block, the rank
    marks itself as diagnosing, reads every heartbeat, waits three beats and reads again: a rank whose counter
    stood still and which left no mark is lost. A rank whose failure had no lost or failed peer behind it leaves
    its own error in the store, so that the others name it and its error.

    The peer store is not the rendezvous store, which dies with rank 0: ranks that wait on a rank busy with its own
    diagnosis fail only when that rank exits, and rank 0 may be gone by then. A child process of rank 0 serves
    it (its port passes through the rendezvous store) and outlives rank 0 by STORE_GRACE_S after an unclean end.
    """

    def __init__(self, topo: Topology, interval: float = HEARTBEAT_S):
        self.topo, self.interval = topo, interval
        self.step: Callable[[], int] = lambda: 0  # the training step the heartbeat reports; the loop sets it
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the main thread and the heartbeat thread share one store client
        self._store = None
        self._server: subprocess.Popen | None = None
        self._beats = 0

    def __enter__(self) -> "PeerWatch":
        if self.topo.world_size > 1:
            self._store = self._connect()
            self._beat()
            threading.Thread(target=self._run, name="nlip-heartbeat", daemon=True).start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._store is not None and isinstance(exc, Exception):
                report = self.explain(exc)
                if report:
                    logger.error("%s", report)
                    raise RankLostError(report) from exc
        finally:
            self._stop.set()
            if self._server is not None and not isinstance(exc, Exception):  # a clean end: no one will ask
                self._server.communicate("done\n")

    def _connect(self) -> dist.TCPStore:
        addr = self.topo.master_addr
        rendezvous = dist.TCPStore(addr, self.topo.master_port, is_master=False, timeout=timedelta(seconds=300),
                                   wait_for_workers=False)
        if self.topo.rank == 0:
            self._server = subprocess.Popen([sys.executable, "-c", _STORE_SERVER, addr, str(STORE_GRACE_S)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                            stderr=subprocess.DEVNULL)  # nor keep rank 0's stderr open
            rendezvous.set(_PREFIX + "port", self._server.stdout.readline().strip())
        port = int(rendezvous.get(_PREFIX + "port"))
        return dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False)

    def _set(self, key: str, value: str) -> None:
        with self._lock:
            self._store.set(_PREFIX + key, value)

    def _get(self, key: str) -> str | None:
        with self._lock:
            if not self._store.check([_PREFIX + key]):
                return None
            return self._store.get(_PREFIX + key).decode()

    def _beat(self) -> None:
        self._beats += 1
        self._set(f"beat/{self.topo.rank}", f"{self._beats} {self.step()}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except (RuntimeError, OSError):  # the store is gone with rank 0: explain() reports it
                return

    def _read(self) -> dict[int, tuple[str | None, str | None]]:
        """rank -> (heartbeat "count step", mark) of every other rank."""
        return {r: (self._get(f"beat/{r}"), self._get(f"mark/{r}"))
                for r in range(self.topo.world_size) if r != self.topo.rank}

    def explain(self, exc: BaseException) -> str | None:
        """A report naming the lost ranks (or those that stopped with their own error), or None when every peer
        is alive and well: then the failure is this rank's own, and its mark tells the peers so."""
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        try:
            lost, failed = self._survey()
            mine = "exiting after a peer failure" if lost or failed else f"error: {type(exc).__name__}: {first_line}"
            self._set(f"mark/{self.topo.rank}", mine)
        except (RuntimeError, OSError) as store_exc:
            if self.topo.rank == 0:
                return None
            lost, failed = [f"rank 0 (the peer store served from its node does not answer: {store_exc})"], []
        if not lost and not failed:
            return None
        parts = [f"lost {', '.join(lost)}"] if lost else []
        parts += [f"stopped with its own error: {', '.join(failed)}"] if failed else []
        return f"{'; '.join(parts)}. Rank {self.topo.rank} stops too; its collective failed with: {first_line}"

    def _survey(self) -> tuple[list[str], list[str]]:
        """(lost ranks, ranks that failed with their own error), each described; takes three heartbeats."""
        self._set(f"mark/{self.topo.rank}", "diagnosing")
        before = self._read()
        time.sleep(3 * self.interval)
        after = self._read()
        lost = [f"rank {r} ({_last_step(beat)})" for r, (beat, mark) in after.items()
                if beat == before[r][0] and mark is None]
        # Only marks there at the first read: ranks that fail together mark themselves during the wait.
        failed = [f"rank {r} ({mark[len('error: '):]})" for r, (_, mark) in before.items()
                  if mark and mark.startswith("error: ")]
        return lost, failed


def _last_step(beat: str | None) -> str:
    return "no heartbeat at all" if beat is None else f"silent since its heartbeat at step {beat.split()[1]}"
