"""scripts/demo_compare.py: the demo's comparison with a recorded CLIP-loss run."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def demo_compare(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("demo_compare", ROOT / "scripts" / "demo_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "REFERENCE", tmp_path / "reference.json")
    return module


def _run(folder: Path, noise_enabled: bool, zeroshot: float) -> Path:
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(
        {"steps": 10, "world_size": 2, "eval": {"zeroshot_top1": zeroshot, "i2t_r1": 0.5, "t2i_r1": 0.25}}))
    (folder / "config.yaml").write_text(f"noise:\n  enabled: {str(noise_enabled).lower()}\n")
    return folder


def test_records_a_clip_run_and_prints_it_beside_a_run(demo_compare, tmp_path):
    clip = _run(tmp_path / "clip", noise_enabled=False, zeroshot=0.125)
    demo_compare.record(clip)
    recorded = json.loads(demo_compare.REFERENCE.read_text())
    assert recorded["eval"]["zeroshot_top1"] == 0.125 and "noise.enabled=false" in recorded["command"]
    text = demo_compare.compare(_run(tmp_path / "nlip", noise_enabled=True, zeroshot=0.5))
    assert "zero-shot top-1        0.500     0.125" in text and "text->image R@1        0.250     0.250" in text


def test_refuses_a_reference_that_used_the_noise_estimator(demo_compare, tmp_path):
    with pytest.raises(ValueError, match="CLIP-loss run"):
        demo_compare.record(_run(tmp_path / "nlip", noise_enabled=True, zeroshot=0.5))


def test_without_a_reference_it_says_so(demo_compare, tmp_path):
    assert "no CLIP-loss reference" in demo_compare.compare(_run(tmp_path / "nlip", True, 0.5))
    assert demo_compare.main([str(tmp_path / "missing")]) == 2
