"""What slurm/train.sbatch needs beyond the launch line, kept out of the shell (standard library only: it runs
in the batch step, before and after the training processes, with any python3).

    python3 slurm/job.py env RUN_DIR                  prints `export ...` lines: MASTER_ADDR, MASTER_PORT,
                                                      NLIP_PROCS_PER_NODE, NLIP_HOSTFILE (written into RUN_DIR)
    python3 slurm/job.py finish RUN_DIR RC            requeues the job when the run checkpointed on a signal,
                                                      and exits with the training's status otherwise

The rank mapping of the training processes themselves (SLURM_PROCID -> RANK, ...) is nlip_ds/distributed.py's.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# Written by nlip_ds/train/preempt.py on rank 0 after the preemption checkpoint.
PREEMPT_MARKER = "preempted.json"
PORT_BASE, PORT_SPAN = 20000, 20000


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def hostnames(nodelist: str) -> list[str]:
    return scontrol("show", "hostnames", nodelist).split()


def node_addr(node: str) -> str:
    """The node's address as SLURM knows it: node names need not resolve (a test cluster, some sites' DNS)."""
    for token in scontrol("show", "node", node).split():
        if token.startswith("NodeAddr="):
            return token.split("=", 1)[1]
    return node


def master_port(job_id: str) -> int:
    """One port per job, so that concurrent jobs sharing a node never collide on the rendezvous."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def write_hostfile(path: Path, hosts: list[str], slots: int) -> None:
    """DeepSpeed's hostfile: one `host slots=N` line per node of the allocation, in allocation order."""
    path.write_text("".join(f"{h} slots={slots}\n" for h in hosts))


def procs_per_node(env) -> int:
    """Training processes per node: NLIP_PROCS_PER_NODE, else one per allocated GPU, else one per task."""
    if env.get("NLIP_PROCS_PER_NODE"):
        return int(env["NLIP_PROCS_PER_NODE"])
    if int(env.get("SLURM_GPUS_ON_NODE") or 0) > 0:
        return int(env["SLURM_GPUS_ON_NODE"])
    # SLURM_NTASKS_PER_NODE is "8" or, for uneven layouts, "8(x2),4": the first node's count.
    return int((env.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0].split(",")[0])


def cmd_env(run_dir: str) -> int:
    env = os.environ
    hosts = hostnames(env["SLURM_JOB_NODELIST"])
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    hostfile = run / f"hostfile.{env['SLURM_JOB_ID']}"
    slots = procs_per_node(env)
    write_hostfile(hostfile, hosts, slots)
    (run / PREEMPT_MARKER).unlink(missing_ok=True)  # a marker left by an earlier job says nothing about this one
    exports = {"MASTER_ADDR": node_addr(hosts[0]), "MASTER_PORT": str(master_port(env["SLURM_JOB_ID"])),
               "NLIP_PROCS_PER_NODE": str(slots), "NLIP_HOSTFILE": str(hostfile)}
    print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in exports.items()))
    return 0


def cmd_finish(run_dir: str, rc: str) -> int:
    marker = Path(run_dir) / PREEMPT_MARKER
    job = os.environ.get("SLURM_JOB_ID", "")
    if marker.is_file():
        info = json.loads(marker.read_text())
        logger.warning("run checkpointed %s at step %s on %s; requeueing job %s", info["checkpoint"], info["step"],
                       info["signal"], job)
        # Requeueing a running job ends this batch step; the requeued job resumes from the checkpoint.
        scontrol("requeue", job)
        return 0
    logger.info("training exited with status %s; not requeued", rc)
    return int(rc)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[nlip-ds slurm] %(message)s")
    commands = {"env": (cmd_env, 1), "finish": (cmd_finish, 2)}
    if not argv or argv[0] not in commands or len(argv) != 1 + commands[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[0]][0](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
