"""`nlip-ds eval` end to end: on a random-weight export (fast), and on a short two-rank training run's ZeRO-3
folder and its export, evaluated on one process and on two (slow)."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from nlip_ds.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def karpathy_from_shards(split_dir: Path, out: Path) -> Path:
    """A Karpathy-style JSON over the images of `split_dir`'s shards: each image's noisy and clean caption."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        for key in sorted({name.split(".")[0] for name in members}):
            (out / f"{key}.png").write_bytes(members[f"{key}.png"])
            meta = json.loads(members[f"{key}.json"])
            captions = [members[f"{key}.txt"].decode(), meta["clean_caption"]]
            entries.append({"filename": f"{key}.png", "split": "test", "sentences": [{"raw": c} for c in captions]})
    path = out / "captions.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def _scalars(folder: Path) -> set:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return set(EventAccumulator(str(folder / "tensorboard" / "nlip")).Reload().Tags()["scalars"])


# ------------------------------------------------------------------------------------------------ fast


def test_zeroshot_on_an_export_writes_json_tensorboard_and_a_table(cli, random_export, synth_dir, tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {}.\na drawing of a {}.\n")
    status, out, _ = cli("eval", "--checkpoint", random_export, "--task", "zeroshot", "--data",
                         synth_dir / "test", "--templates", tmp_path / "t.txt", "--batch-size", 16)
    assert status == 0
    results = json.loads((random_export / "eval" / "zeroshot.json").read_text())
    assert results["num_images"] == 40 and results["templates"] == ["a photo of a {}.", "a drawing of a {}."]
    assert set(results["metrics"]) == {"zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_top1"}
    assert sum(c["count"] for c in results["per_class"].values()) == 40
    assert "zeroshot_top1" in out and "per-class top-1" in out
    assert "eval/zeroshot_top1" in _scalars(random_export / "eval")


def test_zeroshot_in_bf16_records_its_precision_and_embeds_like_fp32(cli, random_export, synth_dir, tmp_path):
    from nlip_ds.data.samples import normalize
    from nlip_ds.eval.checkpoint import load_for_eval

    status, _, err = cli("eval", "--checkpoint", random_export, "--task", "zeroshot", "--data", synth_dir / "test",
                         "--precision", "bf16", "--out", tmp_path / "bf16.json", "--no-tensorboard")
    assert status == 0, err
    results = json.loads((tmp_path / "bf16.json").read_text())
    assert results["precision"] == "bf16" and 0.0 <= results["metrics"]["zeroshot_top1"] <= 1.0
    fp32, bf16 = (load_for_eval(random_export, precision=p).model for p in ("fp32", "bf16"))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and not bf16.training
    images = normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        cosine = (fp32.encode_image(images) * bf16.encode_image(images).float()).sum(-1)
    assert cosine.min() > 0.99


def test_retrieval_on_a_karpathy_json(cli, random_export, synth_dir, tmp_path):
    captions = karpathy_from_shards(synth_dir / "test", tmp_path / "k")
    status, out, _ = cli("eval", "--checkpoint", random_export, "--task", "retrieval", "--data", captions,
                         "--out", tmp_path / "r.json", "--no-tensorboard")
    assert status == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert (results["num_images"], results["num_captions"]) == (40, 80)
    assert set(results["metrics"]) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(0.0 <= v <= 1.0 for v in results["metrics"].values())


def image_folder_from_shards(split_dir: Path, classes: list[str], out: Path) -> Path:
    """root/<class>/<key>.png from the shards' images and .cls labels."""
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        for key in sorted({name.split(".")[0] for name in members}):
            folder = out / classes[int(members[f"{key}.cls"])]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{key}.png").write_bytes(members[f"{key}.png"])
    return out


def test_zeroshot_and_probe_on_an_image_folder_name_a_broken_image(cli, random_export, synth_dir, tmp_path):
    classes = (synth_dir / "classes.txt").read_text().split()
    root = image_folder_from_shards(synth_dir / "test", classes, tmp_path / "folder")
    broken = root / classes[0] / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    status, out, _ = cli("eval", "--checkpoint", random_export, "--task", "zeroshot", "--data", root,
                         "--classes", synth_dir / "classes.txt", "--linear-probe", "--train-data", root,
                         "--out", tmp_path / "z.json", "--no-tensorboard")
    assert status == 0
    results = json.loads((tmp_path / "z.json").read_text())
    assert results["num_images"] == 40 and "linear_probe_top1" in results["metrics"]
    # listed once for the evaluation set and once for the probe's training set (the same folder here)
    assert [s["file"] for s in results["skipped"]] == [str(broken)] * 2
    assert f"{broken}: undecodable_image" in out


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/nowhere", "--task", "zeroshot", "--data", "{test}"], "nowhere does not exist"),
    (["--checkpoint", "{export}", "--task", "zeroshot", "--data", "{test}", "--classes", "{tmp}/none.txt"],
     "none.txt does not exist"),
    (["--checkpoint", "{export}", "--task", "retrieval", "--data", "{tmp}/captions.json"],
     "captions.json does not exist"),
    (["--checkpoint", "{export}", "--task", "zeroshot", "--data", "{test}", "--linear-probe"],
     "--linear-probe needs --train-data"),
    (["--checkpoint", "{export}", "--task", "zeroshot", "--data", "{test}", "--batch-size", "0"],
     "--batch-size must be at least 1"),
    pytest.param(["--checkpoint", "{export}", "--task", "zeroshot", "--data", "{test}", "--precision", "fp16",
                  "--device", "cpu"], "--precision fp16 needs a GPU", id="fp16-on-cpu"),
])
def test_bad_inputs_are_one_error_line_naming_the_file(cli, random_export, synth_dir, tmp_path, args, message):
    fill = dict(tmp=tmp_path, test=synth_dir / "test", export=random_export)
    status, _, err = cli("eval", *[a.format(**fill) for a in args])
    assert status == 2 and err.startswith("nlip-ds eval: error:") and message in err


