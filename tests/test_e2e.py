"""End-to-end runs of the real entry points on tiny synthetic data (marked slow; CI runs them).

- `deepspeed --num_gpus 2 --module nlip_ds.cli train`: 2 CPU ranks under ZeRO-3, a GMM refit, evaluation of
  every task but the probe (caption included); leaves a loadable checkpoint, metrics.jsonl, TensorBoard events
  with the expected tags, end-of-training numbers that `nlip-ds eval` on the run folder reproduces, and exports
  to a model that reproduces the run's evaluation without DeepSpeed.
- exact resume: a run stopped mid-epoch and resumed gives the same per-step losses as the uninterrupted run,
  through a GMM refit after the resume point.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlip_ds.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 900


def _overrides(synth_dir: Path, tokenizer_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train={synth_dir / 'train'}", f"data.val={synth_dir / 'val'}",
            f"data.test={synth_dir / 'test'}", f"data.tokenizer={tokenizer_dir}", f"train.output_dir={run_dir}",
            "train.micro_batch_size=16", "data.workers=1", "eval.batch_size=16", "monitor.progress=false", *extra]


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], threads: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd[:6])} ... failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ds_run(synth_dir, tmp_path_factory):
    """One 2-rank run through the deepspeed launcher, shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("ds") / "run"
    tok = tmp_path_factory.mktemp("ds_tok") / "tokenizer"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
           *_overrides(synth_dir, tok, run_dir, "train.epochs=2", "noise.warmup_epochs=1", "monitor.log_every=2",
                       "eval.tasks=[zeroshot,retrieval,caption]", "eval.max_tokens=8")]
    proc = _run(cmd)
    return run_dir, tok, proc


@pytest.mark.slow
def test_deepspeed_run_leaves_checkpoint_metrics_and_summary(ds_run):
    run_dir, _, proc = ds_run
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert sorted(p.name for p in (ckpt / tag).glob("rank_state_*.pt")) == ["rank_state_00000.pt",
                                                                          "rank_state_00001.pt"]
    assert len(list((ckpt / tag).glob("zero_pp_rank_*_model_states.pt"))) == 2  # ZeRO-3 shards of both ranks
    assert (run_dir / "config.yaml").is_file() and "git_sha" in (run_dir / "run.json").read_text()
    tags = set().union(*(m.keys() for m in _metrics(run_dir)))
    assert {"train/loss", "train/contrastive_loss", "train/caption_loss", "noise/rate", "noise/auc",
            "eval/zeroshot_top1", "eval/i2t_r1", "eval/bleu4", "eval/cider"} <= tags
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert 0.0 <= summary["noise"]["noise/auc"] <= 1.0
    assert "=== nlip-ds run summary ===" in proc.stdout


