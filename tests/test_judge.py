"""Shapes judge: right both ways per attribute on clean renders, and strays/streaks are not clean."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipelines.data.judge import describe_by_size, judge_batch, judge_image
from pipelines.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    render,
    sample_attribute_batch,
)

NUM_RENDERS = 1000
VALUES = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}


def _renders(num, resolution, seed, second_object_prob=0.0):
    """Seeded jittered ground-truth renders over all pairs (held-out ones included)."""
    rng = np.random.default_rng(seed)
    records = sample_attribute_batch(rng, num, "include", second_object_prob)
    return [render(record, resolution, rng) for record in records], records


def _with_other_value(record, attribute, rng, prefix=""):
    others = [v for v in VALUES[attribute] if v != record[prefix + attribute]]
    return record | {prefix + attribute: others[rng.integers(len(others))]}


@pytest.fixture(scope="module")
def renders_32():
    images, records = _renders(NUM_RENDERS, 32, seed=2024)
    results = [judge_image(image, record) for image, record in zip(images, records)]
    return images, records, results


@pytest.mark.parametrize("attribute", list(VALUES))
def test_accepts_matching_renders(renders_32, attribute):
    _, records, results = renders_32
    accepted = np.mean([result[attribute] for result in results])
    assert accepted >= 0.99, f"{attribute}: {accepted:.4f} of {len(records)} accepted"


def test_matching_renders_are_clean_and_all_correct(renders_32):
    _, _, results = renders_32
    assert np.mean([r["clean"] for r in results]) >= 0.99
    assert np.mean([r["all_correct"] for r in results]) >= 0.99


@pytest.mark.parametrize("attribute", list(VALUES))
def test_rejects_other_values(renders_32, attribute):
    images, records, _ = renders_32
    rng = np.random.default_rng(len(attribute))
    rejected = [
        judge_image(image, _with_other_value(record, attribute, rng))[attribute] is False
        for image, record in zip(images, records)
    ]
    assert np.mean(rejected) >= 0.99, f"{attribute}: {np.mean(rejected):.4f} rejected"


@pytest.fixture(scope="module")
def renders_64():
    images, records = _renders(200, 64, seed=64)
    return images, records, [judge_image(i, r) for i, r in zip(images, records)]


@pytest.mark.parametrize("attribute", list(VALUES))
def test_both_ways_at_64_pixels(renders_64, attribute):
    images, records, results = renders_64
    rng = np.random.default_rng(0)
    rejected = [
        judge_image(i, _with_other_value(r, attribute, rng))[attribute] is False
        for i, r in zip(images, records)
    ]
    assert np.mean([r[attribute] for r in results]) >= 0.99
    assert np.mean([r["all_correct"] for r in results]) >= 0.99
    assert np.mean(rejected) >= 0.99


def test_two_object_renders():
    images, records = _renders(120, 32, seed=7, second_object_prob=1.0)
    summary = judge_batch(images, records)
    assert summary["all_correct"] >= 0.99, summary
    rng = np.random.default_rng(1)
    for attribute in ("color", "shape", "size"):
        asked = [_with_other_value(r, attribute, rng, prefix="second_") for r in records]
        assert judge_batch(images, asked)[attribute] <= 0.01
    one_only = [r | {"second_shape": None, "second_color": None} for r in records]
    assert judge_batch(images, one_only)["clean"] == 0.0, "an extra object is not clean"


def _free_spot(image, background, pixels, rng):
    """Offset placing ``pixels`` (K, 2) rows/cols >= 2 px away from anything non-background."""
    busy = ndimage.binary_dilation(np.any(image != background, axis=2), iterations=2)
    size = image.shape[0]
    for _ in range(200):
        offset = rng.integers(0, size - pixels.max(axis=0))
        rows, cols = (pixels + offset).T
        if not busy[rows, cols].any():
            return rows, cols
    raise AssertionError("no free spot found")


def _stray_colour(background, rng):
    """An object colour, or a random colour at least 48 from the background."""
    if rng.random() < 0.5:
        return np.asarray(list(COLORS.values())[rng.integers(len(COLORS))], np.uint8)
    while True:
        colour = rng.integers(0, 256, size=3)
        if np.linalg.norm(colour - background) >= 48:
            return colour.astype(np.uint8)


FRAGMENTS = {
    "blob3": np.array([[0, 0], [0, 1], [1, 0]]),
    "square4": np.array([[0, 0], [0, 1], [1, 0], [1, 1]]),
    "streak_horizontal": np.array([[0, c] for c in range(6)]),
    "streak_vertical": np.array([[r, 0] for r in range(6)]),
    "streak_diagonal": np.array([[r, r] for r in range(6)]),
    "streak_dashed": np.array([[0, 0], [0, 1], [0, 3], [0, 5]]),
}


@pytest.mark.parametrize("fragment", list(FRAGMENTS))
def test_stray_fragment_is_not_clean(renders_32, fragment):
    images, records, results = renders_32
    rng = np.random.default_rng(5)
    for image, record, result in list(zip(images, records, results))[:100]:
        assert result["clean"]
        background = np.asarray(BACKGROUNDS[record["background"]], np.uint8)
        rows, cols = _free_spot(image, background, FRAGMENTS[fragment], rng)
        dirty = image.copy()
        dirty[rows, cols] = _stray_colour(background, rng)
        verdict = judge_image(dirty, record)
        assert not verdict["clean"] and not verdict["all_correct"], (fragment, record)


@pytest.mark.parametrize("fragment", [np.array([[0, 0]]), np.array([[0, 0], [0, 1]])])
def test_specks_below_the_blob_size_stay_clean(renders_32, fragment):
    images, records, _ = renders_32
    rng = np.random.default_rng(6)
    for image, record in list(zip(images, records))[:50]:
        background = np.asarray(BACKGROUNDS[record["background"]], np.uint8)
        rows, cols = _free_spot(image, background, fragment, rng)
        speckled = image.copy()
        speckled[rows, cols] = _stray_colour(background, rng)
        assert judge_image(speckled, record)["all_correct"], record


def test_streak_attached_to_object_is_not_clean(renders_32):
    images, records, _ = renders_32
    for image, record in list(zip(images, records))[:150]:
        background = np.asarray(BACKGROUNDS[record["background"]], np.uint8)
        rows, cols = np.nonzero(np.any(image != background, axis=2))
        row = int(np.median(rows))
        # Grow a 6 px streak outward from the object's edge, towards the image's free side.
        if "right" in record["position"]:
            start = cols[rows == row].min()
            streak_cols = np.arange(start - 6, start)
        else:
            start = cols[rows == row].max() + 1
            streak_cols = np.arange(start, start + 6)
        dirty = image.copy()
        dirty[row, streak_cols] = COLORS[record["color"]]
        assert not judge_image(dirty, record)["clean"], record


def _farthest_colour(background, colour):
    """The palette colour farthest from the background -> ``colour`` segment."""
    direction = colour - background
    palette = np.array(list(COLORS.values()), float)  # (8, 3)
    along = np.clip((palette - background) @ direction / (direction @ direction), 0, 1)
    distances = np.linalg.norm(palette - background - along[:, None] * direction, axis=1)
    return palette[np.argmax(distances)].astype(np.uint8)


def test_blotch_of_another_colour_inside_an_object_is_not_clean(renders_32):
    images, records, _ = renders_32
    large = [(i, r) for i, r in zip(images, records) if r["size"] == "large"][:100]
    for image, record in large:
        background = np.asarray(BACKGROUNDS[record["background"]], float)
        colour = np.asarray(COLORS[record["color"]], float)
        full = np.all(image == colour, axis=2)  # (H, W) fully covered pixels
        corners = full[:-1, :-1] & full[1:, :-1] & full[:-1, 1:] & full[1:, 1:]
        rows, cols = np.nonzero(corners)
        row, col = rows[len(rows) // 2], cols[len(cols) // 2]
        blotched = image.copy()
        blotched[row : row + 2, col : col + 2] = _farthest_colour(background, colour)
        assert not judge_image(blotched, record)["clean"], record


def test_uneven_background_is_not_clean(renders_32):
    images, records, _ = renders_32
    ramp = np.linspace(-40, 40, 32)[None, :, None]  # (1, W, 1) horizontal gradient
    for image, record in list(zip(images, records))[:50]:
        shaded = np.clip(image + ramp, 0, 255).astype(np.uint8)
        assert not judge_image(shaded, record)["clean"]


def test_empty_image_fails_every_object_attribute():
    blank = np.zeros((32, 32, 3), np.uint8)
    record = {"shape": "circle", "color": "red", "size": "small", "position": "center"}
    result = judge_image(blank, record | {"background": "black"})
    assert result["background"] is True
    assert not any(result[k] for k in ("color", "shape", "size", "position", "clean"))
    assert result["all_correct"] is False


def test_unasked_attributes_are_not_judged_and_pil_is_accepted():
    images, records = _renders(20, 32, seed=3)
    partial = [{"shape": r["shape"], "position": r["position"]} for r in records]
    summary = judge_batch([Image.fromarray(image) for image in images], partial)
    assert summary["color"] is None and summary["background"] is None
    assert summary["shape"] == 1.0 and summary["all_correct"] == 1.0 and summary["count"] == 20


def test_by_size_groups_by_the_asked_size():
    """Groups follow the size asked, not the size drawn: large renders asked as "small" land
    under "small" with the size wrong; large renders asked with a wrong shape fail under "large";
    a record that asks no size is in no group."""
    images, records = _renders(60, 32, seed=4)
    rng = np.random.default_rng(0)
    large = [i for i, record in enumerate(records) if record["size"] == "large"]
    asked = [dict(record) for record in records]
    mislabelled, wrong_shape, no_size = large[:5], large[5:-1], large[-1]
    for i in mislabelled:
        asked[i]["size"] = "small"
    for i in wrong_shape:
        asked[i] = _with_other_value(asked[i], "shape", rng)
    del asked[no_size]["size"]
    summary = judge_batch(images, asked)
    small, large_group = summary["by_size"]["small"], summary["by_size"]["large"]
    assert small["count"] == 60 - len(large) + len(mislabelled)
    assert large_group["count"] == len(wrong_shape) and summary["count"] == 60
    assert small["all_correct"] == pytest.approx((small["count"] - 5) / small["count"])
    assert small["size"] == pytest.approx((small["count"] - 5) / small["count"])
    assert large_group["shape"] == 0.0 and large_group["all_correct"] == 0.0
    assert judge_batch(images[:3], [{"shape": r["shape"]} for r in records[:3]])["by_size"] == {}
    assert describe_by_size({"by_size": {"small": {"all_correct": 0.5, "shape": None}}}) == (
        "small 0.50 (shape n/a)"
    )


def test_bad_inputs_raise_value_error():
    record = {"shape": "circle"}
    with pytest.raises(ValueError, match="uint8"):
        judge_image(np.zeros((32, 32, 3), np.float32), record)
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        judge_image(np.zeros((32, 32), np.uint8), record)
    with pytest.raises(ValueError, match="2 images but 1"):
        judge_batch([np.zeros((32, 32, 3), np.uint8)] * 2, [record])
