"""An output folder that holds another run is refused before any work, naming the folder, unless the run resumes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlip_ds.config import ConfigError, load_config
from nlip_ds.run.layout import RUN_FILES, check_run_folder

ROOT = Path(__file__).resolve().parent.parent


def _cfg(run_dir: Path, *overrides: str):
    return load_config(None, [f"train.output_dir={run_dir}", *overrides])


def test_a_new_or_empty_folder_or_one_without_a_run_is_accepted(tmp_path):
    check_run_folder(_cfg(tmp_path / "new"))
    check_run_folder(_cfg(tmp_path))
    (tmp_path / "notes.txt").write_text("not a run")
    check_run_folder(_cfg(tmp_path))


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_folder_with_a_previous_run_is_refused_unless_resuming(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(ConfigError) as err:
        check_run_folder(_cfg(tmp_path))
    assert str(tmp_path) in str(err.value) and name in str(err.value)
    assert "train.resume=latest" in str(err.value) and "train.output_dir" in str(err.value)
    check_run_folder(_cfg(tmp_path, "train.resume=latest"))


def test_cli_refuses_before_writing_anything(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    cmd = [sys.executable, "-m", "nlip_ds.cli", "train", "--config", "configs/tiny-cpu.yaml",
           f"train.output_dir={run}", f"data.tokenizer={tmp_path / 'tokenizer'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"train.output_dir: {run} holds a previous run (metrics.jsonl)" in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert not (tmp_path / "tokenizer").exists()


# ------------------------------------------------------------------------ layout: one owner for every path


def test_the_writers_put_their_files_where_the_run_folder_says(tmp_path):
    from nlip_ds.monitor import MetricSink
    from nlip_ds.run.layout import RunFolder, read_config, write_resolved
    from nlip_ds.train.engine import build_ds_config

    run = RunFolder(tmp_path / "run")
    cfg = _cfg(run.root)
    assert write_resolved(cfg, run.root) == run.config and run.run_info.is_file()
    assert read_config(run) == cfg
    sink = MetricSink(run.root, enabled=True, tensorboard=True)
    sink.log({"train/loss": 1.0}, 1)
    sink.close()
    assert run.metrics.read_text().count("train/loss") == 1 and any(run.tensorboard_nlip.iterdir())
    assert build_ds_config(cfg, 1)["tensorboard"]["output_path"] == str(run.tensorboard)
    assert {p.name for p in run.root.iterdir()} <= set(RUN_FILES)  # check_run_folder would see each of them
    assert run.checkpoint(12) == run.checkpoints / "step12" and run.eval_result("caption").parent == run.eval_dir


def test_folder_kind_and_checkpoint_root_name_what_they_found(tmp_path):
    from nlip_ds.run.layout import checkpoint_root, folder_kind, step_of

    run, export = tmp_path / "run", tmp_path / "export"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step3")
    export.mkdir()
    (export / "config.json").write_text("{}")
    assert folder_kind(run) == folder_kind(run / "checkpoints") == "run" and folder_kind(export) == "export"
    assert checkpoint_root(run) == checkpoint_root(run / "checkpoints") == run / "checkpoints"
    with pytest.raises(FileNotFoundError, match="neither a training run folder"):
        folder_kind(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"expected .*/checkpoints/latest"):
        checkpoint_root(export)
    assert [step_of("step12"), step_of("step7.0badc0de.partial"), step_of("final")] == [12, 7, 0]


# ----------------------------------------------------- the commit: nothing partial is ever visible as a step


def _commit(root: Path, tag: str, write, keep: int = 2) -> Path:
    from nlip_ds.run.checkpoint import commit_save

    return commit_save(root, tag, write, {"step": int(tag[4:])}, {"rank": 0}, zero_stage=0,
                       param_shapes={"w": [2]}, keep=keep)


def _engine_files(staging: Path) -> None:
    staging.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, staging / "mp_rank_00_model_states.pt")


def test_a_save_is_invisible_until_committed_and_a_failed_one_leaves_the_last_checkpoint(tmp_path):
    from nlip_ds.run.checkpoint import MANIFEST, read_latest, verify_checkpoint

    root = tmp_path / "checkpoints"
    _commit(root, "step1", _engine_files)
    seen = {}

    def write_and_look(staging: Path) -> None:
        _engine_files(staging)
        seen["dirs"] = sorted(p.name for p in root.iterdir() if p.is_dir())
        seen["latest"] = read_latest(root)

    folder = _commit(root, "step2", write_and_look)
    assert seen["latest"] == "step1" and seen["dirs"][0] == "step1" and len(seen["dirs"]) == 2
    assert seen["dirs"][1].startswith("step2.") and seen["dirs"][1].endswith(".partial")  # only the staging name
    assert read_latest(root) == "step2" and verify_checkpoint(folder)["files"].keys() == {
        "mp_rank_00_model_states.pt", "rank_state_00000.pt"} and (folder / MANIFEST).is_file()

    def write_and_fail(staging: Path) -> None:
        _engine_files(staging)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _commit(root, "step3", write_and_fail)
    assert read_latest(root) == "step2" and not (root / "step3").exists()
    _commit(root, "step4", _engine_files)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step2", "step4"]  # the failed staging is gone


# ------------------------------------------------------------- shape-affecting keys come from config metadata


MODEL_BASE = ("model.mae.enabled=true", "model.vision.mask_ratio=0.5")  # so that every model.mae.* key acts
CHANGES = {  # one valid new value for every model.* key
    "model.vision.name": None, "model.vision.image_size": 48, "model.vision.patch_size": 16,
    "model.vision.width": 96, "model.vision.depth": 3, "model.vision.heads": 4, "model.vision.mlp_ratio": 2.0,
    "model.vision.mask_ratio": 0.25, "model.vision.pretrained_path": "/nowhere/vit.safetensors",
    "model.vision.layout": "timm", "model.vision.pos_embed_std": 0.5,
    "model.text.width": 96, "model.text.depth": 3, "model.text.heads": 4, "model.text.context_length": 48,
    "model.text.concept_dropout": 0.2, "model.text.prefix_in_embedding": True, "model.text.concept_grad": False,
    "model.decoder.width": 96, "model.decoder.depth": 3, "model.decoder.heads": 4, "model.decoder.max_length": 48,
    "model.decoder.label_smoothing": 0.0, "model.decoder.dropout": 0.0, "model.decoder.loss_weight": 0.5,
    "model.mae.enabled": False, "model.mae.width": 96, "model.mae.depth": 2, "model.mae.heads": 4,
    "model.mae.loss_weight": 0.5, "model.embed_dim": 32, "model.logit_scale_init": 10.0,
    "model.logit_scale_max": 50.0,
}
# Shape keys whose change keeps every parameter's shape but not its meaning: the head count splits the same
# weights differently, and a named timm model is another architecture (built by timm, not cheaply here).
SAME_SHAPES_OTHER_MODEL = {"model.vision.heads", "model.text.heads", "model.decoder.heads", "model.mae.heads",
                           "model.vision.name"}


def _shapes(*overrides: str) -> dict:
    from nlip_ds.model import NLIPModel

    cfg = load_config(None, [*MODEL_BASE, *overrides])
    model = NLIPModel(cfg.model, vocab_size=100, pad_id=0, bos_id=1, eos_id=2, sep_id=3, init_weights=False)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_shape_keys_are_exactly_the_model_keys_that_change_a_parameter_shape():
    from nlip_ds.config import describe, shape_keys

    model_keys = {key for key, _, _ in describe() if key.startswith("model.")}
    assert model_keys == CHANGES.keys(), "a new model.* key: add it to CHANGES (and mark it shape=True in " \
                                         "config.py if it changes a parameter shape)"
    assert shape_keys() <= model_keys
    base = _shapes()
    for key, value in CHANGES.items():
        if key in SAME_SHAPES_OTHER_MODEL:
            assert key in shape_keys(), key
            continue
        changes_shape = _shapes(f"{key}={value}") != base
        assert changes_shape == (key in shape_keys()), f"{key}: changes a shape: {changes_shape}"
    assert "model.text.prefix_in_embedding" not in shape_keys()


def test_a_changed_prefix_in_embedding_is_allowed_and_listed_and_a_changed_max_length_is_refused(tmp_path):
    from nlip_ds.config import to_dict
    from nlip_ds.run.checkpoint import CheckpointError, check_compatible

    saved = _cfg(tmp_path)
    manifest = {"tag": "step8", "config": to_dict(saved), "world_size": 1, "zero_stage": 3, "param_shapes": {}}
    now = _cfg(tmp_path, "model.text.prefix_in_embedding=true")
    assert check_compatible(manifest, to_dict(now), {}, 1, 3) == {"model.text.prefix_in_embedding": (False, True)}
    with pytest.raises(CheckpointError, match=r"model.decoder.max_length: 32 -> 48"):
        check_compatible(manifest, to_dict(_cfg(tmp_path, "model.decoder.max_length=48")), {}, 1, 3)
