"""configs/vit-b32-yfcc26m.yaml, the paper's recipe, runs as shipped.

- fast: captions longer than the decoder's positions are cut for teacher forcing (model.text.context_length 77,
  model.decoder.max_length 40 in the paper config).
- slow: the paper config itself (full ViT-B/32 model, LAMB, MAE, completion) trains 3 steps through `nlip-ds
  train` in fp32 and in bf16 on 224-pixel synthetic shards. Overridden: the data paths, the micro-batch, the step
  count, one loader worker and no end-of-run evaluation (machine size), and noise.warmup_epochs /
  completion.start_epoch = 0 so that completion's concept prefix is in the 3 steps.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAPER = "configs/vit-b32-yfcc26m.yaml"


def test_teacher_forcing_cuts_captions_to_the_decoder_length():
    from nlip_ds.model.decoder import IGNORE_INDEX, teacher_forcing

    ids = torch.arange(1, 78).repeat(2, 1)  # (2, 77)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # a short caption
    dec_ids, dec_mask, labels = teacher_forcing(ids, mask, 40)
    assert dec_ids.shape == dec_mask.shape == labels.shape == (2, 40)
    assert torch.equal(dec_ids[0], ids[0, :40]) and torch.equal(labels[0], ids[0, 1:41])
    assert (labels[1, 9:] == IGNORE_INDEX).all() and torch.equal(labels[1, :9], ids[1, 1:10])
    full = teacher_forcing(ids[:, :20], mask[:, :20], 40)  # shorter than the decoder: unchanged
    assert full[0].shape == (2, 19)


def test_paper_config_model_accepts_its_full_text_context():
    from nlip_ds.config import load_config
    from nlip_ds.model import NLIPModel

    cfg = load_config(PAPER, ["model.vision.name=vit_custom", "model.vision.width=64", "model.vision.depth=1",
                              "model.vision.heads=2", "model.text.width=64", "model.text.depth=1",
                              "model.text.heads=2", "model.decoder.width=64", "model.decoder.depth=1",
                              "model.decoder.heads=2", "model.mae.width=64", "model.mae.heads=2"])
    assert cfg.model.text.context_length > cfg.model.decoder.max_length  # what this test is about
    model = NLIPModel(cfg.model, vocab_size=100, pad_id=0, bos_id=1, eos_id=2, sep_id=3)
    ids = torch.randint(4, 100, (2, cfg.model.text.context_length))
    out = model({"image": torch.zeros(2, 3, 224, 224, dtype=torch.uint8), "input_ids": ids,
                 "attention_mask": torch.ones_like(ids)})
    assert out["caption_logits"].shape[1] == cfg.model.decoder.max_length


@pytest.fixture(scope="module")
def shards_224(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth224")
    subprocess.run([sys.executable, "-m", "nlip_ds.cli", "data", "synth", "--out", str(out), "--num-samples", "12",
                    "--image-size", "224", "--seed", "0"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the full-size model on the CPU; 11 minutes for the fp32 case under load 30
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_paper_config_trains_three_steps(shards_224, tmp_path, precision):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nlip_ds.cli", "train", "--config", PAPER,
           f"data.train={shards_224 / 'train'}", f"data.val={shards_224 / 'val'}",
           f"data.test={shards_224 / 'test'}", f"data.tokenizer={tmp_path / 'tokenizer'}",
           f"train.output_dir={run}", f"train.precision={precision}", "train.micro_batch_size=2",
           "train.max_steps=3", "data.workers=1", "eval.enabled=false", "monitor.progress=false",
           "monitor.log_every=1", "noise.warmup_epochs=0", "completion.start_epoch=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        for key in ("train/loss", "train/contrastive_loss", "train/caption_loss", "train/mae_loss"):
            assert m[key] == m[key] and abs(m[key]) < 1e4, (key, m)  # finite
    assert "concept embeddings refreshed at step 0" in proc.stderr + proc.stdout
    assert (run / "checkpoints" / "latest").is_file()