@pytest.mark.slow
def test_cpu_ranks_leave_no_shared_memory_buffer_behind(ds_run):
    """DeepSpeed's CPU allreduce gives each rank a 66 MB /dev/shm file named after the rendezvous port and never
    removes it; the engine unlinks the names once every rank has mapped them (train/engine.py)."""
    _, _, proc = ds_run
    port = proc.args[proc.args.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.slow
def test_tensorboard_events_have_expected_tags(ds_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = ds_run
    acc = EventAccumulator(str(run_dir / "tensorboard" / "nlip"), size_guidance={"images": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "throughput/samples_per_s", "noise/rate", "noise/auc",
            "eval/zeroshot_top1"} <= scalars
    assert {"noise/per_sample_loss", "noise/epsilon"} <= set(acc.Tags()["histograms"])
    assert "noise/loss_histogram_fit" in acc.Tags()["images"]
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*")), "DeepSpeed's own monitor wrote nothing"


@pytest.mark.slow
def test_export_loads_without_deepspeed_and_reproduces_eval(ds_run, tmp_path):
    run_dir, _, _ = ds_run
    out = tmp_path / "export"
    _run([sys.executable, "-m", "nlip_ds.cli", "export", "--checkpoint", str(run_dir), "--out", str(out)])
    code = f"""
import json, sys, yaml
sys.modules['deepspeed'] = None  # loading must not need DeepSpeed
from nlip_ds.config import from_dict
from nlip_ds.data.tokenizer import load_tokenizer
from nlip_ds.eval.tasks import EvalOptions, evaluate
from nlip_ds.model import NLIPModel
model = NLIPModel.from_pretrained({str(out)!r})
cfg = from_dict(yaml.safe_load(open({str(run_dir / 'config.yaml')!r})))
tok = load_tokenizer({str(out / 'tokenizer')!r})
print(json.dumps(evaluate(model, tok, EvalOptions.from_config(cfg))["metrics"]))
"""
    proc = _run([sys.executable, "-c", code])
    exported = json.loads(proc.stdout.strip().splitlines()[-1])
    during_run = json.loads((run_dir / "summary.json").read_text())["eval"]
    for key in ("zeroshot_top1", "i2t_r1", "t2i_r1", "bleu4", "cider"):
        assert exported[key] == pytest.approx(during_run[key], abs=1e-6), key


@pytest.mark.slow
def test_end_of_training_numbers_equal_nlip_ds_eval_on_the_run(ds_run, synth_dir, tmp_path):
    """The same checkpoint and data through `nlip-ds eval` (one process) give the numbers the 2-rank run wrote."""
    import yaml

    run_dir, _, _ = ds_run
    during_run = json.loads((run_dir / "summary.json").read_text())["eval"]
    saved = json.loads((run_dir / "eval" / "end_of_training.json").read_text())
    assert saved["metrics"] == during_run and saved["tasks"] == ["zeroshot", "retrieval", "caption"]
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["templates"]))
    task_args = {"zeroshot": ["--templates", templates], "retrieval": [], "caption": ["--max-tokens", "8"]}
    for task, extra in task_args.items():
        out = tmp_path / f"{task}.json"
        _run([sys.executable, "-m", "nlip_ds.cli", "eval", "--checkpoint", str(run_dir), "--task", task, "--data",
              str(synth_dir / "test"), "--batch-size", "16", "--out", str(out), "--no-tensorboard",
              *map(str, extra)])
        metrics = json.loads(out.read_text())["metrics"]
        assert metrics, task
        for key, value in metrics.items():
            assert during_run[key] == pytest.approx(value, abs=1e-6), (task, key)


@pytest.mark.slow
def test_export_formats_of_the_run_compute_what_its_nlip_export_computes(ds_run, tmp_path):
    """docs/export.md: one call writes three folders; transformers' CLIPModel reads the run's towers exactly and
    each README names the run and the git SHA it was trained at."""
    run_dir, _, _ = ds_run
    out = tmp_path / "exports"
    proc = _run([sys.executable, "-m", "nlip_ds.cli", "export", "--checkpoint", str(run_dir), "--out", str(out),
                 "--format", "nlip", "hf-clip", "open_clip"])
    assert all(f"exported {fmt} to {out / fmt}" in proc.stdout for fmt in ("nlip", "hf-clip", "open_clip"))
    train_sha = json.loads((run_dir / "run.json").read_text())["git_sha"]
    for fmt in ("nlip", "hf-clip", "open_clip"):
        readme = (out / fmt / "README.md").read_text()
        assert train_sha in readme and str(run_dir) in readme, fmt
    code = f"""
import torch
from transformers import CLIPModel
from nlip_ds.data.tokenizer import load_tokenizer
from nlip_ds.model import NLIPModel
ours = NLIPModel.from_pretrained({str(out / 'nlip')!r})
hf = CLIPModel.from_pretrained({str(out / 'hf-clip')!r}).eval()
tok = load_tokenizer({str(out / 'nlip' / 'tokenizer')!r})
ids, mask = tok.encode(["a red circle", "two blue squares"], ours.text.context_length)
images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    o = hf(input_ids=ids, attention_mask=mask, pixel_values=images)
    diff = max((o.image_embeds - ours.encode_image(images)).abs().max().item(),
               (o.text_embeds - ours.encode_text(ids, mask)).abs().max().item())
print(diff)
"""
    assert float(_run([sys.executable, "-c", code]).stdout.strip().splitlines()[-1]) <= 1e-5


@pytest.mark.slow
def test_exact_resume_matches_uninterrupted_run(synth_dir, tmp_path):
    tok = tmp_path / "tokenizer"
    common = ["train.epochs=2", "noise.warmup_epochs=1", "monitor.log_every=1", "eval.enabled=false"]
    base = [sys.executable, "-m", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml"]
    full, split = tmp_path / "full", tmp_path / "split"
    _run(base + _overrides(synth_dir, tok, full, *common), threads=2)
    _run(base + _overrides(synth_dir, tok, split, *common, "train.max_steps=5"), threads=2)
    _run(base + _overrides(synth_dir, tok, split, *common, "train.resume=latest"), threads=2)

    def losses(run):
        return {m["step"]: m["train/loss"] for m in _metrics(run) if "train/loss" in m}

    want, got = losses(full), losses(split)
    assert len(want) >= 10 and got.keys() == want.keys()
    for step in sorted(want):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}"
    refits = [m for m in _metrics(split) if "noise/rate" in m]
    assert refits and refits[0]["step"] > 5, "the GMM refit should happen after the resume point"


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def _visible_text(html: str) -> str:
    import re

    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.slow
@pytest.mark.browser
def test_tensorboard_shows_train_and_noise_scalars_in_a_browser(ds_run, tmp_path):
    import time
    import urllib.request

    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (scripts/test.sh installs Debian's chromium when run as root)")
    run_dir, _, _ = ds_run
    port = free_port()
    tb = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(run_dir / "tensorboard"),
                           "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "data/runs", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
                              url + "#timeseries"], capture_output=True, text=True, timeout=180).stdout
    finally:
        tb.terminate()
        tb.wait(timeout=30)
    text = _visible_text(dom)
    assert " nlip " in text and " deepspeed " in text, "the runs are not listed"
    import re

    groups = dict(re.findall(r"\b(train|noise|eval) (\d+) cards", text))
    assert int(groups.get("train", 0)) >= 4 and int(groups.get("noise", 0)) >= 5, f"tag groups seen: {groups}"
