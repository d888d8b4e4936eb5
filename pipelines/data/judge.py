"""The Shapes judge: a pixel-analysis check of an image against the attributes its caption asked for.

Steps, all in RGB with Euclidean colour distances (0-441):

1. Background: per-channel median of the 1-pixel image border, named by the nearest
   ``BACKGROUNDS`` colour (within ``BACKGROUND_MAX_DISTANCE``).
2. Objects: pixels farther than ``OBJECT_DISTANCE`` from the background, split into
   8-connected components; the largest ones are the objects (one per asked object). Two asked
   objects are matched to components by their asked positions.
3. Per object: colour = median of its most saturated ("core") pixels, named by the nearest
   palette colour (mixed with the background down to ``MIN_COLOR_STRENGTH``) within
   ``COLOR_MAX_DISTANCE``. Each pixel's coverage alpha in [0, 1] is its projection onto the
   background -> palette-colour line, so antialiased edges count fractionally. Shape = the
   template (the generator's own ``shape_coverage``, sharp or blurred by ``TEMPLATE_BLURS``) with
   the smallest L1 distance to alpha, each fitted to the measured area and area centroid; none
   if that distance exceeds ``SHAPE_MAX_ERROR``. The fitted extent gives the size (threshold at
   the geometric mean of small and large), the fitted box centre the position (nearest anchor).
4. Clean: exactly the asked number of objects and no stray fragment. Not clean if another
   component has >= ``MIN_BLOB_PIXELS`` pixels, if pixels off the objects farther than
   ``STRAY_DISTANCE`` from the background form a blob of >= ``MIN_BLOB_PIXELS`` or a (possibly
   dashed) streak >= ``MIN_STREAK_LENGTH`` px long, if >= ``MIN_BLOB_PIXELS`` object pixels lie
   more than a pixel outside the fitted template (a spur or a streak attached to an object) or
   off the background -> object-colour segment by > ``OFF_COLOUR_DISTANCE`` (a blotch of another
   colour), if an object has no recognisable shape, or if the background is uneven (95th percentile of its distance to the estimate above
   ``EVEN_DISTANCE``). Pixel thresholds are absolute (the same at 32, 64 and 128 px).

Distance thresholds follow from the palette geometry (the closest object/background pair is 115
apart, the closest two object colours 103). Blurred templates and colour matching that allows
mixing with the background (thin or soft objects never reach full strength) were checked on
blurred, noisy renders, so imperfect generated images are judged by their geometry and hue.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
from PIL import Image
from scipy import ndimage

from pipelines.data.shapes import (
    ANCHORS,
    BACKGROUNDS,
    COLORS,
    REFERENCE_RESOLUTION,
    SHAPE_AREA,
    SHAPE_CENTROID_OFFSET,
    SHAPES,
    SIZE_EXTENT,
    SIZES,
    shape_coverage,
)

OBJECT_DISTANCE = 48.0  # foreground mask; about 0.4 coverage for the closest object/background pair
OFF_COLOUR_DISTANCE = 40.0  # from the background -> object-colour segment, inside an object
STRAY_DISTANCE = 32.0  # off-object pixels this far from the background are fragments
EVEN_DISTANCE = 24.0
COLOR_MAX_DISTANCE = 80.0
MIN_COLOR_STRENGTH = 0.6
BACKGROUND_MAX_DISTANCE = 60.0
MIN_BLOB_PIXELS = 3
MIN_STREAK_LENGTH = 6
SIZE_THRESHOLD = float(np.sqrt(SIZE_EXTENT["small"] * SIZE_EXTENT["large"]))  # at 32 px
# Templates are also compared blurred (sigma in px at 32), so a soft but well-formed generated
# shape is still named by its geometry; a sharp render matches its unblurred template best.
TEMPLATE_BLURS = (0.0, 0.5, 0.8)
# Above this L1 template distance (per unit of area) no shape is named. Sharp renders of the
# right shape score < 0.1 and the best wrong template >= 0.13 more; renders blurred with
# sigma 1 px (at 32) score < 0.2, sigma 1.3 px up to 0.35 (a blob rather than a shape).
SHAPE_MAX_ERROR = 0.25
ATTRIBUTES = ("color", "shape", "size", "position", "background")
_EIGHT_CONNECTED = np.ones((3, 3), bool)
_PALETTE = np.array(list(COLORS.values()), np.float32)  # (8, 3)
_BACKGROUND_PALETTE = np.array(list(BACKGROUNDS.values()), np.float32)  # (3, 3)


def _as_array(image) -> np.ndarray:
    """PIL image or uint8 (H, W, 3) array -> float32 (H, W, 3) in [0, 255]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"image has shape {array.shape} and dtype {array.dtype}; pass a PIL image or a uint8 "
            "(H, W, 3) array (convert [-1, 1] tensors with ((x + 1) * 127.5).round().clamp(0, 255))"
        )
    if min(array.shape[:2]) < 16:
        raise ValueError(f"image of size {array.shape[:2]} is too small; the judge needs >= 16 px")
    return array.astype(np.float32)


