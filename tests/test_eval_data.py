"""Evaluation inputs: the three readers, bad inputs reported with the file named, rank sharding and gather."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from nlip_ds.config import ModelConfig
from nlip_ds.eval import embed as E
from nlip_ds.eval.data import Problems, for_rank, image_batches, open_records
from nlip_ds.eval.tasks import EvalOptions, resolve_class_names


def _png(color=(255, 0, 0), size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "folder"
    for name, n in (("cat", 2), ("dog", 3)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(_png((40 * i, 0, 0)))
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def karpathy(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i, split in enumerate(["test", "test", "train", "test"]):
        (images / f"{i}.png").write_bytes(_png((0, 60 * i, 0)))
        sentences = [{"raw": f"picture {i} caption {j}"} for j in range(2 if i != 3 else 0)]
        entries.append({"filename": f"{i}.png", "split": split, "sentences": sentences})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": entries}))
    return path, images


def _drain(records, need_captions=False, batch_size=2):
    problems = Problems()
    kept = [r for _, batch in image_batches(records, 8, batch_size, problems, need_captions) for r in batch]
    return kept, problems


def test_image_folder_labels_follow_the_class_list_and_broken_images_are_named(image_folder):
    kept, problems = _drain(open_records(str(image_folder), class_names=["dog", "cat"]))
    assert [(r.where.split("/")[-2], r.label) for r in kept] == [("cat", 1)] * 2 + [("dog", 0)] * 3
    assert [(w.endswith("dog/broken.png"), "undecodable_image" in why) for w, why in problems.items] == \
        [(True, True)]


def test_image_folder_with_an_unknown_class_folder_names_it(image_folder):
    with pytest.raises(ValueError, match=r"folder/cat is not in the class list"):
        list(open_records(str(image_folder), class_names=["dog"]))


def test_karpathy_json_split_captions_and_an_image_without_captions(karpathy):
    path, images = karpathy
    kept, problems = _drain(open_records(str(path), image_root=str(images), split="test"), need_captions=True)
    assert [r.captions for r in kept] == [["picture 0 caption 0", "picture 0 caption 1"],
                                          ["picture 1 caption 0", "picture 1 caption 1"]]
    assert problems.items == [(str(images / "3.png"), "no captions")]


def test_karpathy_missing_image_is_named(karpathy, tmp_path):
    path, images = karpathy
    (images / "1.png").unlink()
    _, problems = _drain(open_records(str(path), image_root=str(images), split="test"))
    assert [w for w, _ in problems.items] == [str(images / "1.png")]
    assert "unreadable_image" in problems.items[0][1]


def test_shards_read_image_caption_and_label_and_name_a_bad_member(tmp_path):
    shard = tmp_path / "eval-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, image, caption, cls in (("000", _png(), b"a red box", b"2"), ("001", b"garbage", b"x", b"0"),
                                         ("002", _png(), None, b"1")):
            for ext, data in (("png", image), ("txt", caption), ("cls", cls)):
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    kept, problems = _drain(open_records(str(shard)), need_captions=True)
    assert [(r.captions, r.label) for r in kept] == [(["a red box"], 2)]
    assert [w for w, _ in problems.items] == [f"{shard}:001", f"{shard}:002"]
    assert problems.items[1][1] == "no captions"


def test_missing_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        open_records(str(tmp_path / "nope.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds neither"):
        open_records(str(tmp_path / "empty"))
    (tmp_path / "root" / "test").mkdir(parents=True)
    (tmp_path / "root" / "test" / "test-000000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"root holds split folders of shards \(test\); pass one"):
        open_records(str(tmp_path / "root"))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"--classes FILE \(looked for .*shards/classes.txt"):
        resolve_class_names(EvalOptions(("zeroshot",), str(tmp_path / "shards")))


def test_class_file_found_beside_the_split_folder(synth_dir):
    names = resolve_class_names(EvalOptions(("zeroshot",), str(synth_dir / "test")))
    assert names == (synth_dir / "classes.txt").read_text().split()


def test_for_rank_takes_every_nth_record_of_the_first_max_samples(karpathy):
    path, images = karpathy
    records = list(open_records(str(path), split=None))
    assert [r.index for r in for_rank(records, 1, 2, max_samples=3)] == [1]
    assert [r.index for r in for_rank(records, 0, 2)] == [0, 2]


def test_two_rank_shares_gather_into_the_one_process_result(synth_dir, synth_tokenizer, monkeypatch):
    from nlip_ds.model import NLIPModel

    torch.manual_seed(0)
    model = NLIPModel.from_config(ModelConfig(), synth_tokenizer).eval()

    def run(rank, world):
        records = for_rank(open_records(str(synth_dir / "test")), rank, world, max_samples=13)
        return E.embed_records(model, synth_tokenizer, records, batch_size=4, device="cpu", need_captions=True,
                               embed_captions=True)

    single = E.gather_embedded(run(0, 1))
    shares = [run(0, 2), run(1, 2)]
    monkeypatch.setattr(E, "all_gather_object", lambda obj: shares)
    merged = E.gather_embedded(shares[0])
    assert merged.index.tolist() == single.index.tolist() == list(range(13))
    assert merged.where == single.where and merged.captions == single.captions
    torch.testing.assert_close(merged.image, single.image)
    torch.testing.assert_close(merged.text, single.text)
    assert merged.text_image.tolist() == single.text_image.tolist() == list(range(13))
