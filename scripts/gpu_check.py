"""The one-call GPU check behind scripts/gpu_check.sh (docs/performance.md, "GPU check").

Stages, each a subprocess with its own time limit inside one overall budget (default 450 s, under the 8 minutes
of one device call); a stage that fails or times out is reported and the next one runs:

    environment   GPU, driver, python and package versions
    wheels        pip install --no-index --target of the wheels in .whl/ (scripts/gpu_wheels.sh)
    build         the CUDA extension compiled just in time for this GPU's architecture
    selfcheck     the kernel self-check on cuda:0 (nlip_ds.ops.selfcheck), its error and tolerance
    loss          fused vs naive loss, N = 32768, d = 512, bf16: one process, and n = 4096 rows of N (one rank
                  of eight): time, peak memory, TFLOP/s against the measured bf16 GEMM rate
    tests         the CUDA cases of tests/test_contrastive.py, tests/test_selfcheck.py
    train-tiny    configs/tiny-cpu.yaml, 30 steps, bf16, ZeRO-3, 1 GPU, through `nlip-ds train`
    train-vitb32  configs/vit-b32-yfcc26m.yaml (ViT-B/32-sized), the same, on synthetic data
Writes report.md and report.json into --out (default $OUT, else gpu_check_report/).

--dry-run does the same on the CPU at tiny sizes (fp32, 3 training steps, a shrunken ViT), so the script is
known to work before a GPU is lent: tests/test_gpu_check.py runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Stage:
    name: str
    limit_s: int
    status: str = "not run"  # ok | failed | timeout | skipped | not run
    seconds: float = 0.0
    detail: str = ""
    data: dict = field(default_factory=dict)


class Check:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.site = self.work / "site"
        self.start = time.monotonic()
        self.stages: list[Stage] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(self.site), str(ROOT), self.env.get("PYTHONPATH", "")])
        self.env["PYTHONUNBUFFERED"] = "1"
        if self.dry:
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def remaining(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def run(self, stage: Stage, cmd: list[str], log: str) -> subprocess.CompletedProcess | None:
        """cmd under the stage's limit (cut to what the budget has left); None when it timed out."""
        limit = min(stage.limit_s * self.args.limit_scale, self.remaining())
        if limit < 5:
            stage.status, stage.detail = "skipped", "no time left in the budget"
            return None
        print(f"[gpu_check] {stage.name}: {' '.join(cmd)[:200]} (limit {limit:.0f} s)", flush=True)
        # A session of its own, so that a timeout ends the stage's whole process tree (loader workers too).
        child = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        try:
            stdout, stderr = child.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            stage.status = "timeout"
            stage.detail = f"stopped after {limit:.0f} s\n" + tail(stdout, stderr)
            write_log(self.work / log, stdout, stderr)
            return None
        proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
        write_log(self.work / log, proc.stdout, proc.stderr)
        stage.status = "ok" if proc.returncode == 0 else "failed"
        if proc.returncode != 0:
            stage.detail = f"exit {proc.returncode}\n" + tail(proc.stdout, proc.stderr)
        return proc

    def stage(self, name: str, limit_s: int, fn) -> None:
        stage = Stage(name, limit_s)
        self.stages.append(stage)
        began = time.monotonic()
        try:
            fn(stage)
        except Exception as err:  # a broken stage is reported; the check goes on
            stage.status, stage.detail = "failed", f"{type(err).__name__}: {err}"
        stage.seconds = round(time.monotonic() - began, 1)
        print(f"[gpu_check] {name}: {stage.status} in {stage.seconds:.0f} s", flush=True)


def tail(stdout, stderr, lines: int = 25) -> str:
    text = "\n".join(x if isinstance(x, str) else (x or b"").decode(errors="replace") for x in (stdout, stderr))
    return "\n".join(text.strip().splitlines()[-lines:])


def write_log(path: Path, stdout, stderr) -> None:
    path.write_text(tail(stdout, stderr, lines=400))