def _nearest(colour: np.ndarray, palette: np.ndarray, names, max_distance: float):
    distances = np.linalg.norm(palette - colour, axis=1)  # (P,)
    best = int(np.argmin(distances))
    return list(names)[best] if distances[best] <= max_distance else None


def _object_colour_name(colour: np.ndarray, background: np.ndarray):
    """Nearest palette colour, allowing it to be mixed with the background down to
    ``MIN_COLOR_STRENGTH``: the core of a thin or soft object never reaches full strength."""
    direction = _PALETTE - background  # (8, 3)
    strength = ((colour - background) @ direction.T) / (direction * direction).sum(axis=1)  # (8,)
    strength = np.clip(strength, MIN_COLOR_STRENGTH, 1.0)
    mixed = background + strength[:, None] * direction  # (8, 3) closest mix of each colour
    distances = np.linalg.norm(mixed - colour, axis=1)  # (8,)
    best = int(np.argmin(distances))
    return list(COLORS)[best] if distances[best] <= COLOR_MAX_DISTANCE else None


def estimate_background(image: np.ndarray) -> np.ndarray:
    """Per-channel median of the 1-pixel border of float (H, W, 3); returns (3,)."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])  # (P, 3)
    return np.median(border, axis=0)


@functools.lru_cache(maxsize=512)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) Gaussian blur operator along one axis; mass leaving the window is dropped."""
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]  # (size, size)
    radius = np.arange(-int(4 * sigma) - 1, int(4 * sigma) + 2)
    total = np.exp(-0.5 * (radius / sigma) ** 2).sum()
    return (np.exp(-0.5 * (offsets / sigma) ** 2) / total).astype(np.float32)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (h, w) as two small matrix products (faster than a filter here)."""
    height, width = image.shape
    return _blur_matrix(height, sigma) @ image @ _blur_matrix(width, sigma).T  # (h, w)


def _fit_shape(alpha: np.ndarray, window, scale: float) -> dict:
    """Nearest template to coverage ``alpha`` (h, w) over ``window``; each fitted by area/centroid."""
    x0, y0, width, height = window
    area = float(alpha.sum())
    ys, xs = np.mgrid[y0 : y0 + height, x0 : x0 + width] + 0.5  # (h, w) pixel centres
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    best = None
    for shape in SHAPES:
        extent = float(np.sqrt(area / SHAPE_AREA[shape]))
        center = (cx, cy - SHAPE_CENTROID_OFFSET[shape] * extent)
        sharp = shape_coverage(shape, center, extent, window)  # (h, w)
        for sigma in TEMPLATE_BLURS:
            template = _blur(sharp, sigma * scale) if sigma else sharp
            error = float(np.abs(alpha - template).sum() / area)
            if best is None or error < best["error"]:
                best = {"shape": shape, "error": error, "extent": extent, "center": center}
                best["template"] = template
    return best


def _position_name(center, image_size) -> str:
    height, width = image_size
    names = list(ANCHORS)
    anchors = np.array([ANCHORS[n] for n in names]) / REFERENCE_RESOLUTION  # (5, 2) fractions
    point = np.array([center[0] / width, center[1] / height])
    return names[int(np.argmin(np.linalg.norm(anchors - point, axis=1)))]


def _mix_fraction(pixels: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Fraction in [0, 1] of ``colour`` in each pixel (..., 3): projection on background -> colour."""
    direction = colour - background  # (3,)
    fraction = ((pixels - background) @ direction) / max(float(direction @ direction), 1.0)
    return np.clip(fraction, 0.0, 1.0)  # (...,)


