"""`nlip-ds doctor` on the CPU: a healthy environment and config exit 0 with every section printed; a bad config,
missing data or a missing extension exit 1 with the problem and its fix named."""
from pathlib import Path

import pytest

from nlip_ds import doctor
from nlip_ds.cli import main
from nlip_ds.ops import extension

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("== versions ==", "== devices ==", "== fused-loss extensions ==", "== kernel self-check",
            "== fused loss rate vs the device's GEMM rate", "== config", "== problems ==")


def write_config(tmp_path, **train) -> Path:
    shard = tmp_path / "train-000000.tar"
    shard.touch()  # the doctor checks that the shards exist; it reads none
    lines = [f"data: {{train: {shard}}}", f"deepspeed: {{config: {REPO / 'ds_configs' / 'zero3.json'}}}",
             "train: {" + ", ".join(f"{k}: {v}" for k, v in {"micro_batch_size": 8, **train}.items()) + "}"]
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_healthy_environment_exits_0_with_every_section(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["doctor", "--config", str(write_config(tmp_path, grad_accum=3))]) == 0
    out = capsys.readouterr().out
    for section in SECTIONS:
        assert section in out, section
    assert "passed" in out  # the CPU kernel's self-check
    assert "TFLOP/s" in out and "% of it" in out
    assert "global batch               48 = micro batch 8 x grad accum 3 x 2 ranks" in out
    assert "ZeRO stage                 3" in out and "precision                  fp32" in out
    assert "none: ready to train" in out


def test_bad_config_exits_1_naming_the_key(tmp_path, capsys):
    assert main(["doctor", "--no-timing", "--config", str(write_config(tmp_path, precision="fp8"))]) == 1
    out = capsys.readouterr().out
    assert "[blocking] config" in out and "train.precision" in out and "fix:" in out


def test_missing_data_exits_1(tmp_path, capsys):
    path = write_config(tmp_path)
    (tmp_path / "train-000000.tar").unlink()
    assert main(["doctor", "--no-timing", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "[blocking] data.train" in out and "does not exist" in out


def test_missing_extension_exits_1_with_the_build_command(monkeypatch, capsys):
    monkeypatch.setattr(extension, "_import_prebuilt", lambda kind: None)
    monkeypatch.setattr(extension, "load", lambda kind: None)
    monkeypatch.setattr(extension, "load_error", lambda kind: f"{extension.module_name(kind)} unavailable")
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    assert main(["doctor", "--no-timing"]) == 1
    out = capsys.readouterr().out
    assert "nlip_ds._C_cpu is unavailable (not built, and no C++ compiler" in out
    assert "python setup.py build_ext --inplace" in out
    assert "no kernel (nlip_ds._C_cpu unavailable)" in out


def test_missing_package_is_a_blocking_problem(monkeypatch, capsys):
    real = doctor.version
    monkeypatch.setattr(doctor, "version", lambda dist: None if dist == "deepspeed" else real(dist))
    assert main(["doctor", "--no-timing"]) == 1
    out = capsys.readouterr().out
    assert "[blocking] deepspeed is not installed" in out and "gpu_wheels.sh" in out


@pytest.mark.parametrize("argv", [["doctor", "--help"]])
def test_help_names_the_options(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    out = capsys.readouterr().out
    assert "--config" in out and "--no-timing" in out
