"""The image-caption data layer: decoding options, transforms, and every kind of source."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data.decode import DataReport, ImageDecodeError, decode_image, reduce_report
from pipelines.data.images import (
    ImageCaptionDataset,
    ImageTransform,
    StreamingImageCaptionDataset,
    load_image_caption_dataset,
)


def png(color=(255, 0, 0), size=(16, 16), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def load_quietly(source, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_image_caption_dataset(source, resolution=16, **kwargs)
    return dataset, [str(warning.message) for warning in caught]


# ---------------------------------------------------------------- decoding options
@pytest.mark.parametrize(
    ("size", "kwargs", "reason"),
    [
        ((20, 20), {"max_pixels": 399}, "too_large"),
        ((20, 20), {"min_size": 21}, "too_small"),
        ((4, 30), {}, "too_small"),  # default min_size is 8
    ],
)
def test_decode_limits(size, kwargs, reason):
    with pytest.raises(ImageDecodeError) as error:
        decode_image(png(size=size), **kwargs)
    assert error.value.reason == reason
    decode_image(png(size=(20, 20)), max_pixels=400, min_size=20)  # the limits are inclusive


def test_decode_background_and_unsupported_modes(tmp_path):
    transparent = png((255, 0, 0, 0), mode="RGBA")
    assert decode_image(transparent, background=(0, 0, 0)).getpixel((3, 3)) == (0, 0, 0)
    path = tmp_path / "x.png"
    path.write_bytes(transparent)
    assert decode_image(path).getpixel((3, 3)) == (255, 255, 255)  # paths work, white default
    for image, reason in (
        (Image.new("F", (16, 16), 0.5), "unsupported_mode"),
        (Image.fromarray(np.full((16, 16), 70000, np.int32)), "unsupported_mode"),
    ):
        with pytest.raises(ImageDecodeError) as error:
            decode_image(image)
        assert error.value.reason == reason
    with pytest.raises(ImageDecodeError) as error:
        decode_image(tmp_path / "absent.png")
    assert error.value.reason == "missing_file"


# ---------------------------------------------------------------- transforms
def test_transform_resize_crop_range():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (20, 0, 40, 20))  # right half white
    out = ImageTransform(16)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() == -1.0 and out.max() == 1.0  # exact ends of the range
    assert torch.all(out[:, :, 0] == -1) and torch.all(out[:, :, -1] == 1)  # centre of 32x16
    small = ImageTransform(16)(Image.new("RGB", (9, 12), (0, 255, 0)))  # resized up
    assert small.shape == (3, 16, 16) and torch.allclose(small[1], torch.ones(16, 16))


def test_transform_random_crop_and_flip_are_seeded():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8))
    random = ImageTransform(16, crop="random", flip=True)
    outs = [random(image, torch.Generator().manual_seed(seed)) for seed in range(8)]
    again = [random(image, torch.Generator().manual_seed(seed)) for seed in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    assert len({tuple(out.flatten()[:64].tolist()) for out in outs}) > 1
    center = ImageTransform(16, flip=True)
    plain = ImageTransform(16)(image)
    flips = [center(image, torch.Generator().manual_seed(seed)) for seed in range(16)]
    assert any(torch.equal(out, plain.flip(-1)) for out in flips)
    assert any(torch.equal(out, plain) for out in flips)
    assert all(torch.equal(out, plain) or torch.equal(out, plain.flip(-1)) for out in flips)


def test_channel_shuffle_permutes_channels_keeps_grays_and_is_seeded():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, 3), np.uint8)
    pixels[:4] = 128  # a gray band: every channel order leaves it as it is
    image, plain = Image.fromarray(pixels), ImageTransform(16)(Image.fromarray(pixels))
    shuffle = ImageTransform(16, channel_shuffle=1.0)
    outs = [shuffle(image, torch.Generator().manual_seed(seed)) for seed in range(24)]
    again = [shuffle(image, torch.Generator().manual_seed(seed)) for seed in range(24)]
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    orders = list(itertools.permutations(range(3)))
    found = set()
    for out in outs:
        matches = [order for order in orders if torch.equal(out, plain[list(order)])]
        assert len(matches) == 1  # each output is exactly one reordering of the channels
        found.add(matches[0])
        assert torch.equal(out[:, :4], plain[:, :4])
    assert len(found) == 6  # all six orders occur, the identity included
    never = ImageTransform(16, channel_shuffle=0.0)
    assert all(torch.equal(never(image, torch.Generator().manual_seed(s)), plain) for s in range(4))


def test_loader_applies_channel_shuffle_to_the_split_it_is_given():
    """`load_image_caption_dataset(channel_shuffle=...)` reaches the transform: every item is a
    reordering of the plain item's channels, the Shapes backgrounds (grays) stay, and some
    items change."""
    plain = load_image_caption_dataset("shapes", resolution=16, num_samples=12)
    shuffled = load_image_caption_dataset("shapes", resolution=16, num_samples=12,
                                          channel_shuffle=1.0)  # fmt: skip
    orders = list(itertools.permutations(range(3)))
    changed = 0
    for index in range(12):
        a, b = plain[index]["image"], shuffled[index]["image"]
        assert any(torch.equal(b, a[list(order)]) for order in orders)
        assert torch.equal(a[:, 0, 0], b[:, 0, 0])  # the corner is background: a gray
        changed += not torch.equal(a, b)
    assert changed > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resolution": 0},
        {"resolution": 16, "crop": "middle"},
        {"resolution": 16, "channel_shuffle": 1.5},
        {"resolution": 16, "channel_shuffle": -0.1},
    ],
)
def test_transform_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=r"resolution|crop|channel_shuffle"):
        ImageTransform(**kwargs)


# ---------------------------------------------------------------- image folders
def test_imagefolder_jsonl_sidecars_and_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "sub" / "b.png").write_bytes(png((0, 0, 255)))
    (tmp_path / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": " a red square "}) + "\n\n"
        + json.dumps({"file_name": "a.png", "caption": "second caption"}) + "\n"
    )  # fmt: skip
    (tmp_path / "c.jpg").write_bytes(png((0, 255, 0)))  # a PNG named .jpg decodes by content
    (tmp_path / "c.txt").write_text("green")
    (tmp_path / "notes.md").write_text("not an image, ignored")
    dataset, warned = load_quietly(tmp_path)
    assert isinstance(dataset, ImageCaptionDataset)
    assert dataset.names == ["c.jpg", "sub/a.png", "sub/a.png", "sub/b.png"]
    assert dataset.captions == ["green", "a red square", "second caption", ""]
    assert dict(dataset.report.counts) == {"missing_caption": 1}
    assert any("missing_caption=1 (e.g. sub/b.png)" in message for message in warned)
    assert torch.all(dataset[3]["image"][2] == 1) and torch.all(dataset[3]["image"][0] == -1)


def test_imagefolder_csv(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(png())
    rows = ["file_name,text", 'a.png,"red, square"', "b.png", "c.png,plain,extra", "d.png,gone"]
    (tmp_path / "metadata.csv").write_bytes(("\ufeff" + "\n".join(rows) + "\n").encode())
    dataset, _ = load_quietly(tmp_path)
    # b: too few fields, c: too many (both counted, not fatal), d: no such file.
    assert dict(dataset.report.counts) == {
        "bad_metadata_line": 2, "missing_file": 1, "missing_caption": 2
    }  # fmt: skip
    assert dataset.names == ["a.png", "b.png", "c.png"]
    assert dataset.captions == ["red, square", "", ""]


def test_split_folders_and_missing_caption_skip(tmp_path):
    for split, count in (("train", 3), ("validation", 2)):
        (tmp_path / split).mkdir()
        for index in range(count):
            (tmp_path / split / f"{index}.png").write_bytes(png())
            if index:
                (tmp_path / split / f"{index}.txt").write_text(f"{split} {index}")
    train, _ = load_quietly(tmp_path, missing_caption="skip")
    assert train.captions == ["train 1", "train 2"]
    assert dict(train.report.counts) == {"skipped_missing_caption": 1}
    validation, _ = load_quietly(tmp_path, split="validation")
    assert validation.captions == ["", "validation 1"]
    with pytest.raises(ValueError, match="split='test'"):
        load_image_caption_dataset(tmp_path, split="test")
    with pytest.raises(ValueError, match="split='validation'"):
        load_image_caption_dataset(tmp_path / "train", split="validation")


def test_no_valid_image_and_bad_arguments(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_text("text")
    with pytest.raises(ValueError, match=r"no valid image among 2 candidates.*empty_file=1"):
        load_image_caption_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="source="):
        load_image_caption_dataset(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="missing_caption="):
        load_image_caption_dataset(tmp_path, missing_caption="drop")


# ---------------------------------------------------------------- datasets sources
def test_datasets_on_disk_with_bad_row_and_extras(tmp_path):
    rows = {
        "image": [{"bytes": png((255, 0, 0)), "path": None}, {"bytes": b"junk", "path": None},
                  {"bytes": png((0, 0, 255)), "path": None}],
        "caption": ["red", "broken", None],
        "label": [1, 2, 3],
    }  # fmt: skip
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "label": datasets.Value("int64"),
        }
    )
    table = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": table, "validation": table.select([0])}).save_to_disk(
        tmp_path / "dd"
    )
    table.save_to_disk(tmp_path / "single")
    for source in (tmp_path / "dd", tmp_path / "single", table):
        dataset, _ = load_quietly(source)
        assert dict(dataset.report.counts) == {"not_an_image": 1, "missing_caption": 1}
        assert dataset.captions == ["red", ""]
        assert [dataset.extras(index)["label"] for index in range(2)] == [1, 3]
    validation, _ = load_quietly(tmp_path / "dd", split="validation")
    assert len(validation) == 1
    with pytest.raises(ValueError, match="image_column='picture'"):
        load_image_caption_dataset(table, image_column="picture")


def test_shapes_source():
    dataset = load_image_caption_dataset("shapes", num_samples=6, resolution=32, seed=3)
    assert len(dataset) == 6 and dataset[0]["image"].shape == (3, 32, 32)
    assert {"shape", "color", "position"} <= set(dataset.extras(0))
    assert dict(dataset.report.counts) == {}


# ---------------------------------------------------------------- WebDataset shards
def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards_indexed_and_streaming(tmp_path):
    for shard in range(2):
        samples = []
        for index in range(5):
            samples.append((f"d/s{shard}_{index}.png", png((40 * index, 0, 0))))
            samples.append((f"d/s{shard}_{index}.txt", f"shard {shard} item {index}".encode()))
        samples.append((f"d/bad{shard}.jpg", b"not a jpeg"))
        write_shard(tmp_path / f"part-{shard}.tar", samples)
    (tmp_path / "part-9.tar").write_bytes(b"truncated garbage, not a tar")
    indexed, _ = load_quietly(tmp_path)
    assert len(indexed) == 10
    # Captions are only counted for valid images: the bad ones are just not_an_image.
    assert dict(indexed.report.counts) == {"not_an_image": 2, "bad_shard": 1}
    glob_set, _ = load_quietly(str(tmp_path / "part-[01].tar"))
    assert glob_set.captions == indexed.captions
    stream, _ = load_quietly(tmp_path, streaming=True)
    assert isinstance(stream, StreamingImageCaptionDataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = list(stream)
    assert [item["caption"] for item in items] == indexed.captions
    assert all(torch.equal(a["image"], indexed[i]["image"]) for i, a in enumerate(items))
    assert stream.report.scope == "rank" and stream.report.counts["not_an_image"] == 2
    assert reduce_report(stream.report) is stream.report  # no process group: unchanged


def test_dataloader_workers_match_single_process(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(tmp_path / f"{index}.png")
        (tmp_path / f"{index}.txt").write_text(f"item {index}")
    dataset, _ = load_quietly(tmp_path, crop="random", flip=True, seed=5)
    dataset.set_epoch(1)
    single = list(torch.utils.data.DataLoader(dataset, batch_size=4))
    multi = list(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(single, multi))
    assert [a["caption"] for a in single] == [b["caption"] for b in multi]
    dataset.set_epoch(2)
    assert not all(torch.equal(dataset[i]["image"], single[0]["image"][i]) for i in range(4))


def test_report_round_trip_and_merge():
    report = DataReport()
    for index in range(7):
        report.add("corrupt", f"f{index}")
    report.add("missing_caption", "g")
    report.num_valid = 3
    again = DataReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report and report.num_skipped == 7
    again.merge(report)
    assert again.counts["corrupt"] == 14 and len(again.examples["corrupt"]) == 5
    assert again.num_valid == 6


def test_streaming_datasets_iterable_and_hub_names_offline(tmp_path):
    rows = {"image": [{"bytes": png((255, 0, 0)), "path": None}, {"bytes": b"", "path": None},
                      {"bytes": png((0, 0, 255)), "path": None}], "text": ["red", "none", " "]}  # fmt: skip
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    iterable = datasets.Dataset.from_dict(rows, features=features).to_iterable_dataset()
    with pytest.raises(ValueError, match="streaming=True"):
        load_image_caption_dataset(iterable)
    stream, _ = load_quietly(iterable, streaming=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(stream)
    assert [item["caption"] for item in items] == ["red", ""]
    assert dict(stream.report.counts) == {"empty_file": 1, "empty_caption": 1}
    assert any("empty_file=1" in str(warning.message) for warning in caught)
    with pytest.raises(FileNotFoundError, match="Hub dataset"):  # HF_HUB_OFFLINE=1 in tests
        load_image_caption_dataset("someone/no-such-dataset")
    with pytest.raises(FileNotFoundError, match="not an image folder"):
        load_image_caption_dataset("./no-such-folder")


def test_reduce_report_sums_rank_reports(tmp_path):
    """A one-process gloo group runs the real all_gather path of reduce_report."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        local = DataReport(scope="rank")
        local.add("corrupt", "a.png")
        local.num_valid = 4
        total = reduce_report(local)
        assert total.scope == "global" and total.counts == local.counts and total.num_valid == 4
        assert reduce_report(total) is total  # already global: never counted twice
    finally:
        torch.distributed.destroy_process_group()