def _measure_object(image, distance, background, mask, others) -> dict:
    """Colour, shape, size, position and off-template pixel count of one component ``mask``."""
    height, width = mask.shape
    scale = min(height, width) / REFERENCE_RESOLUTION
    core_distances = distance[mask]
    core = core_distances >= 0.85 * np.percentile(core_distances, 95)
    colour = np.median(image[mask][core], axis=0)  # (3,)
    rows, cols = np.nonzero(mask)
    x0, y0 = max(int(cols.min()) - 2, 0), max(int(rows.min()) - 2, 0)  # 2 px margin for soft edges
    w, h = min(int(cols.max()) + 3, width) - x0, min(int(rows.max()) + 3, height) - y0
    grow = max(1, round(scale))
    region = ndimage.binary_dilation(mask, _EIGHT_CONNECTED, iterations=grow) & ~others
    color_name = _object_colour_name(colour, background)
    # Coverage against the named palette colour keeps the mass of a soft (blurred) object right.
    reference = np.asarray(COLORS[color_name], np.float32) if color_name else colour
    alpha = _mix_fraction(image, background, reference) * region  # (H, W)
    # Antialiased or blurred pixels lie on the background -> core-colour segment; a blotch of
    # another colour inside the object lies off it.
    along = _mix_fraction(image[mask], background, colour)  # (K,)
    on_segment = background + along[:, None] * (colour - background)  # (K, 3)
    off_colour = np.linalg.norm(image[mask] - on_segment, axis=1) > OFF_COLOUR_DISTANCE  # (K,)
    fit = _fit_shape(alpha[y0 : y0 + h, x0 : x0 + w], (x0, y0, w, h), scale)
    allowed = np.zeros_like(mask)
    allowed[y0 : y0 + h, x0 : x0 + w] = fit["template"] > 0.25
    allowed = ndimage.binary_dilation(allowed, _EIGHT_CONNECTED)
    return {
        "color": color_name,
        "shape": fit["shape"] if fit["error"] <= SHAPE_MAX_ERROR else None,
        "size": "small" if fit["extent"] < SIZE_THRESHOLD * scale else "large",
        "position": _position_name(fit["center"], mask.shape),
        "off_template_pixels": int((mask & ~allowed).sum()),
        "off_colour_pixels": int(off_colour.sum()),
        "rgb": colour.round(1).tolist(),
        "extent": round(fit["extent"] / scale, 2),
        "template_error": round(fit["error"], 4),
    }


def _asked_objects(attributes: dict) -> list[dict]:
    objects = [{key: attributes.get(key) for key in ATTRIBUTES[:4]}]
    if attributes.get("second_shape") is not None or attributes.get("second_color") is not None:
        objects.append({key: attributes.get(f"second_{key}") for key in ATTRIBUTES[:4]})
    return objects


def _match(measured: list[dict], asked: list[dict]) -> list[dict | None]:
    """Order measured objects like the asked ones, minimising the asked-position mismatches."""
    if len(asked) == 1 or len(measured) < 2:
        return (measured + [None] * len(asked))[: len(asked)]

    def cost(order):
        return sum(m["position"] != a["position"] for m, a in zip(order, asked))

    return list(min(itertools.permutations(measured[:2]), key=cost))