# ------------------------------------------------------------------------------------------------ slow


def _run(*cmd, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in TOPOLOGY_VARS:
        env.pop(var, None)
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:6]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _eval(*args):
    return _run(sys.executable, "-m", "nlip_ds.cli", "eval", *args)


@pytest.fixture(scope="module")
def trained_run(synth_dir, tmp_path_factory):
    """A one-epoch ZeRO-3 run on two CPU processes (each saves its own shard of the weights), and its export."""
    base = tmp_path_factory.mktemp("eval_run")
    run_dir, export_dir = base / "run", base / "export"
    _run(Path(sys.executable).parent / "deepspeed", "--num_gpus", "2", "--master_port", free_port(), "--module",
         "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
         f"data.train={synth_dir / 'train'}", f"data.val={synth_dir / 'val'}", f"data.test={synth_dir / 'test'}",
         f"data.tokenizer={base / 'tokenizer'}", f"train.output_dir={run_dir}", "train.epochs=1",
         "train.micro_batch_size=16", "data.workers=0", "eval.enabled=false", "monitor.progress=false")
    _run(sys.executable, "-m", "nlip_ds.cli", "export", "--checkpoint", run_dir, "--out", export_dir)
    return run_dir, export_dir


@pytest.mark.slow
def test_run_folder_and_its_export_give_the_same_zeroshot_and_probe(trained_run, synth_dir):
    run_dir, export_dir = trained_run
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert len(list((run_dir / "checkpoints" / tag).glob("zero_pp_rank_*_model_states.pt"))) == 2
    common = ["--task", "zeroshot", "--data", synth_dir / "test", "--linear-probe", "--train-data",
              synth_dir / "val"]
    proc = _eval("--checkpoint", run_dir, *common)
    _eval("--checkpoint", export_dir, *common)
    from_run = json.loads((run_dir / "eval" / "zeroshot.json").read_text())
    from_export = json.loads((export_dir / "eval" / "zeroshot.json").read_text())
    assert from_run["step"] > 0 and from_export["step"] == 0
    assert from_run["metrics"].keys() >= {"zeroshot_top1", "zeroshot_top5", "linear_probe_top1"}
    for key, value in from_run["metrics"].items():
        assert from_export["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert {"eval/zeroshot_top1", "eval/linear_probe_top1", "train/loss"} <= _scalars(run_dir)
    assert "linear_probe_top1" in proc.stdout


@pytest.mark.slow
def test_caption_on_the_export_scores_generated_captions(trained_run, synth_dir):
    _, export_dir = trained_run
    _eval("--checkpoint", export_dir, "--task", "caption", "--data", synth_dir / "test", "--max-samples", "12",
          "--strategy", "beam", "--max-tokens", "12")
    results = json.loads((export_dir / "eval" / "caption.json").read_text())
    assert results["num_images"] == 12 and len(results["captions"]) == 12
    assert {"bleu1", "bleu4", "meteor", "rouge_l", "cider"} <= results["metrics"].keys()
    assert results["notes"] == {"tokenizer": "ptb", "missing": {}}
    assert all(c["references"] for c in results["captions"])


@pytest.mark.slow
def test_two_processes_give_the_one_process_retrieval(trained_run, synth_dir, tmp_path):
    run_dir, _ = trained_run
    captions = karpathy_from_shards(synth_dir / "test", tmp_path / "k")
    args = ["--checkpoint", run_dir, "--task", "retrieval", "--data", captions, "--no-tensorboard"]
    _eval(*args, "--out", tmp_path / "one.json")
    torchrun = Path(sys.executable).parent / "torchrun"
    _run(torchrun, "--nproc_per_node", "2", "--master_port", free_port(), "-m", "nlip_ds.cli", "eval", *args,
         "--out", tmp_path / "two.json")
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and (two["num_images"], two["num_captions"]) == (40, 80)
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, abs=1e-6), key
