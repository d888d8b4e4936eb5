"""Shapes dataset: seeded determinism, splits, the held-out pairs, geometry at 32/64/128, captions."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipelines.data.shapes import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    SYNONYMS,
    ShapesConfig,
    caption_for,
    is_held_out,
    make_shapes_dataset,
    render,
    sample_attribute_batch,
    sample_attributes,
)


def _object_bbox(image: np.ndarray, background) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive of every pixel that differs from the background at all."""
    rows, cols = np.nonzero(np.any(image != np.asarray(background, np.uint8), axis=2))
    return cols.min(), rows.min(), cols.max(), rows.max()


def _images(dataset) -> np.ndarray:
    return np.stack([np.asarray(image) for image in dataset["image"]])  # (N, H, W, 3)


def test_dataset_is_deterministic_by_seed():
    first = make_shapes_dataset("train", 48, seed=3, second_object_prob=0.3)
    again = make_shapes_dataset("train", 48, seed=3, second_object_prob=0.3)
    other = make_shapes_dataset("train", 48, seed=4, second_object_prob=0.3)
    assert np.array_equal(_images(first), _images(again))
    assert first.remove_columns("image").to_list() == again.remove_columns("image").to_list()
    assert not np.array_equal(_images(first), _images(other))
    assert first["caption"] != other["caption"]


def test_splits_differ():
    splits = {s: make_shapes_dataset(s, 48, seed=0) for s in ("train", "validation", "test")}
    captions = {s: tuple(d["caption"]) for s, d in splits.items()}
    assert len(set(captions.values())) == 3
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not np.array_equal(_images(splits[a]), _images(splits[b]))


def test_dataset_columns_and_types():
    dataset = make_shapes_dataset("validation", 40, resolution=32, seed=1, second_object_prob=0.5)
    expected = {"image", "caption", "shape", "color", "size", "position", "background"}
    expected |= {"second_shape", "second_color", "second_size", "second_position", "held_out"}
    assert set(dataset.column_names) == expected
    row = dataset[0]
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
    assert row["image"].size == (32, 32)
    seconds = [s is not None for s in dataset["second_shape"]]
    assert 0 < sum(seconds) < len(seconds), "second_object_prob=0.5 gives a mix"
    for row in dataset.remove_columns("image"):
        assert row["held_out"] == is_held_out(row)
        if row["second_shape"] is not None:
            assert row["second_position"] != row["position"]
            assert "center" not in (row["position"], row["second_position"])


def test_held_out_set_is_documented_and_covers_all_shapes():
    assert len(HELD_OUT) == 6
    assert {shape for _, shape in HELD_OUT} == set(SHAPES)
    assert all(color in COLORS for color, _ in HELD_OUT)
    import pipelines.data.shapes as shapes_module

    for color, shape in HELD_OUT:
        assert f"({color}, {shape})" in shapes_module.__doc__


def test_held_out_pairs_never_in_train():
    rng = np.random.default_rng(0)
    records = sample_attribute_batch(rng, 50_000, "exclude", second_object_prob=0.5)
    pairs = {(r["color"], r["shape"]) for r in records}
    pairs |= {(r["second_color"], r["second_shape"]) for r in records if r["second_shape"]}
    assert pairs.isdisjoint(HELD_OUT)
    assert len(pairs) == len(COLORS) * len(SHAPES) - len(HELD_OUT), "every other pair is seen"
    train = make_shapes_dataset("train", 3000, seed=5, second_object_prob=0.5)
    assert not any(train["held_out"])
    assert not {(c, s) for c, s in zip(train["color"], train["shape"])} & set(HELD_OUT)
    seconds = zip(train["second_color"], train["second_shape"])
    assert not {(c, s) for c, s in seconds if s is not None} & set(HELD_OUT)


def test_evaluation_splits_contain_held_out_pairs():
    validation = make_shapes_dataset("validation", 400, seed=0)
    fraction = np.mean(validation["held_out"])
    assert 0.15 < fraction < 0.35, fraction  # default held_out_fraction 0.25
    only = sample_attribute_batch(np.random.default_rng(2), 500, "only")
    assert all((r["color"], r["shape"]) in HELD_OUT for r in only)
    assert {(r["color"], r["shape"]) for r in only} == set(HELD_OUT)
    with pytest.raises(ValueError, match="held_out_fraction"):
        make_shapes_dataset("train", 10, held_out_fraction=0.1)


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_resolutions_and_size_geometry(resolution):
    dataset = make_shapes_dataset("train", 12, resolution=resolution, seed=2)
    assert all(image.size == (resolution, resolution) for image in dataset["image"])
    rng = np.random.default_rng(resolution)
    scale = resolution / 32
    widths = {"small": [], "large": []}
    for record in sample_attribute_batch(rng, 300):
        image = render(record, resolution, rng)
        assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
        x0, y0, x1, y1 = _object_bbox(image, BACKGROUNDS[record["background"]])
        widths[record["size"]].append(max(x1 - x0, y1 - y0) + 1)
        if record["position"] != "center":  # a large object fits inside its quadrant
            quadrant_x = 0 if "left" in record["position"] else resolution // 2
            quadrant_y = 0 if "top" in record["position"] else resolution // 2
            assert quadrant_x <= x0 and x1 < quadrant_x + resolution // 2
            assert quadrant_y <= y0 and y1 < quadrant_y + resolution // 2
    assert max(widths["small"]) <= int(np.ceil(8 * scale))
    assert min(widths["large"]) >= 1.4 * max(widths["small"])


