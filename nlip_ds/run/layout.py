"""Where everything of a run folder lives (train.output_dir); no other module spells these names.

    <run>/config.yaml          the resolved config (write_resolved), read back by load_run_model
    <run>/run.json             the git SHA the run started from
    <run>/metrics.jsonl        every logged metric, one JSON object per log step (monitor.MetricSink)
    <run>/tensorboard/nlip     our TensorBoard events; DeepSpeed's own monitor writes tensorboard/deepspeed
    <run>/checkpoints/         step<N>/ folders, `latest` and leftovers of killed saves (run/checkpoint.py)
    <run>/noise/refit_*.pt     what each GMM refit saw and decided (monitor.save_refit_data)
    <run>/eval/<task>.json     results of `nlip-ds eval` (an export keeps them in <export>/eval/ too)
    <run>/summary.json         the end-of-run summary
    <run>/preempted.json       left by a preempted run for the SLURM helper (slurm/job.py)

An exported model (`nlip-ds export`) is a folder with config.json and tokenizer/ instead.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from nlip_ds.config import Config, ConfigError, git_sha, load_config, to_dict

CHECKPOINTS, LATEST = "checkpoints", "latest"
STEP_TAG = re.compile(r"step(\d+)")
# A folder that holds any of these holds a run: a new run may not start there (check_run_folder).
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "summary.json", CHECKPOINTS, "tensorboard")


class RunFolder:
    """The paths of one run folder; nothing is created until a writer asks for it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of(cls, cfg: Config) -> "RunFolder":
        return cls(cfg.train.output_dir)

    config = property(lambda self: self.root / "config.yaml")
    run_info = property(lambda self: self.root / "run.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary = property(lambda self: self.root / "summary.json")
    preempted = property(lambda self: self.root / "preempted.json")
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    tensorboard = property(lambda self: self.root / "tensorboard")
    tensorboard_nlip = property(lambda self: self.root / "tensorboard" / "nlip")
    eval_dir = property(lambda self: self.root / "eval")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_tag(step)

    def eval_result(self, task: str) -> Path:
        return self.eval_dir / f"{task}.json"

    def refit_data(self, epoch: int, step: int) -> Path:
        return self.root / "noise" / f"refit_e{epoch:03d}_s{step:07d}.pt"


def step_tag(step: int) -> str:
    """The name of the checkpoint folder saved after global step `step`."""
    return f"step{step}"


def step_of(tag: str) -> int:
    """The step a checkpoint folder name carries (step<N>, also inside step<N>.<id>.partial); 0 for any other."""
    match = STEP_TAG.search(tag)
    return int(match.group(1)) if match else 0


def check_run_folder(cfg: Config) -> None:
    """Refuse an output folder that holds another run unless this run resumes (train.resume)."""
    out = Path(cfg.train.output_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not cfg.train.resume:
        raise ConfigError(f"train.output_dir: {out} holds a previous run ({', '.join(found)}); continue it with "
                          "train.resume=latest, or choose another train.output_dir")


def write_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config and the git SHA into the run folder (config.yaml, run.json)."""
    run = RunFolder(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    tmp = run.config.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(run.config)
    run.run_info.write_text(json.dumps({"git_sha": git_sha()}, indent=2) + "\n")
    return run.config


def read_config(run: RunFolder) -> Config:
    """The config a run was trained with (its config.yaml), validated like a new one."""
    if not run.config.is_file():
        raise FileNotFoundError(f"{run.root}: no config.yaml (not a run folder written by `nlip-ds train`)")
    return load_config(run.config)


def checkpoint_root(path: str | Path) -> Path:
    """The checkpoints folder of a run folder, or `path` itself when it is one (it holds `latest`)."""
    path = Path(path)
    if (path / LATEST).is_file():
        return path
    if (path / CHECKPOINTS / LATEST).is_file():
        return path / CHECKPOINTS
    raise FileNotFoundError(f"{path}: no ZeRO checkpoint found (expected {path}/{CHECKPOINTS}/{LATEST})")


def folder_kind(path: str | Path) -> str:
    """'run' for a training run folder (or its checkpoints folder), 'export' for an exported model."""
    path = Path(path)
    if (path / CHECKPOINTS / LATEST).is_file() or (path / LATEST).is_file():
        return "run"
    if (path / "config.json").is_file():
        return "export"
    raise FileNotFoundError(f"{path} is neither a training run folder (no {CHECKPOINTS}/{LATEST}) nor an exported "
                            f"model (no config.json)")