def python(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


# ---------------------------------------------------------------------------------------------- the stages


def environment(c: Check, s: Stage) -> None:
    proc = c.run(s, python("""
        import json, platform, torch
        from importlib import metadata
        def v(d):
            try: return metadata.version(d)
            except metadata.PackageNotFoundError: return None
        gpu = torch.cuda.is_available()
        info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "gpu": torch.cuda.get_device_name() if gpu else None,
                "capability": ".".join(map(str, torch.cuda.get_device_capability())) if gpu else None,
                **{d: v(d) for d in ("deepspeed", "timm", "transformers", "webdataset")}}
        print(json.dumps(info))
        """), "environment.log")
    if proc is not None and proc.returncode == 0:
        s.data = json.loads(proc.stdout.strip().splitlines()[-1])
        s.detail = ", ".join(f"{k} {v}" for k, v in s.data.items())
        if not c.dry and s.data["gpu"] is None:
            s.status, s.detail = "failed", "no CUDA device visible; " + s.detail


def wheels(c: Check, s: Stage) -> None:
    found = sorted((ROOT / ".whl").glob("*.whl"))
    if not found:
        s.status, s.detail = "skipped", "no .whl/ folder (scripts/gpu_wheels.sh fills it where PyPI is reachable)"
        return
    if sys.version_info[:2] != (3, 12):
        s.status = "skipped"
        s.detail = f"the wheels are for CPython 3.12 (the GPU machine's); this is {sys.version.split()[0]}"
        return
    c.run(s, [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
              "--upgrade", "--target", str(c.site), *map(str, found)], "wheels.log")
    s.detail = s.detail or f"{len(found)} wheels into {c.site}"


def build(c: Check, s: Stage) -> None:
    kind = "cpu" if c.dry else "cuda"
    if not c.dry:
        cap = c.stages[0].data.get("capability")
        c.env["TORCH_CUDA_ARCH_LIST"] = cap or "9.0"
    c.run(s, python(f"""
        import time
        from nlip_ds.ops import extension
        start = time.perf_counter()
        assert extension.load("{kind}") is not None, extension.load_error("{kind}")
        print(f"nlip_ds {kind} extension ready in {{time.perf_counter() - start:.0f}} s")
        """), "build.log")
    s.detail = s.detail or f"{kind} extension (TORCH_CUDA_ARCH_LIST={c.env.get('TORCH_CUDA_ARCH_LIST', '-')})"


def selfcheck(c: Check, s: Stage) -> None:
    device = "cpu" if c.dry else "cuda:0"
    proc = c.run(s, python(f"""
        import json, torch
        from dataclasses import asdict
        from nlip_ds.ops import selfcheck
        r = selfcheck.check_device(torch.device("{device}"))
        assert r is not None, "no compiled kernel for {device}"
        print(json.dumps(asdict(r)))
        raise SystemExit(0 if r.ok else 1)
        """), "selfcheck.log")
    if proc is not None and proc.stdout.strip():
        s.data = json.loads(proc.stdout.strip().splitlines()[-1])
        s.detail = (f"{s.data['device']}: {'passed' if s.data['ok'] else 'FAILED ' + s.data['detail']} "
                    f"(error {s.data['error']:.2g}, tolerance {s.data['tolerance']:.2g})")


def loss(c: Check, s: Stage) -> None:
    sizes = ["--device", "cpu", "--dtype", "fp32", "--sizes", "512", "--dim", "64", "--local-rows", "128",
             "--reps", "1"] if c.dry else ["--device", "cuda", "--dtype", "bf16", "--sizes", "32768", "--dim", "512",
                                          "--local-rows", "4096", "--reps", "3"]
    result = c.work / "loss.json"
    proc = c.run(s, [PY, "benchmarks/bench_contrastive.py", *sizes, "--json", str(result)], "loss.log")
    if proc is not None and proc.returncode == 0:
        s.data = json.loads(result.read_text())
        s.detail = proc.stdout[proc.stdout.find("One process"):].strip()


def tests(c: Check, s: Stage) -> None:
    select = ["-k", "cpu and n7-N20-off13 and fp32"] if c.dry else ["-k", "cuda"]
    c.run(s, [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_contrastive.py", *select,
              "tests/test_selfcheck.py"], "tests.log")
    log = (c.work / "tests.log").read_text().strip().splitlines()
    s.detail = (s.detail + "\n" if s.detail else "") + (log[-1] if log else "")


def train_data(c: Check) -> Path:
    data = c.work / "data"
    if not (data / "train" / "index.json").is_file():
        subprocess.run([PY, "-m", "nlip_ds.cli", "data", "synth", "--out", str(data), "--num-samples",
                        "160" if c.dry else "4000"], cwd=ROOT, env=c.env, check=True, capture_output=True,
                       timeout=max(5.0, min(120.0, c.remaining())))
    return data


def train_args(c: Check, config: str, name: str, data: Path, extra: list[str]) -> list[str]:
    steps = 3 if c.dry else 30
    return ["train", "--config", config, f"data.train={data}/train", f"data.val={data}/val",
            f"data.test={data}/test", f"data.tokenizer={data}/tokenizer", f"train.output_dir={c.work}/run-{name}",
            f"train.max_steps={steps}", "train.epochs=20", f"train.precision={'fp32' if c.dry else 'bf16'}",
            "eval.enabled=false", "monitor.tensorboard=false", "monitor.log_every=5" if not c.dry else
            "monitor.log_every=1", "deepspeed.config=ds_configs/zero3.json", *extra]


def train(c: Check, s: Stage, config: str, name: str, extra: list[str]) -> None:
    data = train_data(c)  # counted in the stage's seconds, not in its limit
    args = train_args(c, config, name, data, extra)
    result = c.work / f"train-{name}.json"
    c.run(s, [PY, str(Path(__file__).resolve()), "--train-probe", str(result), "--", *args], f"train-{name}.log")
    if result.is_file():
        s.data = json.loads(result.read_text())
        s.detail = (s.detail + "\n" if s.detail else "") + \
            f"{s.data.get('samples_per_s', float('nan')):.1f} samples/s, peak memory {s.data['peak_mib']:.0f} MiB"


def train_probe(result: str, argv: list[str]) -> int:
    """In the stage's subprocess: `nlip-ds train` in process, then its samples/s and peak memory."""
    import torch

    from nlip_ds.cli import main

    status = main(argv)
    run = Path(next(a for a in argv if a.startswith("train.output_dir=")).split("=", 1)[1])
    rates = [json.loads(line).get("throughput/samples_per_s") for line in (run / "metrics.jsonl").open()] \
        if (run / "metrics.jsonl").is_file() else []
    rates = [r for r in rates if r is not None]
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mib()
    Path(result).write_text(json.dumps({"status": status, "samples_per_s": rates[-1] if rates else None,
                                        "peak_mib": peak, "logged_rates": rates}))
    return status


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


VITB32_DRY = ["model.vision.name=vit_custom", "model.vision.image_size=64", "model.vision.width=64",
              "model.vision.depth=1", "model.vision.heads=2", "model.text.width=64", "model.text.depth=1",
              "model.text.heads=2", "model.decoder.width=64", "model.decoder.depth=1", "model.decoder.heads=2",
              "model.mae.width=64", "model.mae.depth=1", "model.mae.heads=2", "model.embed_dim=64",
              "model.text.context_length=32", "model.decoder.max_length=32"]


def stages(c: Check) -> None:
    c.stage("environment", 30, lambda s: environment(c, s))
    c.stage("wheels", 40, lambda s: wheels(c, s))
    c.stage("build", 150, lambda s: build(c, s))
    c.stage("selfcheck", 40, lambda s: selfcheck(c, s))
    c.stage("loss", 60, lambda s: loss(c, s))
    c.stage("tests", 60, lambda s: tests(c, s))
    c.stage("train-tiny", 60, lambda s: train(c, s, "configs/tiny-cpu.yaml", "tiny",
                                              ["train.micro_batch_size=8" if c.dry else "train.micro_batch_size=256"]))
    c.stage("train-vitb32", 90, lambda s: train(c, s, "configs/vit-b32-yfcc26m.yaml", "vitb32",
                                                (VITB32_DRY + ["train.micro_batch_size=8", "data.workers=1"])
                                                if c.dry else ["train.micro_batch_size=128", "data.workers=4",
                                                               "completion.enabled=false"]))


# ---------------------------------------------------------------------------------------------- the report


def write_report(c: Check) -> None:
    c.out.mkdir(parents=True, exist_ok=True)
    report = {"mode": "dry-run (CPU, tiny sizes)" if c.dry else "GPU", "budget_s": c.args.budget,
              "total_s": round(time.monotonic() - c.start, 1), "stages": [asdict(s) for s in c.stages]}
    (c.out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"# nlip-ds GPU check ({report['mode']})", "",
             f"Total {report['total_s']:.0f} s of a {c.args.budget} s budget.", "",
             "| stage | status | seconds | limit | summary |", "|---|---|---|---|---|"]
    for s in c.stages:
        first = s.detail.strip().splitlines()[0] if s.detail.strip() else ""
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.limit_s} | {first[:160]} |")
    for s in c.stages:
        if s.detail.strip():
            lines += ["", f"## {s.name}", "", "```", s.detail.strip(), "```"]
    (c.out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"[gpu_check] report: {c.out / 'report.md'}, {c.out / 'report.json'}", flush=True)


def main() -> int:
    if "--train-probe" in sys.argv:
        i = sys.argv.index("--train-probe")
        return train_probe(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="everything that needs no GPU, on the CPU, tiny")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_report",
                        help="folder for report.md and report.json (default $OUT, else gpu_check_report/)")
    parser.add_argument("--work", default="/tmp/nlip_gpu_check", help="scratch: wheels target, data, runs, logs")
    parser.add_argument("--budget", type=int, default=None,
                        help="seconds for all stages together (default 450; 2400 with --dry-run)")
    parser.add_argument("--limit-scale", type=float, default=None,
                        help="multiplies every stage's time limit (default 1; 6 with --dry-run, for slow CPUs)")
    args = parser.parse_args()
    args.budget = args.budget or (2400 if args.dry_run else 450)
    args.limit_scale = args.limit_scale or (6.0 if args.dry_run else 1.0)
    c = Check(args)
    c.work.mkdir(parents=True, exist_ok=True)
    try:
        stages(c)
    finally:
        write_report(c)
    return 0 if all(s.status in ("ok", "skipped") for s in c.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