def test_small_objects_touch_at_most_8_pixels_at_32():
    rng = np.random.default_rng(11)
    for shape in SHAPES:
        for _ in range(40):
            record = sample_attributes(rng) | {"shape": shape, "size": "small"}
            image = render(record, 32, rng)
            x0, y0, x1, y1 = _object_bbox(image, BACKGROUNDS[record["background"]])
            assert x1 - x0 + 1 <= 8 and y1 - y0 + 1 <= 8, (shape, x0, y0, x1, y1)


def test_two_objects_never_touch():
    rng = np.random.default_rng(3)
    for record in sample_attribute_batch(rng, 200, second_object_prob=1.0):
        image = render(record, 32, rng)
        mask = np.any(image != np.asarray(BACKGROUNDS[record["background"]], np.uint8), axis=2)
        _, count = ndimage.label(mask, np.ones((3, 3), bool))  # 8-connected
        assert count == 2, record


def test_render_nominal_and_seeded():
    record = {"shape": "circle", "color": "red", "size": "large", "position": "center"}
    record["background"] = "black"
    nominal = render(record, 32)
    assert np.array_equal(nominal, render(record, 32))
    assert tuple(nominal[16, 16]) == COLORS["red"] and tuple(nominal[0, 0]) == (0, 0, 0)
    assert np.array_equal(nominal[:, ::-1], nominal), "a centred circle is mirror symmetric"
    jittered = [render(record, 32, np.random.default_rng(seed)) for seed in (0, 0, 1)]
    assert np.array_equal(jittered[0], jittered[1]) and not np.array_equal(jittered[0], jittered[2])
    with pytest.raises(ValueError, match="shape='hexagon'"):
        render(record | {"shape": "hexagon"}, 32)
    with pytest.raises(ValueError, match="background"):
        render(record | {"background": "red"}, 32)


def test_captions_name_every_attribute_and_vary():
    rng = np.random.default_rng(4)
    records = sample_attribute_batch(rng, 400, second_object_prob=0.3)
    captions = [caption_for(record, rng) for record in records]
    assert len(set(captions)) > 350
    assert any(c.startswith("there is") for c in captions)
    assert any(" background with " in c for c in captions)
    assert any(c.split()[1] == "background," for c in captions)
    assert any(c.startswith("in the ") for c in captions)
    for record, caption in zip(records, captions):
        for field in ("shape", "color", "size", "position", "background"):
            words = SYNONYMS.get(record[field], (record[field],))
            assert any(word in caption for word in words), (field, caption)
        assert (" and " in caption) == (record["second_shape"] is not None)
    vocabulary = {word for caption in captions for word in caption.replace(",", " ").split()}
    assert len(vocabulary) < 80


def test_every_attribute_value_is_sampled():
    records = sample_attribute_batch(np.random.default_rng(9), 2000, "include")
    for field, values in [("shape", SHAPES), ("color", COLORS), ("size", SIZES)]:
        assert {r[field] for r in records} == set(values)
    assert {r["position"] for r in records} == set(POSITIONS)
    assert {r["background"] for r in records} == set(BACKGROUNDS)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "dev"}, "split='dev'"),
        ({"resolution": 8}, "resolution=8"),
        ({"second_object_prob": 1.5}, "second_object_prob=1.5"),
        ({"num_samples": -1}, "num_samples=-1"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_shapes_dataset(**({"split": "train", "num_samples": 2} | kwargs))


def test_config_round_trip():
    config = ShapesConfig(resolution=64, second_object_prob=0.2)
    assert ShapesConfig(**config.to_dict()) == config
    dataset = config.dataset("test", 4, seed=1)
    assert dataset[0]["image"].size == (64, 64)
    assert dataset["caption"] == make_shapes_dataset("test", 4, 64, 1, 0.2)["caption"]
