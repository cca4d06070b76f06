"""`nlip-ds caption` on a random-weight export: over shards and over an image folder, JSONL lines complete and in
input order with concepts from the given vocabulary; bad inputs named; two ranks write the one-process file."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from nlip_ds.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
FAST = ["--max-tokens", "8", "--min-tokens", "2", "--batch-size", "16"]


def shard_keys(split_dir: Path) -> list[str]:
    keys = []
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += list(dict.fromkeys(m.name.split(".")[0] for m in tar if m.isreg()))
    return keys


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption_over_shards_writes_one_line_per_image_in_order(cli, random_export, synth_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    status, stdout, _ = cli("caption", "--checkpoint", random_export, "--images", synth_dir / "test",
                            "--concepts", synth_dir / "concepts.txt", "--out", out, "--top-k", 3, *FAST)
    assert status == 0 and "captioned 40 images (0 skipped)" in stdout
    lines = read_jsonl(out)
    assert [line["key"] for line in lines] == shard_keys(synth_dir / "test")
    vocabulary = set((synth_dir / "concepts.txt").read_text().split())
    for line in lines:
        assert set(line) == {"key", "shard", "concepts", "caption"}
        assert len(line["concepts"]) == 3 == len(set(line["concepts"])) and set(line["concepts"]) <= vocabulary
        assert isinstance(line["caption"], str) and Path(line["shard"]).parent == synth_dir / "test"
    cli("caption", "--checkpoint", random_export, "--images", synth_dir / "test", "--concepts",
        synth_dir / "concepts.txt", "--out", tmp_path / "again.jsonl", "--top-k", 3, *FAST)
    assert read_jsonl(tmp_path / "again.jsonl") == lines  # same seed, same captions
    cli("caption", "--checkpoint", random_export, "--images", synth_dir / "test", "--concepts",
        synth_dir / "concepts.txt", "--out", tmp_path / "seed1.jsonl", "--top-k", 3, "--seed", 1, *FAST)
    assert [x["caption"] for x in read_jsonl(tmp_path / "seed1.jsonl")] != [x["caption"] for x in lines]


def test_captions_in_bf16(cli, random_export, synth_dir, tmp_path):
    out = tmp_path / "bf16.jsonl"
    status, _, stderr = cli("caption", "--checkpoint", random_export, "--images", synth_dir / "test", "--out", out,
                            "--concepts", synth_dir / "concepts.txt", "--strategy", "greedy", "--precision", "bf16",
                            *FAST)
    assert status == 0, stderr
    lines = read_jsonl(out)
    assert len(lines) == 40 and all(isinstance(line["caption"], str) for line in lines)
    status, _, stderr = cli("caption", "--checkpoint", random_export, "--images", synth_dir / "test", "--out", out,
                            "--precision", "fp16", "--device", "cpu", *FAST)
    assert status == 2 and "--precision fp16 needs a GPU" in stderr


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_deterministic_strategies_ignore_the_seed(cli, random_export, synth_dir, tmp_path, strategy):
    args = ["--images", synth_dir / "test", "--concepts", synth_dir / "concepts.txt", "--strategy", strategy,
            "--num-beams", 2, *FAST]
    captions = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}.jsonl"
        status, _, stderr = cli("caption", "--checkpoint", random_export, "--out", out, "--seed", seed, *args)
        assert status == 0, stderr
        captions.append([line["caption"] for line in read_jsonl(out)])
    assert captions[0] == captions[1] and len(captions[0]) == 40


def images_from_shards(split_dir: Path, out: Path, count: int) -> list[Path]:
    """The first `count` images of the shards as out/<a|b>/<key>.png (a nested folder)."""
    files = []
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".png") and len(files) < count:
                    file = out / ("a" if len(files) % 2 else "b") / member.name
                    file.parent.mkdir(parents=True, exist_ok=True)
                    file.write_bytes(tar.extractfile(member).read())
                    files.append(file)
    return files


def test_caption_over_an_image_folder_names_a_broken_image(cli, random_export, synth_dir, tmp_path):
    files = images_from_shards(synth_dir / "test", tmp_path / "imgs", 6)
    broken = tmp_path / "imgs" / "a" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    out = tmp_path / "c.jsonl"
    status, stdout, stderr = cli("caption", "--checkpoint", random_export, "--images", tmp_path / "imgs",
                                 "--concepts", synth_dir / "concepts.txt", "--out", out, *FAST)
    assert status == 0 and "captioned 6 images (1 skipped)" in stdout
    assert f"skipped {broken}" in stderr
    lines = read_jsonl(out)
    assert [line["path"] for line in lines] == [str(f) for f in sorted(files)]
    assert all(len(line["concepts"]) == 5 for line in lines)


def test_default_vocabulary_is_used_without_concepts(cli, random_export, synth_dir, tmp_path):
    from nlip_ds.completion.concepts import load_vocabulary

    image = images_from_shards(synth_dir / "test", tmp_path / "imgs", 1)[0]
    status, _, _ = cli("caption", "--checkpoint", random_export, "--images", image, "--out", tmp_path / "c.jsonl",
                       *FAST)
    assert status == 0
    (line,) = read_jsonl(tmp_path / "c.jsonl")
    assert line["path"] == str(image) and set(line["concepts"]) <= set(load_vocabulary(None))


def test_bad_inputs_are_one_error_line_naming_the_file(cli, random_export, synth_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    cases = [(("--checkpoint", tmp_path / "nope", "--images", synth_dir / "test"), str(tmp_path / "nope")),
             (("--checkpoint", random_export, "--images", tmp_path / "empty"), f"{tmp_path / 'empty'} holds no images"),
             (("--checkpoint", random_export, "--images", tmp_path / "bad"), "no image of"),
             (("--checkpoint", random_export, "--images", synth_dir / "test", "--concepts", tmp_path / "v.txt"),
              str(tmp_path / "v.txt"))]
    for args, message in cases:
        status, _, stderr = cli("caption", *args, "--out", tmp_path / "c.jsonl", *FAST)
        assert status == 2 and "nlip-ds caption: error:" in stderr and message in stderr, (args, stderr)
    assert not (tmp_path / "c.jsonl").exists()


# ------------------------------------------------------------------------------------------------ two ranks


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_write_the_one_process_file(random_export, synth_dir, tmp_path):
    """40 images in batches of 16: rank 0 captions batches 0 and 2, rank 1 batch 1."""
    args = ["caption", "--checkpoint", random_export, "--images", synth_dir / "test", "--concepts",
            synth_dir / "concepts.txt", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in TOPOLOGY_VARS:
        env.pop(var, None)
    commands = [[sys.executable, "-m", "nlip_ds.cli", *args, "--out", tmp_path / "one.jsonl"],
                [Path(sys.executable).parent / "deepspeed", "--num_gpus", "2", "--master_port", free_port(),
                 "--module", "nlip_ds.cli", *args, "--out", tmp_path / "two.jsonl"]]
    for cmd in commands:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on 2 process(es)" in proc.stdout
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert len(one) == 40 and two == one