def _fragments(mask: np.ndarray) -> tuple[int, int]:
    """(largest blob size, longest streak extent) of a fragment mask; dashes one pixel apart join."""
    labels, count = ndimage.label(mask, _EIGHT_CONNECTED)
    largest = int(np.bincount(labels.ravel())[1:].max()) if count else 0
    joined, joined_count = ndimage.label(ndimage.binary_dilation(mask, _EIGHT_CONNECTED))
    longest = 0
    for box in ndimage.find_objects(joined * mask) if joined_count else []:
        if box is not None:
            longest = max(longest, box[0].stop - box[0].start, box[1].stop - box[1].start)
    return largest, longest


def _clean(distance, labels, sizes, object_labels, measured, num_asked) -> tuple[bool, dict]:
    """Whether the image holds exactly the asked objects, without fragments, on an even background."""
    height, width = distance.shape
    objects = np.isin(labels, object_labels)
    grow = max(1, round(min(height, width) / REFERENCE_RESOLUTION))
    near_objects = ndimage.binary_dilation(objects, _EIGHT_CONNECTED, iterations=grow)
    extra = [
        int(s) for i, s in enumerate(sizes, 1) if i not in object_labels and s >= MIN_BLOB_PIXELS
    ]
    blob, streak = _fragments((distance > STRAY_DISTANCE) & ~near_objects)
    off_background = distance[~near_objects]
    spread = float(np.percentile(off_background, 95)) if off_background.size else 0.0
    report = {
        "num_objects": len(object_labels),
        "extra_components": extra,
        "largest_fragment_pixels": blob,
        "longest_streak_pixels": streak,
        "off_template_pixels": [m["off_template_pixels"] for m in measured],
        "off_colour_pixels": [m["off_colour_pixels"] for m in measured],
        "background_spread": round(spread, 2),
    }
    clean = (
        len(object_labels) == num_asked
        and not extra
        and blob < MIN_BLOB_PIXELS
        and streak < MIN_STREAK_LENGTH
        and all(m["off_template_pixels"] < MIN_BLOB_PIXELS for m in measured)
        and all(m["off_colour_pixels"] < MIN_BLOB_PIXELS for m in measured)
        and all(m["shape"] is not None for m in measured)  # an unrecognisable blob is no object
        and spread <= EVEN_DISTANCE
    )
    return clean, report


def judge_image(image, attributes: dict) -> dict:
    """Judge one image (PIL or uint8 (H, W, 3)) against the asked ``attributes``.

    ``attributes`` uses the Shapes record keys (shape, color, size, position, background and
    optionally second_*); extra keys such as image or caption are ignored, and a key that is
    missing or None is not judged (its result is None). Returns booleans for color, shape, size,
    position (true only when every asked object matches), background and clean, plus
    ``all_correct`` (every asked attribute and clean) and ``predicted`` (the measurements).
    """
    pixels = _as_array(image)
    background = estimate_background(pixels)
    distance = np.linalg.norm(pixels - background, axis=2)  # (H, W)
    labels, count = ndimage.label(distance > OBJECT_DISTANCE, _EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]  # (count,)
    asked = _asked_objects(attributes)
    by_size = [int(i) + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= MIN_BLOB_PIXELS]
    object_labels = by_size[: len(asked)]
    measured = []
    for label in object_labels:
        others = np.isin(labels, [other for other in object_labels if other != label])
        measured.append(_measure_object(pixels, distance, background, labels == label, others))
    clean, report = _clean(distance, labels, sizes, object_labels, measured, len(asked))
    background_name = _nearest(
        background, _BACKGROUND_PALETTE, BACKGROUNDS, BACKGROUND_MAX_DISTANCE
    )
    matched = _match(measured, asked)
    result = {}
    for key in ATTRIBUTES[:4]:
        judged = [(m, a[key]) for m, a in zip(matched, asked) if a[key] is not None]
        result[key] = all(m is not None and m[key] == v for m, v in judged) if judged else None
    wanted = attributes.get("background")
    result["background"] = None if wanted is None else background_name == wanted
    result["clean"] = clean
    result["all_correct"] = clean and all(result[k] is not False for k in ATTRIBUTES)
    result["predicted"] = {"background": background_name, "objects": matched, **report}
    return result


