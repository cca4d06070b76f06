"""Shared pytest fixtures. Data fixtures build tiny datasets inside the test session (nothing is downloaded)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from nlip_ds.config import DataConfig, ModelConfig

TOPOLOGY_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# 250 training samples in shards of 30: 9 shards, the last one short, so exact epochs need pads.
SYNTH_TRAIN, SYNTH_EVAL, SYNTH_SHARD = 250, 40, 30


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (train noisy, val/test clean), shared by the whole session: read only."""
    from nlip_ds.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, SYNTH_TRAIN, val_samples=SYNTH_EVAL, test_samples=SYNTH_EVAL, shard_size=SYNTH_SHARD, seed=3)
    return out


@pytest.fixture(scope="session")
def synth_tokenizer(synth_dir, tmp_path_factory):
    """A tokenizer trained on the synthetic training captions."""
    from nlip_ds.data.tokenizer import ensure_tokenizer

    return ensure_tokenizer(None, str(synth_dir / "train"), tmp_path_factory.mktemp("tok") / "tokenizer", 256)


@pytest.fixture
def data_cfg(synth_dir):
    """A DataConfig over `synth_dir`; keyword overrides replace fields."""
    def make(**overrides) -> DataConfig:
        fields = dict(train=str(synth_dir / "train"), val=str(synth_dir / "val"), test=str(synth_dir / "test"),
                      workers=0, shuffle_buffer=50)
        fields.update(overrides)
        return DataConfig(**fields)
    return make


def png_bytes(color=(200, 30, 30), size=(8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """A webdataset tar from {"__key__": key, ext: bytes} dicts, written in the given order."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def good_sample(sample_id: int, caption: str = "a red square") -> dict[str, bytes]:
    return {"__key__": f"{sample_id:09d}", "png": png_bytes(), "txt": caption.encode(),
            "json": json.dumps({"sample_id": sample_id}).encode()}


def read_members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


@pytest.fixture
def shard_tools():
    """Helpers to build and read hand-made shards: png(), tar(path, samples), sample(id), members(path)."""
    from types import SimpleNamespace

    return SimpleNamespace(png=png_bytes, tar=write_tar, sample=good_sample, members=read_members)


@pytest.fixture(scope="module")
def random_export(synth_tokenizer, tmp_path_factory):
    """An untrained tiny model exported with its tokenizer (one per test module: `nlip-ds eval` writes into it)."""
    from nlip_ds.model import NLIPModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export")
    tok_dir = synth_tokenizer.save(tmp_path_factory.mktemp("tok") / "tokenizer")
    NLIPModel.from_config(ModelConfig(), synth_tokenizer).save_pretrained(out, tokenizer_dir=tok_dir)
    return out


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `nlip-ds ...` in this process without launcher variables; returns (exit status, stdout, stderr)."""
    from nlip_ds.cli import main

    for var in TOPOLOGY_VARS:
        monkeypatch.delenv(var, raising=False)

    def run(*argv):
        status = main([str(a) for a in argv])
        out = capsys.readouterr()
        return status, out.out, out.err
    return run
