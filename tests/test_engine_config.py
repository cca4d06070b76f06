"""The one-place merge of ds_configs/ engine JSON with the run config, and the learning-rate schedule."""
import json

import pytest

from nlip_ds.config import ConfigError, load_config
from nlip_ds.train.engine import build_ds_config, lr_lambda


def test_merge_sets_batch_arithmetic_and_precision():
    cfg = load_config("configs/tiny-cpu.yaml", ["train.micro_batch_size=8", "train.grad_accum=3",
                                                "train.precision=bf16"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == cfg.optim.grad_clip


@pytest.mark.parametrize("extra, message", [
    ({"train_batch_size": 64}, "sets 'train_batch_size', which comes from the run config"),
    ({"optimizer": {"type": "Adam"}}, "sets 'optimizer'"),
    ({"cpu_offload": True}, "deprecated key 'cpu_offload'"),
    ({"zero_optimization": {"stage": 3, "cpu_offload": True}}, "deprecated key 'zero_optimization.cpu_offload'"),
])
def test_engine_json_refuses_run_owned_and_deprecated_keys(tmp_path, extra, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, **extra}))
    cfg = load_config(None, [f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match=message):
        build_ds_config(cfg, 1)


def test_missing_engine_json_is_named(tmp_path):
    cfg = load_config(None, [f"deepspeed.config={tmp_path}/none.json"])
    with pytest.raises(ConfigError, match="none.json does not exist"):
        build_ds_config(cfg, 1)


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_shipped_engine_configs_merge(name):
    cfg = load_config(None, [f"deepspeed.config=ds_configs/{name}"])
    assert build_ds_config(cfg, 2)["train_batch_size"] == 2 * cfg.train.micro_batch_size


def test_schedule_warmup_then_cosine_to_floor():
    cfg = load_config(None, ["optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