def _summarize(results: list[dict]) -> dict:
    """Mean of each attribute (None where none was asked), clean, all_correct, and the count."""
    summary = {}
    for key in (*ATTRIBUTES, "clean", "all_correct"):
        values = [r[key] for r in results if r[key] is not None]
        summary[key] = float(np.mean(values)) if values else None
    summary["count"] = len(results)
    return summary


def judge_batch(images, attributes_list) -> dict:
    """Accuracy of each attribute, clean and all_correct over a batch, plus ``count``, and the
    same for each asked size of the first object under ``by_size`` (records that ask no size are
    left out; {} if none asks one). Small and large objects fail for different reasons, so the
    split says where a model fails. With two-object records a group's figures cover both objects.

    ``images``: a sequence of PIL images / uint8 (H, W, 3) arrays, or a uint8 (N, H, W, 3) array.
    Attributes that were not asked (None) are left out of that attribute's accuracy.
    """
    if len(images) != len(attributes_list):
        raise ValueError(
            f"got {len(images)} images but {len(attributes_list)} attribute records; pass one each"
        )
    if len(images) == 0:
        raise ValueError("images is empty; pass at least one image to judge")
    results = [judge_image(image, attrs) for image, attrs in zip(images, attributes_list)]
    return summarize_verdicts(results, attributes_list)


def summarize_verdicts(results: list[dict], attributes_list) -> dict:
    """`judge_batch`'s summary of `judge_image` verdicts already made, one per record (so an
    evaluation that picks among judged images need not judge them again)."""
    sizes = [attrs.get("size") for attrs in attributes_list]
    by_size = {
        size: _summarize([r for r, asked in zip(results, sizes) if asked == size])
        for size in SIZES
        if size in sizes
    }
    return {**_summarize(results), "by_size": by_size}


def describe_by_size(summary: dict) -> str:
    """'small 0.26 (shape 0.30), large 0.28 (shape 0.39)' from a `judge_batch` summary; '' when
    it has no size groups, 'n/a' for a figure no record asked for."""

    def rate(value) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return ", ".join(
        f"{size} {rate(group['all_correct'])} (shape {rate(group['shape'])})"
        for size, group in summary.get("by_size", {}).items()
    )


def judge_reconstructions(
    image_tokenizer, renders: np.ndarray, attributes_list, batch_size: int, device="cpu"
) -> dict:
    """`judge_batch` on an image tokenizer's encode -> decode of `renders`, uint8 (N, H, W, 3).

    `image_tokenizer` is any object with `encode` ((B, 3, H, W) in [-1, 1] on `device` -> codes)
    and `decode`. Reconstructions go through the pipeline's own `postprocess` and are resized to
    32 px (bicubic) when they are larger, exactly as generated images are judged. This is about
    what a prior that reproduced the encoder's codes exactly would draw."""
    import torch  # only this function needs torch; the judge itself is numpy

    from pipelines.output import postprocess

    images = []
    with torch.inference_mode():
        for chunk in torch.from_numpy(renders).split(batch_size):
            pixels = chunk.permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)  # (B,3,H,W)
            images += postprocess(image_tokenizer.decode(image_tokenizer.encode(pixels)), "pil")
    return judge_batch(at_judge_resolution(images), attributes_list)


def at_judge_resolution(images: list) -> list:
    """PIL images resized (bicubic) to the 32-pixel reference canvas when they are larger: the
    judge's thresholds are absolute, so Shapes at 64 or 128 px is judged at 32 px. Smaller
    images (16-31 px) are judged as they are, since the judge scales its geometry to the image:
    sharp 16 px renders are all judged correct natively, but 87% once upscaled to 32 px
    (bicubic ringing; 150 renders, seed 0)."""
    side = (REFERENCE_RESOLUTION, REFERENCE_RESOLUTION)
    return [
        image.resize(side, resample=Image.Resampling.BICUBIC)
        if max(image.size) > REFERENCE_RESOLUTION
        else image
        for image in images
    ]
