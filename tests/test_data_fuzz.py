"""Fuzzing the reader (issue 9): valid shards written by the project's ShardWriter are mutated (bit flips
anywhere and in tar headers, truncation, byte insertion, deletion and overwrites, member swaps, drops,
duplicates, renames and content replacement) and read through the loader's own stages. The reader never raises:
every sample is yielded valid or counted as skipped under a known reason.

4,000 cases in all, reproducible (derandomize=True): 1,600 byte-level and 1,000 member-level cases through one
worker's stream (worker_stages, as the Loader runs them), 1,000 edited images of 7 formats through decode_image,
and 400 cases through the whole Loader (build_loader, extra pads, batches).
"""
from __future__ import annotations

import functools
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nlip_ds.data.pipeline import LoaderSpec, ResumeCursor, WorkerTask, build_loader, worker_stages
from nlip_ds.data.samples import SKIP_REASONS, SampleError, SkipCounter, decode_image
from nlip_ds.data.shards import Shard, ShardWriter, _add_member, sample_key

PX, T, MAX_PIXELS = 8, 8, 4096
DECODE_REASONS = {"missing_image", "empty_image", "undecodable_image", "image_too_large", "missing_caption",
                  "empty_caption", "non_utf8_caption", "bad_metadata"}
FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@functools.cache
def _images() -> list[tuple[str, bytes]]:
    """(extension, bytes) in the formats and modes a web crawl holds."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (PX, PX, 3), dtype=np.uint8))

    def enc(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    gray16 = Image.fromarray(rng.integers(0, 65536, (PX, PX), dtype=np.uint16))
    return [("png", enc(rgb, "PNG")), ("jpg", enc(rgb, "JPEG", quality=80)), ("png", enc(gray16, "PNG")),
            ("gif", enc(rgb.convert("P"), "GIF")), ("bmp", enc(rgb, "BMP")), ("webp", enc(rgb, "WEBP")),
            ("tiff", enc(rgb.convert("CMYK"), "TIFF")), ("png", enc(rgb.convert("RGBA"), "PNG"))]


@pytest.fixture(scope="module")
def valid_shard(tmp_path_factory) -> bytes:
    """One shard of 8 samples (image, caption, metadata, class) from ShardWriter, as bytes."""
    folder = tmp_path_factory.mktemp("fuzz_source")
    with ShardWriter(folder, "train", shard_size=100) as writer:
        for i, (ext, image) in enumerate(_images()):
            meta = {"sample_id": 100 + i, "noise_type": "clean", "objects": ["red circle"], "label": i % 3}
            writer.write(sample_key(100 + i), {ext: image, "txt": f"a red circle number {i}".encode(),
                                               "json": json.dumps(meta).encode(), "cls": str(i % 3).encode()})
    return (folder / "train-000000.tar").read_bytes()


@pytest.fixture(scope="module")
def quiet():
    """Skips are logged at WARNING; thousands of cases would only fill the captured log."""
    logger = logging.getLogger("nlip_ds.data.samples")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def _header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            _add_member(tar, name, data)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ mutations


@st.composite
def byte_mutations(draw, data: bytes, tar: bool = True) -> bytes:
    """1-4 byte-level edits: bit flips (anywhere or inside a tar header), truncation, insertion, deletion,
    overwrite with random or zero bytes. Positions come from a Random that hypothesis seeds (reproducible under
    derandomize): its own integers favour small values, which would mostly cut or flip the first header."""
    rng = draw(st.randoms(use_true_random=True))
    headers = (_header_offsets(data) if tar else []) or [0]
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "header_flip", "truncate", "insert", "delete", "overwrite"]))
        at = rng.randrange(len(data))
        if kind == "header_flip":
            at = min(len(data) - 1, rng.choice(headers) + rng.randrange(512))
        if kind in ("flip", "header_flip"):
            data = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
        elif kind == "truncate":
            data = data[:at]
        elif kind == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=600)) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + rng.randint(1, 2000):]
        else:
            patch = draw(st.one_of(st.binary(min_size=1, max_size=64), st.integers(1, 1024).map(bytes)))
            data = data[:at] + patch + data[at + len(patch):]
    return data


NAME_TEXT = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]), max_size=12)
EXTENSIONS = ["png", "jpg", "txt", "json", "cls", "PNG", "webp", "tar", "seg.png", ""]


@st.composite
def member_mutations(draw, data: bytes) -> bytes:
    """1-4 member-level edits, written back as a well-formed tar: swap two members, swap their contents, drop,
    duplicate, rename (key or extension), or replace a member's content (empty, random, another member's,
    truncated, or edited by byte_mutations)."""
    members = _members(data)
    for _ in range(draw(st.integers(1, 4))):
        if not members:
            break
        i, j = (draw(st.integers(0, len(members) - 1)) for _ in range(2))
        kind = draw(st.sampled_from(["swap", "swap_data", "drop", "duplicate", "rename", "replace"]))
        (name_i, data_i), (name_j, data_j) = members[i], members[j]
        if kind == "swap":
            members[i], members[j] = members[j], members[i]
        elif kind == "swap_data":
            members[i], members[j] = (name_i, data_j), (name_j, data_i)
        elif kind == "drop":
            del members[i]
        elif kind == "duplicate":
            members.insert(j, members[i])
        elif kind == "rename":
            key, _, ext = name_i.partition(".")
            if draw(st.booleans()):
                key = draw(st.one_of(NAME_TEXT, st.sampled_from([m[0].partition(".")[0] for m in members])))
            else:
                ext = draw(st.one_of(st.sampled_from(EXTENSIONS), NAME_TEXT))
            members[i] = (f"{key}.{ext}" if draw(st.integers(0, 9)) else key + ext, data_i)
        else:
            content = draw(st.sampled_from(["empty", "random", "other", "truncated", "edited", "edited"]))
            if content == "empty":
                data_i = b""
            elif content == "random":
                data_i = draw(st.binary(max_size=300))
            elif content == "other":
                data_i = data_j
            elif content == "truncated":
                data_i = data_i[:draw(st.integers(0, max(0, len(data_i) - 1)))]
            else:  # byte edits inside the member: image parsers and caption decoding meet broken bytes
                data_i = draw(byte_mutations(data_i, tar=False))
            members[i] = (name_i, data_i)
    return _tar(members)


# ------------------------------------------------------------------------------------------------ reading


def _spec(tokenizer, shard: Shard, train: bool) -> LoaderSpec:
    return LoaderSpec(split="train", sources=((shard,),), weights=(1.0,), tokenizer=tokenizer, image_size=PX,
                      batch_size=4, context_length=T, train=train, seed=0, shuffle_buffer=0, crop_scale_min=0.5,
                      max_pixels=MAX_PIXELS, max_skip_rate=1.0, resampled=False, samples_per_epoch=None, rank=0,
                      world_size=1, workers=0)


def _read_stream(path, tokenizer, train: bool, listed: int = 8):
    """One worker's stream over the shard at `path` (its index listing `listed` samples), as the Loader runs
    it: -> (samples, counter, cursor)."""
    shard = Shard(path, listed)
    counter = SkipCounter("fuzz")
    cursor = ResumeCursor(0, counter)
    stages = worker_stages(_spec(tokenizer, shard, train), 0, 0, WorkerTask(shards=(shard,)), counter, cursor)
    return list(wds.DataPipeline(*stages)), counter, cursor


def _check_stream(samples, counter: SkipCounter, cursor: ResumeCursor, listed: int = 8) -> None:
    for sample in samples:
        image = sample["image"]
        assert image.shape == (3, PX, PX) and str(image.dtype) == "torch.uint8"
        assert isinstance(sample["caption"], str) and sample["caption"].strip() == sample["caption"] != ""
        assert len(sample["input_ids"]) == len(sample["attention_mask"]) == T
        assert 0 <= sample["sample_id"] < 2 ** 63 and -1 <= sample["label"] < 2 ** 63
    assert set(counter.totals) <= set(SKIP_REASONS), counter.totals
    assert counter.good == len(samples)
    # every sample that reached decoding was yielded or counted; every sample the index lists too
    assert cursor.position == len(samples) + sum(counter.totals[r] for r in DECODE_REASONS)
    assert cursor.position + counter.totals["duplicate_key"] + counter.totals["short_shard"] >= listed


def test_the_valid_shard_reads_whole(valid_shard, fuzz_dir, synth_tokenizer):
    path = fuzz_dir / "valid.tar"
    path.write_bytes(valid_shard)
    samples, counter, cursor = _read_stream(path, synth_tokenizer, train=True)
    _check_stream(samples, counter, cursor)
    assert len(samples) == 8 and not counter.totals and [s["sample_id"] for s in samples] == list(range(100, 108))


@settings(max_examples=1600, **FUZZ)
@given(data=st.data(), train=st.booleans())
def test_byte_mutations_never_raise(valid_shard, fuzz_dir, synth_tokenizer, quiet, data, train):
    path = fuzz_dir / "bytes.tar"
    path.write_bytes(data.draw(byte_mutations(valid_shard)))
    _check_stream(*_read_stream(path, synth_tokenizer, train))


@settings(max_examples=1000, **FUZZ)
@given(data=st.data(), train=st.booleans(), flip=st.booleans())
def test_member_mutations_never_raise(valid_shard, fuzz_dir, synth_tokenizer, quiet, data, train, flip):
    mutated = data.draw(member_mutations(valid_shard))
    if flip:  # and then damage the rewritten tar's bytes as well
        mutated = data.draw(byte_mutations(mutated))
    path = fuzz_dir / "members.tar"
    path.write_bytes(mutated)
    _check_stream(*_read_stream(path, synth_tokenizer, train))


@settings(max_examples=1000, **FUZZ)
@given(data=st.data(), which=st.integers(0, len(_images()) - 1))
def test_image_byte_mutations_decode_or_skip(data, which):
    ext, image = _images()[which]
    mutated = data.draw(byte_mutations(image, tar=False))
    try:
        img = decode_image(mutated, MAX_PIXELS)
    except SampleError as err:
        assert err.reason in ("empty_image", "undecodable_image", "image_too_large")
    else:
        assert img.mode == "RGB" and 1 <= img.width * img.height <= MAX_PIXELS


@pytest.fixture(scope="module")
def loader_dir(valid_shard, tmp_path_factory):
    """d-000000.tar (mutated by each case) and d-000001.tar (intact), both listed with 8 samples."""
    folder = tmp_path_factory.mktemp("fuzz_loader")
    (folder / "d-000001.tar").write_bytes(_tar([(n.replace("00000010", "00000020"), d)
                                                for n, d in _members(valid_shard) if not n.endswith(".json")]))
    (folder / "index.json").write_text(json.dumps({"shards": [{"name": f"d-00000{i}.tar", "num_samples": 8}
                                                              for i in range(2)], "num_samples": 16}))
    return folder


@settings(max_examples=400, **FUZZ)
@given(data=st.data(), train=st.booleans(), member_level=st.booleans(), epoch=st.integers(0, 3))
def test_loader_never_raises(valid_shard, loader_dir, data_cfg, synth_tokenizer, quiet, data, train,
                             member_level, epoch):
    mutate = member_mutations if member_level else byte_mutations
    (loader_dir / "d-000000.tar").write_bytes(data.draw(mutate(valid_shard)))
    cfg = data_cfg(train=str(loader_dir), max_skip_rate=1.0, shuffle_buffer=4)
    loader = build_loader(cfg, "train", tokenizer=synth_tokenizer, image_size=PX, batch_size=3, train=train,
                          context_length=T, seed=1)
    loader.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == loader.num_batches == 6 and sum(len(b["caption"]) for b in batches) == 16
    for batch in batches:
        assert batch["image"].shape[1:] == (3, PX, PX) and batch["image"].isfinite().all()
        assert batch["input_ids"].shape[1] == T and all(isinstance(c, str) and c for c in batch["caption"])
    real = [i for b in batches for i, p in zip(b["sample_id"].tolist(), b["pad"].tolist()) if not p]
    assert set(range(200, 208)) <= set(real) and len(real) == len(set(real))  # the intact shard, once
    assert set(loader.stats()["skipped"]) <= set(SKIP_REASONS)
