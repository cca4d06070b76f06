"""Bad data (issue 9): every kind of broken input is repaired or skipped, counted by reason, logged at a limited
rate with shard and key, and a run whose skip rate passes data.max_skip_rate stops with a clear message."""
from __future__ import annotations

import io
import json
import logging
import re
import struct
import tarfile
import warnings
import zlib

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFile

from nlip_ds.data import pipeline, samples, shards
from nlip_ds.data.pipeline import SkipRateError, build_loader
from nlip_ds.data.samples import SKIP_REASONS, SampleError, SkipCounter, decode_image, decode_sample, to_rgb

PX, T = 16, 12


def _loader(data_cfg, tok, train: str, batch_size=4, **kw):
    cfg = data_cfg(train=train, **{"max_skip_rate": 1.0, **kw})
    return build_loader(cfg, "train", tokenizer=tok, image_size=PX, batch_size=batch_size, train=False,
                        context_length=T, seed=7)


def _ids(batches) -> list[int]:
    return [i for b in batches for i, p in zip(b["sample_id"].tolist(), b["pad"].tolist()) if not p]


def _index(folder, counts: dict[str, int]) -> None:
    (folder / "index.json").write_text(json.dumps(
        {"shards": [{"name": n, "num_samples": c} for n, c in counts.items()], "num_samples": sum(counts.values())}))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG from its IHDR fields and (filtered) raw scanlines; `raw` may be far shorter than the header says."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _rgb(data: bytes, max_pixels: int = 10 ** 6) -> np.ndarray:
    img = decode_image(data, max_pixels)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)  # (H, W, 3)


# ------------------------------------------------------------------------------------------------ image modes


def _palette(transparent: bool) -> Image.Image:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    if transparent:
        img.info["transparency"] = 0
    return img


# (image, format, pixel (x, y), expected RGB, tolerance)
MODES = {
    "L": (Image.new("L", (4, 4), 100), "PNG", (0, 0), (100, 100, 100), 0),
    "1": (Image.new("1", (4, 4), 1), "PNG", (0, 0), (255, 255, 255), 0),
    "P": (_palette(False), "PNG", (1, 1), (10, 200, 30), 0),
    "P transparent": (_palette(True), "PNG", (0, 0), (255, 255, 255), 0),  # transparent index: white
    "LA": (Image.new("LA", (4, 4), (50, 255)), "PNG", (0, 0), (50, 50, 50), 0),
    "LA transparent": (Image.new("LA", (4, 4), (50, 0)), "PNG", (0, 0), (255, 255, 255), 0),
    "RGBA half": (Image.new("RGBA", (4, 4), (200, 0, 0, 128)), "PNG", (0, 0), (227, 127, 127), 1),
    "CMYK cyan": (Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", (4, 4), (0, 255, 255), 6),
    "CMYK black": (Image.new("CMYK", (8, 8), (0, 0, 0, 255)), "JPEG", (4, 4), (0, 0, 0), 6),
}


@pytest.mark.parametrize("name", list(MODES))
def test_image_modes_convert_to_rgb(name):
    img, fmt, xy, expected, tol = MODES[name]
    pixels = _rgb(_encode(img, fmt))
    assert pixels.shape == (img.height, img.width, 3)
    assert np.abs(pixels[xy[1], xy[0]] - np.array(expected)).max() <= tol, pixels[xy[1], xy[0]]


RAMP16 = np.array([[0, 257, 0x8000, 0xC0C0, 65535]], dtype=np.uint16)  # 8-bit: 0, 1, 128, 192, 255


@pytest.mark.parametrize("fmt,array", [("PNG", RAMP16), ("TIFF", RAMP16), ("TIFF", RAMP16.astype(np.int32)),
                                       ("TIFF", RAMP16.astype(np.float32) / 65535)],
                         ids=["png I;16", "tiff I;16", "tiff I 32-bit", "tiff F in 0..1"])
def test_wide_gray_is_scaled_not_clipped(fmt, array):
    img = Image.fromarray(array)
    pixels = _rgb(_encode(img, fmt))
    assert Image.open(io.BytesIO(_encode(img, fmt))).mode in ("I;16", "I", "F")
    assert np.abs(pixels[0, :, 0] - np.array([0, 1, 128, 192, 255])).max() <= 1, pixels[0, :, 0]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_wide_gray_outside_16_bits_is_stretched_to_its_range():
    img = Image.fromarray(np.array([[-1000, 0, 99000]], dtype=np.int32))
    assert to_rgb(img).getpixel((0, 0)) == (0, 0, 0) and to_rgb(img).getpixel((2, 0)) == (255, 255, 255)
    assert to_rgb(img).getpixel((1, 0))[0] == round(1000 / 100000 * 255)


def test_sixteen_bit_rgb_png_keeps_the_high_byte():
    rows = b"\x00" + struct.pack(">6H", 0xFFFF, 0x8000, 0x0000, 0x0101, 0x2020, 0xC0C0)  # filter 0, 2 pixels
    pixels = _rgb(_png(2, 1, 16, 2, rows))
    assert pixels[0].tolist() == [[255, 128, 0], [1, 32, 192]]


# ------------------------------------------------------------------------------------------------ bad image bytes


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_image"),
    (b"this is a caption, not an image", "undecodable_image"),
    (_encode(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG")[:60], "undecodable_image"),  # truncated PNG
    (_encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:300], "undecodable_image"),
], ids=["zero bytes", "text", "truncated png", "truncated jpeg"])
def test_bad_image_bytes_are_skipped_by_reason(data, reason):
    with pytest.raises(SampleError) as info:
        decode_image(data, 10 ** 6)
    assert info.value.reason == reason


