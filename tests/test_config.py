"""Config validation: every refusal names the dotted key, the bad value and what is allowed."""
import pytest
import yaml

from nlip_ds.config import ConfigError, describe, from_dict, load_config, to_dict
from nlip_ds.run.layout import write_resolved


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs: 0 is below the minimum 1"),
    ("train.epochs=two", "train.epochs: expected int, got 'two'"),
    ("train.epochz=3", "train.epochz: unknown key; allowed keys of train: "),
    ("optim.name=sgd", "optim.name: 'sgd' is not one of 'adamw', 'lamb'"),
    ("noise.lambda_=1.5", "noise.lambda_: 1.5 is above the maximum 1.0"),
    ("model.vision.heads=3", "model.vision.heads: 3 does not divide model.vision.width=64"),
    ("model.vision.image_size=30", "model.vision.image_size: 30 is not a multiple of model.vision.patch_size=8"),
    ("model.mae.enabled=true", "model.mae.enabled: the MAE decoder needs model.vision.mask_ratio > 0"),
    ("completion.enabled=true", None),
    ("noise.enabled=true", None),
    ("eval.tasks=[zeroshot,nope]", "eval.tasks: unknown task 'nope'"),
    ("data.resampled=true", "data.samples_per_epoch: required when data.resampled=true"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
    ("train.micro_batch_size=true", "train.micro_batch_size: expected int, got True"),
])
def test_override_validation(override, message):
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_yaml_unknown_nested_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  vision:\n    widht: 32\n")
    with pytest.raises(ConfigError, match=r"model\.vision\.widht: unknown key"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_apply_and_ints_widen_to_floats():
    cfg = load_config(None, ["train.epochs=7", "optim.lr=1", "data.train=a/{0..3}.tar", "train.resume="])
    assert cfg.train.epochs == 7
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert load_config(None, ["optim.lr=5e-3"]).optim.lr == 0.005  # PyYAML reads 5e-3 as a string
    with pytest.raises(ConfigError, match="optim.lr: expected float, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    assert cfg.data.train == "a/{0..3}.tar"
    assert cfg.train.resume is None


def test_shipped_configs_load():
    tiny = load_config("configs/tiny-cpu.yaml")
    paper = load_config("configs/vit-b32-yfcc26m.yaml")
    assert tiny.model.vision.image_size == 32 and paper.model.vision.image_size == 224
    assert paper.optim.name == "lamb" and paper.train.precision == "bf16"


def test_round_trip_and_resolved_file(tmp_path):
    cfg = load_config("configs/tiny-cpu.yaml", ["noise.lambda_=0.25"])
    assert from_dict(to_dict(cfg)) == cfg
    write_resolved(cfg, tmp_path / "run")
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["noise"]["lambda_"] == 0.25
    assert "git_sha" in (tmp_path / "run" / "run.json").read_text()


def test_every_key_documented():
    rows = describe()
    assert len(rows) > 60
    assert all(doc for _, _, doc in rows)
    assert {"data.train", "data.val", "data.test", "train.epochs", "train.output_dir", "train.resume",
            "noise.enabled", "noise.warmup_epochs", "noise.lambda_", "completion.enabled",
            "deepspeed.config"} <= {key for key, _, _ in rows}
