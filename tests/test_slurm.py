"""slurm/train.sbatch on a real SLURM cluster: Debian's slurm-wlm and munge on localhost, one slurmctld and one
slurmd per node (`slurmd -N nodeN`, each with its own port), no systemd.

- a 2-node job through DeepSpeed's slurm launcher (`deepspeed --launcher slurm`) trains: losses in
  metrics.jsonl, the allocation's hostfile, a checkpoint with both ranks' state and ZeRO-3 shards;
- a 2-node job through plain srun, and one through one DeepSpeed launcher per node (`deepspeed --no_ssh
  --node_rank $SLURM_NODEID`), receives the pre-timeout signal (SIGUSR1, what `--signal=USR1@T` sends),
  checkpoints, requeues itself, and the requeued job resumes from that checkpoint and finishes the run.

The module-scoped `cluster` fixture starts the daemons once and stops every one it started, also when a test
fails. It installs slurm-wlm/munge with apt-get when they are missing (scripts/test.sh does the same) and skips
only when it cannot (not root, no apt-get).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nlip_ds.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent

NODES, CPUS_PER_NODE = 2, 2
START_TIMEOUT, JOB_TIMEOUT = 60, 420


def _ensure_installed() -> None:
    """slurm-wlm and munge, installed from Debian's archive when missing and possible; skip otherwise."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs slurmd as root (SlurmUser=root); not root here")
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if not shutil.which("apt-get"):
        pytest.skip("slurm-wlm/munge are not installed and cannot be (no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"could not install slurm-wlm/munge: {proc.stderr[-500:]}")


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                       timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class LocalCluster:
    """slurmctld + one slurmd per node on 127.0.0.1, all state under `root` (a fresh folder: no saved state)."""

    def __init__(self, root: Path, nodes: int, cpus: int):
        self.root, self.nodes, self.cpus = root, [f"node{i + 1}" for i in range(nodes)], cpus
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 Port={free_port()} CPUs={self.cpus} State=UNKNOWN"
                          for n in self.nodes)
        # linuxproc/task none: no cgroups needed; config_overrides: the declared CPUs, not the machine's, count.
        # A random first job id: slurm/job.py derives MASTER_PORT from it, and another session's test cluster on
        # this machine starts its ids elsewhere.
        self.conf.write_text(f"""ClusterName=nlipci
FirstJobId={random.randrange(1, 1_000_000)}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
AuthType=auth/munge
# A requeued job may start again only when the credentials of its last run expired (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, cmd: list[str], log: str, **kw) -> None:
        with open(self.root / "log" / log, "w") as out:
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, **kw))

    def start(self) -> None:
        self.write_conf()
        if not _munge_works():
            # Debian's munged runs as the munge user and keeps its socket in /run/munge.
            Path("/run/munge").mkdir(exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._spawn(["munged", "--foreground"], "munged.log", user="munge", group="munge")
            self._wait_for(_munge_works, "munged")
        self._spawn(["slurmctld", "-D"], "slurmctld.out")
        for node in self.nodes:
            self._spawn(["slurmd", "-D", "-N", node], f"slurmd.{node}.out")
        self._wait_for(self._nodes_idle, "all nodes idle")

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
        return sum(line.endswith(" idle") for line in out) == len(self.nodes)

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"local SLURM cluster: {what} not reached in {START_TIMEOUT} s\n{self.logs()}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")
        return proc

    def submit(self, args: list[str], env: dict) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **env}, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (kept for MinJobAge after the end; no accounting needed)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def wait(self, job_id: str, until=None, timeout: float = JOB_TIMEOUT) -> dict:
        """Poll until the job left the queue (or `until()` holds); squeue, not `sbatch --wait`, which can miss
        the end of a requeued job."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until():
                return self.job(job_id)
            if not self.run(["squeue", "-h", "-j", job_id], check=False).stdout.strip():
                return self.job(job_id)
            time.sleep(1)
        self.run(["scancel", job_id], check=False)
        raise AssertionError(f"job {job_id} not done in {timeout} s: {self.job(job_id)}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    _ensure_installed()
    c = LocalCluster(tmp_path_factory.mktemp("slurm"), NODES, CPUS_PER_NODE)
    request.addfinalizer(c.stop)  # registered before start: a half-started cluster is stopped too
    c.start()
    return c


def _submit_training(cluster, synth_dir: Path, tmp: Path, launch: str, *extra: str) -> tuple[str, Path, Path]:
    run_dir, out = tmp / "run", tmp / "job.out"
    args = ["--nodes", str(NODES), "--ntasks-per-node", "1", "--cpus-per-task", "1", "--gpus-per-node", "0",
            "--time", "15", "--output", str(out), "slurm/train.sbatch", "configs/tiny-cpu.yaml", str(run_dir),
            f"data.train={synth_dir / 'train'}", f"data.val={synth_dir / 'val'}",
            f"data.test={synth_dir / 'test'}", f"data.tokenizer={tmp / 'tokenizer'}", "train.micro_batch_size=16",
            "eval.enabled=false", "monitor.progress=false", "monitor.log_every=2", *extra]
    env = {"NLIP_LAUNCH": launch, "PYTHONPATH": str(ROOT), "NLIP_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return cluster.submit(args, env), run_dir, out


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}


def _explain(cluster, out: Path) -> str:
    return f"{out.read_text()[-6000:] if out.exists() else '(no job output)'}\n{cluster.logs()}"


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_deepspeed_slurm_launcher_job_trains(cluster, synth_dir, tmp_path):
    job, run_dir, out = _submit_training(cluster, synth_dir, tmp_path, "deepspeed-slurm", "train.epochs=1")
    info = cluster.wait(job)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", _explain(cluster, out)
    hosts = (run_dir / f"hostfile.{job}").read_text().split("\n")
    assert hosts[:2] == ["node1 slots=1", "node2 slots=1"]
    losses = _losses(run_dir)
    assert losses and all(v == v and v > 0 for v in losses.values())
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    ckpt = run_dir / "checkpoints" / tag
    # Every rank took part: each wrote its loader/RNG state and its ZeRO-3 shard.
    assert sorted(p.name for p in ckpt.glob("rank_state_*.pt")) == ["rank_state_00000.pt", "rank_state_00001.pt"]
    assert len(list(ckpt.glob("zero_pp_rank_*_model_states.pt"))) == 2
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    text = out.read_text()
    # DeepSpeed's slurm launcher sets no RANK: the ranks come from SLURM_PROCID through nlip_ds/distributed.py.
    assert "launch deepspeed-slurm," in text and "srun -n 2 --nodes 2" in text and "2 rank(s) via slurm" in text


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("launch", ["srun", "deepspeed"])
def test_pre_timeout_signal_checkpoints_requeues_and_resumes(cluster, synth_dir, tmp_path, launch):
    job, run_dir, out = _submit_training(cluster, synth_dir, tmp_path, launch, "train.epochs=3")
    metrics = run_dir / "metrics.jsonl"
    # The signal `--signal=USR1@T` sends before the limit, delivered now: once the ranks are training.
    cluster.wait(job, until=lambda: metrics.exists() and "train/loss" in metrics.read_text(), timeout=300)
    cluster.run(["scancel", "--signal=USR1", job])
    info = cluster.wait(job)
    text = out.read_text() if out.exists() else ""
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", _explain(cluster, out)
    assert info.get("Restarts") == "1", _explain(cluster, out)
    assert "preempted (SIGUSR1)" in text and "requeueing job" in text, _explain(cluster, out)
    assert "resumed from" in text, _explain(cluster, out)
    assert f"launch {launch}," in text
    assert "2 rank(s) via " + ("deepspeed" if launch == "deepspeed" else "slurm") in text
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in ckpt.glob("rank_state_*.pt")) == ["rank_state_00000.pt", "rank_state_00001.pt"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["world_size"] == 2 and ckpt.name == f"step{summary['steps']}"
    # The requeued job continued after the preemption checkpoint: every log step once, none repeated or lost.
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "train/loss" in x]
    assert logged == sorted(set(logged)) and logged[0] == 2
    assert set(range(2, summary["steps"] + 1, 2)) <= set(logged)


# ------------------------------------------------------------------ the helpers alone (fast, no cluster needed)


def _job_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurm_job", ROOT / "slurm" / "job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_helper_procs_per_node_port_and_hostfile(tmp_path):
    job = _job_module()
    assert job.procs_per_node({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8"}) == 8
    assert job.procs_per_node({"SLURM_GPUS_ON_NODE": "0", "SLURM_NTASKS_PER_NODE": "2(x3),1"}) == 2
    assert job.procs_per_node({"NLIP_PROCS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "8"}) == 4
    assert job.procs_per_node({}) == 1
    assert job.master_port("20001") != job.master_port("20002")
    assert all(job.PORT_BASE <= job.master_port(str(j)) < job.PORT_BASE + job.PORT_SPAN for j in (1, 99_999))
    job.write_hostfile(tmp_path / "h", ["gpu-a", "gpu-b"], 8)
    assert (tmp_path / "h").read_text() == "gpu-a slots=8\ngpu-b slots=8\n"


def test_finish_without_marker_keeps_the_training_status(tmp_path):
    assert _job_module().cmd_finish(str(tmp_path), "3") == 3


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_records_signal_agrees_and_exits_with_marker(tmp_path, sig):
    from nlip_ds.run.layout import RunFolder
    from nlip_ds.train.preempt import Preemption

    before = signal.getsignal(sig)
    with Preemption() as preempt:
        assert not preempt.agreed("cpu")
        os.kill(os.getpid(), sig)
        assert preempt.agreed("cpu")
        with pytest.raises(SystemExit) as exit_info:
            preempt.exit(str(tmp_path), 12, "step12")
    assert exit_info.value.code == 0
    marker = RunFolder(tmp_path).preempted
    assert json.loads(marker.read_text()) == {"signal": sig.name, "step": 12, "checkpoint": "step12"}
    assert signal.getsignal(sig) is before  # the previous handler is back
    assert RunFolder(tmp_path).preempted.name == _job_module().PREEMPT_MARKER  # slurm/job.py reads that file