def test_bomb_header_is_refused_before_decoding(monkeypatch):
    bomb = _png(5000, 5000, 8, 0, b"\x00" * 100)  # 25 M pixels declared, 100 bytes of data
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("a bomb was decoded"))
    with pytest.raises(SampleError) as info:
        decode_image(bomb, max_pixels=10 ** 6)
    assert info.value.reason == "image_too_large" and "5000x5000" in str(info.value)


def test_pil_bomb_error_and_warning_never_escape(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above 1000 pixels, refuses above 2000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would raise here
        fine = decode_image(_encode(Image.new("RGB", (40, 40), (1, 2, 3)), "PNG"), max_pixels=10 ** 6)
        assert fine.size == (40, 40) and fine.getpixel((0, 0)) == (1, 2, 3)  # data.max_image_pixels decides
        with pytest.raises(SampleError) as info:
            decode_image(_encode(Image.new("RGB", (50, 50)), "PNG"), max_pixels=10 ** 6)
    assert info.value.reason == "image_too_large"  # PIL's hard limit (2x MAX_IMAGE_PIXELS), counted the same


def test_thin_strip_is_cropped_before_the_eval_resize():
    strip = Image.new("RGB", (1, 4_000_000), (7, 8, 9))  # resized whole: 16 x 64 M pixels
    out = samples.eval_transform(strip, PX)
    assert out.shape == (3, PX, PX) and out.dtype == torch.uint8 and (out[:, 0, 0] == torch.tensor([7, 8, 9])).all()
    photo = Image.effect_noise((50, 20), 60).convert("RGB")  # aspect 2.5: the transform is unchanged
    expected = TF.center_crop(TF.resize(photo, PX, interpolation=TF.InterpolationMode.BICUBIC), [PX, PX])
    assert torch.equal(samples.eval_transform(photo, PX), samples.to_tensor(expected))


# ------------------------------------------------------------------------------------------------ captions, keys


def _raw(**members) -> dict:
    sample = {"__key__": "000000007", "__url__": "/x/d-000000.tar", "png": _encode(Image.new("RGB", (4, 4)), "PNG"),
              "txt": b"a red square"}
    sample.update(members)
    return {k: v for k, v in sample.items() if v is not None}


@pytest.mark.parametrize("members,reason", [
    ({"txt": b"caf\xe9 au lait"}, "non_utf8_caption"),  # Latin-1, not UTF-8: skipped, not repaired
    ({"txt": b""}, "empty_caption"),
    ({"txt": b" \n\t "}, "empty_caption"),
    ({"txt": None}, "missing_caption"),
    ({"png": None}, "missing_image"),
    ({"png": b""}, "empty_image"),
    ({"json": b"{not json"}, "bad_metadata"),
    ({"json": b"[1, 2]"}, "bad_metadata"),
    ({"json": b"[" * 100_000}, "bad_metadata"),  # too deep for the JSON parser
    ({"json": json.dumps({"sample_id": 2 ** 64}).encode()}, "bad_metadata"),  # would overflow the id tensor
    ({"json": json.dumps({"sample_id": -3}).encode()}, "bad_metadata"),
    ({"json": json.dumps({"label": 2 ** 70}).encode()}, "bad_metadata"),
])
def test_bad_captions_and_members_are_skipped_by_reason(members, reason):
    with pytest.raises(SampleError) as info:
        decode_sample(_raw(**members), 10 ** 6)
    assert info.value.reason == reason


@pytest.mark.parametrize("members,field,value", [
    ({"txt": "\ufeffa caption".encode()}, "caption", "a caption"),  # a UTF-8 byte-order mark is dropped
    ({"json": json.dumps({"sample_id": True}).encode()}, "sample_id", 7),  # not an int: the numeric key
    ({"json": json.dumps({"noise_type": ["clean"]}).encode()}, "noise_type", -1),
    ({"cls": str(2 ** 70).encode()}, "label", -1),
    ({"cls": b"\xff"}, "label", -1),
])
def test_odd_fields_are_repaired(members, field, value):
    assert decode_sample(_raw(**members), 10 ** 6)[field] == value


@pytest.mark.parametrize("key", ["\u00b2", "9" * 30, "name\udcff", "dir/abc"])
def test_odd_keys_give_a_hashed_id(key):
    sample_id = decode_sample(_raw(__key__=key), 10 ** 6)["sample_id"]
    assert 0 <= sample_id < 2 ** 62 and sample_id == samples.raw_sample_id(_raw(__key__=key))


# ------------------------------------------------------------------------------------------------ tars


def _shards_with(tmp_path, shard_tools, damage) -> tuple:
    """d-000000.tar intact (ids 0-5), d-000001.tar (ids 10-17, 32x32 images) damaged by `damage(bytes)`, with
    an index.json giving the full counts."""
    shard_tools.tar(tmp_path / "d-000000.tar", [shard_tools.sample(i) for i in range(6)])
    big = [dict(shard_tools.sample(i), png=shard_tools.png(size=(32, 32))) for i in range(10, 18)]
    whole = shard_tools.tar(tmp_path / "whole.tar", big).read_bytes()
    (tmp_path / "d-000001.tar").write_bytes(damage(whole, tmp_path / "whole.tar"))
    _index(tmp_path, {"d-000000.tar": 6, "d-000001.tar": 8})
    return f"{tmp_path}/d-{{000000..000001}}.tar"


def _member_offset(path, n: int) -> tuple[int, int]:
    """(header offset, data offset) of the n-th member."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[n]
        return member.offset, member.offset_data


def _corrupt_header(data: bytes, path) -> bytes:
    header, _ = _member_offset(path, 9)  # the 4th sample's second member
    return data[:header + 100] + b"\x7f" + data[header + 101:]  # mode field: the checksum no longer matches


DAMAGES = {  # name: (damage, expected skip counts besides short_shard)
    "cut mid-member": (lambda data, path: data[:_member_offset(path, 13)[1] + 100], {"corrupt_tar": 1}),
    "cut after a header": (lambda data, path: data[:_member_offset(path, 13)[1]], {"corrupt_tar": 1}),
    "cut at a member boundary": (lambda data, path: data[:_member_offset(path, 12)[0]], {}),
    "cut mid-header": (lambda data, path: data[:_member_offset(path, 12)[0] + 200], {}),
    "corrupt member header": (_corrupt_header, {}),
    "zero bytes": (lambda data, path: b"", {"corrupt_tar": 1}),
    "not a tar": (lambda data, path: b"\x00garbage" * 300, {"corrupt_tar": 1}),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_damaged_tar_loses_only_its_tail_and_counts_it(tmp_path, shard_tools, data_cfg, synth_tokenizer, name):
    damage, expected = DAMAGES[name]
    loader = _loader(data_cfg, synth_tokenizer, _shards_with(tmp_path, shard_tools, damage))
    batches = list(loader)
    ids = _ids(batches)
    kept = [i for i in ids if i >= 10]
    assert sorted(i for i in ids if i < 10) == list(range(6)) and kept == list(range(10, 10 + len(kept)))
    assert len(kept) < 8 and len(ids) == len(set(ids))
    skipped = loader.stats()["skipped"]
    tar_events = {k: v for k, v in skipped.items() if k in ("corrupt_tar", "unreadable_shard", "tar_error")}
    assert tar_events == expected and skipped["short_shard"] >= 1  # the error once, whatever follows from it
    assert sum(skipped.values()) - sum(tar_events.values()) == 8 - len(kept)  # every lost sample is counted
    assert len(batches) == loader.num_batches and loader.stats()["pad_samples"] == 14 - len(ids)


def test_shard_gone_after_planning_is_counted(tmp_path, shard_tools, data_cfg, synth_tokenizer):
    pattern = _shards_with(tmp_path, shard_tools, lambda data, path: data)
    loader = _loader(data_cfg, synth_tokenizer, pattern)
    (tmp_path / "d-000001.tar").unlink()  # after build_loader listed and counted it
    batches = list(loader)
    assert sorted(_ids(batches)) == list(range(6)) and len(batches) == loader.num_batches
    assert loader.stats()["skipped"] == {"unreadable_shard": 1, "short_shard": 8}


def test_duplicate_member_in_a_sample_is_counted(tmp_path, shard_tools, data_cfg, synth_tokenizer):
    with tarfile.open(tmp_path / "d-000000.tar", "w") as tar:
        for name, data in [("000000001.png", shard_tools.png()), ("000000001.txt", b"first"),
                           ("000000001.txt", b"second"), ("000000002.png", shard_tools.png()),
                           ("000000002.txt", b"two")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _index(tmp_path, {"d-000000.tar": 2})
    loader = _loader(data_cfg, synth_tokenizer, str(tmp_path))
    batch = next(iter(loader))
    assert batch["caption"][:2] == ["first", "two"] and loader.stats()["skipped"] == {"duplicate_member": 1}


# ------------------------------------------------------------------------------------------------ duplicate keys


@pytest.fixture
def duplicated(tmp_path, shard_tools):
    """Two shards: ids 0-7, then ids 6, 7 again (other captions) and 20-25."""
    shard_tools.tar(tmp_path / "d-000000.tar", [shard_tools.sample(i, f"first {i}") for i in range(8)])
    shard_tools.tar(tmp_path / "d-000001.tar", [shard_tools.sample(i, f"second {i}") for i in (6, 7, *range(20, 26))])
    _index(tmp_path, {"d-000000.tar": 8, "d-000001.tar": 8})
    return tmp_path


def test_duplicate_key_across_shards_keeps_the_first(duplicated, data_cfg, synth_tokenizer):
    loader = _loader(data_cfg, synth_tokenizer, str(duplicated))
    batches = list(loader)
    assert _ids(batches) == [*range(8), *range(20, 26)]
    captions = {i: c for b in batches for i, c in zip(b["sample_id"].tolist(), b["caption"])}
    assert captions[6] == "first 6" and captions[7] == "first 7"
    assert loader.stats()["skipped"] == {"duplicate_key": 2}


def test_duplicate_key_resume_is_exact(duplicated, data_cfg, synth_tokenizer):
    def make():
        return _loader(data_cfg, synth_tokenizer, str(duplicated), batch_size=3, shuffle_buffer=0)

    full = make()
    expected, expected_stats = _ids(list(full)), full.stats()
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(3)]  # 9 samples: both duplicates come after the checkpoint
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = make()
    resumed.load_state_dict(state)
    assert _ids(head) + _ids(list(resumed)) == expected and resumed.stats() == expected_stats


def test_inspect_reports_duplicate_keys(duplicated):
    summary = shards.inspect(duplicated)["splits"][duplicated.name]
    assert summary["duplicate_keys"] == 2
    assert summary["duplicates"][:2] == ["d-000001.tar:000000006", "d-000001.tar:000000007"]
    assert "duplicate keys: 2" in shards.format_inspect(shards.inspect(duplicated))


# ------------------------------------------------------------------------------------------------ logging


def test_skip_log_is_rate_limited_per_reason(caplog):
    now = [0.0]
    counter = SkipCounter("train rank 0 worker 0", log_interval=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="nlip_ds.data.samples"):
        for i in range(1, 1001):
            counter.count("undecodable_image", f"/data/d-000003.tar key {i:09d}: bad")
        counter.count("empty_caption", "/data/d-000003.tar key 000000005: empty")
        counter.count("short_shard", "/data/d-000004.tar: 3 of 10", n=7)
        counter.count("short_shard", "/data/d-000005.tar: 5 of 10", n=5)  # 7 -> 12: passes 10
        counter.count("short_shard", "/data/d-000006.tar: 9 of 10", n=1)
        now[0] = 61.0
        counter.count("undecodable_image", "/data/d-000009.tar key 000000042: bad")
        counter.count("undecodable_image", "/data/d-000009.tar key 000000043: bad")
    lines = [r.getMessage() for r in caplog.records]
    bad = [line for line in lines if "undecodable_image" in line]
    assert [re.search(r"\((\d+) so far\)", line).group(1) for line in bad] == ["1", "10", "100", "1000", "1001"]
    assert bad[0] == "train rank 0 worker 0: skipped undecodable_image (1 so far): /data/d-000003.tar key " \
                     "000000001: bad"
    assert "key 000000042" in bad[-1]  # a minute later: the next occurrence is logged again
    assert sum("short_shard" in line for line in lines) == 2 and sum("empty_caption" in line for line in lines) == 1
    assert counter.totals == {"undecodable_image": 1002, "empty_caption": 1, "short_shard": 13}


def test_skip_log_names_shard_and_key(tmp_path, shard_tools, data_cfg, synth_tokenizer, caplog):
    bad = [shard_tools.sample(i) for i in range(10, 14)]
    bad[1]["png"] = b""
    bad[2]["txt"] = b"\xff\xfe"
    shard_tools.tar(tmp_path / "d-000000.tar", bad)
    _index(tmp_path, {"d-000000.tar": 4})
    with caplog.at_level(logging.WARNING, logger="nlip_ds.data.samples"):
        list(_loader(data_cfg, synth_tokenizer, str(tmp_path)))
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"{tmp_path}/d-000000.tar key 000000011: empty_image" in line for line in lines)
    assert any(f"{tmp_path}/d-000000.tar key 000000012: non_utf8_caption" in line for line in lines)


# ------------------------------------------------------------------------------------------------ skip-rate ceiling


@pytest.fixture
def mostly_bad(tmp_path, shard_tools):
    """One shard: 8 good samples, then 40 with undecodable images."""
    items = [shard_tools.sample(i) for i in range(48)]
    for item in items[8:]:
        item["png"] = b"not a png"
    shard_tools.tar(tmp_path / "d-000000.tar", items)
    _index(tmp_path, {"d-000000.tar": 48})
    return tmp_path


def test_skip_rate_ceiling_stops_mid_epoch(mostly_bad, data_cfg, synth_tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "SKIP_CHECK_MIN_SEEN", 20)
    loader = _loader(data_cfg, synth_tokenizer, str(mostly_bad), max_skip_rate=0.5)
    yielded = []
    with pytest.raises(SkipRateError) as info:
        for batch in loader:
            yielded.append(batch)
    assert 0 < len(yielded) < loader.num_batches  # stopped before the end of the epoch (12 batches)
    message = str(info.value)
    assert "data.max_skip_rate=0.5 (50.0%)" in message and "undecodable_image" in message
    skipped = int(re.search(r"(\d+) of (\d+) samples skipped", message).group(1))
    seen = int(re.search(r"(\d+) of (\d+) samples skipped", message).group(2))
    assert seen >= 20 and skipped / seen > 0.5 and f"({skipped / seen:.1%})" in message


def test_skip_rate_ceiling_at_epoch_end(mostly_bad, data_cfg, synth_tokenizer):
    loader = _loader(data_cfg, synth_tokenizer, str(mostly_bad), max_skip_rate=0.8)  # 1000 never reached
    with pytest.raises(SkipRateError, match=r"40 of 48 samples skipped \(83.3%\) on rank 0 in epoch 0 after 12 "
                                            r"batches, above data.max_skip_rate=0.8 \(80.0%\)"):
        list(loader)
    assert len(list(_loader(data_cfg, synth_tokenizer, str(mostly_bad), max_skip_rate=0.85))) == 12


def test_skipped_total_counts_every_pass_and_survives_resume(mostly_bad, data_cfg, synth_tokenizer):
    loader = _loader(data_cfg, synth_tokenizer, str(mostly_bad))
    for epoch in range(2):
        loader.set_epoch(epoch)
        list(loader)
    assert loader.stats()["skipped"] == {"undecodable_image": 40}
    assert loader.stats()["skipped_total"] == {"undecodable_image": 80}
    loader.set_epoch(2)
    it = iter(loader)
    next(it), next(it), next(it)  # the 8 good samples, then pads: the 40 bad ones were read (and counted)
    state = json.loads(json.dumps(loader.state_dict()))
    del it
    resumed = _loader(data_cfg, synth_tokenizer, str(mostly_bad))
    resumed.load_state_dict(state)
    assert state["skipped"] == {"undecodable_image": 40} and state["skipped_before"] == {"undecodable_image": 80}
    assert resumed.stats()["skipped_total"] == {"undecodable_image": 120}
    list(resumed)
    assert resumed.stats()["skipped_total"] == {"undecodable_image": 120}


def test_reason_names_are_short_tag_names():
    assert len(set(SKIP_REASONS)) == len(SKIP_REASONS)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]{2,23}", reason) for reason in SKIP_REASONS)
    source = open(samples.__file__).read() + open(pipeline.__file__).read()
    counted = set(re.findall(r'(?:SampleError|count)\(\s*"([a-z0-9_]+)"', source))
    counted |= set(re.findall(r'return "([a-z_]+)"', open(samples.__file__).read()))  # tar_reason
    assert counted == set(SKIP_REASONS)
