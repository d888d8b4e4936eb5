"""Shapes: a deterministic, seeded, download-free dataset of captioned synthetic images.

Each image shows one object (optionally two) described by five attributes:

- shape: circle, square, triangle, diamond, cross, ring
- color: red, orange, yellow, green, cyan, blue, purple, pink (well separated in RGB)
- size: small (bounding box 6.25-6.75 px at 32 px, so at most 8 touched pixels), large (11.5-12.5 px)
- position: top left, top right, bottom left, bottom right, center
- background: black, white, gray (each far from every object colour)

Everything is defined on a 32-pixel canvas and scales linearly with the resolution (32, 64, 128).
Objects are rendered with 4x4 supersampling (antialiasing), with small seeded jitter of their
position (+-0.75 px at 32) and extent (+-0.25 px small, +-0.5 px large). A second object, when
present, sits in a different corner: two-object scenes use the four corners only, and any object
stays at least 1 px inside its quadrant, so two objects never touch.

Compositional hold-out: the (colour, shape) pairs in ``HELD_OUT`` never appear in the train split,
neither as first nor as second object:

    (red, ring), (orange, diamond), (yellow, square), (green, circle), (blue, triangle),
    (purple, cross)

They cover all six shapes and six of the eight colours, each of which is seen in train with the
other five shapes. Validation and test draw a held-out pair for the first object with probability
``held_out_fraction`` (default 0.25) so generalisation to unseen pairs can be measured.

Splits are made by seed: the random stream of a split is seeded by ``(seed, split index)``.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import datasets
import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS = {
    "red": (215, 25, 30),
    "orange": (245, 130, 0),
    "yellow": (245, 225, 40),
    "green": (30, 165, 45),
    "cyan": (0, 205, 225),
    "blue": (35, 65, 225),
    "purple": (135, 35, 195),
    "pink": (250, 120, 200),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
CORNERS = POSITIONS[:4]
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
HELD_OUT = (
    ("red", "ring"),
    ("orange", "diamond"),
    ("yellow", "square"),
    ("green", "circle"),
    ("blue", "triangle"),
    ("purple", "cross"),
)
SPLITS = ("train", "validation", "test")

# Geometry on the 32-pixel reference canvas; multiplied by resolution / 32.
REFERENCE_RESOLUTION = 32
SIZE_EXTENT = {"small": 6.5, "large": 12.0}  # side of the object's bounding box
SIZE_JITTER = {"small": 0.25, "large": 0.5}
POSITION_JITTER = 0.75  # with the large extent, objects stay 1 px inside their quadrant
ANCHORS = {  # bounding-box centre (x, y)
    "top left": (8.0, 8.0),
    "top right": (24.0, 8.0),
    "bottom left": (8.0, 24.0),
    "bottom right": (24.0, 24.0),
    "center": (16.0, 16.0),
}
RING_INNER = 0.45  # inner / outer diameter; keeps the hole >= 2.8 px at small size
CROSS_ARM = 1.0 / 3.0  # arm thickness / extent
# Area of each shape as a fraction of its bounding box, and the downward offset of its area
# centroid from the box centre, in units of the extent (the judge fits templates with these).
SHAPE_AREA = {
    "circle": np.pi / 4,
    "square": 1.0,
    "triangle": 0.5,
    "diamond": 0.5,
    "cross": 2 * CROSS_ARM - CROSS_ARM**2,
    "ring": np.pi / 4 * (1 - RING_INNER**2),
}
SHAPE_CENTROID_OFFSET = {shape: 0.0 for shape in SHAPES} | {"triangle": 1.0 / 6.0}

_ALL_PAIRS = [(color, shape) for color in COLORS for shape in SHAPES]
_PAIR_INDEX = {
    "include": np.arange(len(_ALL_PAIRS)),
    "exclude": np.array([i for i, pair in enumerate(_ALL_PAIRS) if pair not in HELD_OUT]),
    "only": np.array([i for i, pair in enumerate(_ALL_PAIRS) if pair in HELD_OUT]),
}
_FIELDS = ("shape", "color", "size", "position")
SECOND_FIELDS = tuple(f"second_{field}" for field in _FIELDS)


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of points (u, v) inside ``shape`` whose bounding box is [-0.5, 0.5]^2 (v down)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 0.25
    if shape == "square":
        return (au <= 0.5) & (av <= 0.5)
    if shape == "triangle":  # apex at the top, base at the bottom
        return (v <= 0.5) & (au <= (v + 0.5) / 2)
    if shape == "diamond":
        return au + av <= 0.5
    if shape == "cross":
        arm = CROSS_ARM / 2
        return ((au <= arm) & (av <= 0.5)) | ((av <= arm) & (au <= 0.5))
    if shape == "ring":
        radius2 = u * u + v * v
        return (radius2 <= 0.25) & (radius2 >= 0.25 * RING_INNER**2)
    raise ValueError(f"shape={shape!r} is not a Shapes shape; use one of {SHAPES}")


def shape_coverage(
    shape: str,
    center: tuple[float, float],
    extent: float,
    window: tuple[int, int, int, int],
    supersample: int = 4,
) -> np.ndarray:
    """Antialiased coverage of a shape over a pixel window.

    ``center`` is the (x, y) bounding-box centre in pixel units (pixel i spans [i, i + 1)),
    ``extent`` the bounding-box side in pixels and ``window`` = (x0, y0, width, height).
    Returns float32 (height, width) in [0, 1]: the fraction of supersample points inside.
    """
    x0, y0, width, height = window
    offsets = (np.arange(supersample) + 0.5) / supersample  # (S,) sub-pixel sample positions
    xs = (x0 + np.arange(width)[:, None] + offsets).reshape(-1)  # (width * S,)
    ys = (y0 + np.arange(height)[:, None] + offsets).reshape(-1)  # (height * S,)
    u = (xs[None, :] - center[0]) / extent  # (1, width * S)
    v = (ys[:, None] - center[1]) / extent  # (height * S, 1)
    inside = _inside(shape, u, v).astype(np.float32)  # (height * S, width * S)
    inside = inside.reshape(height, supersample, width, supersample)  # (H, S, W, S)
    return inside.mean(axis=(1, 3))  # (height, width)


def object_window(center, extent, resolution: int, margin: int = 1) -> tuple[int, int, int, int]:
    """Pixel window (x0, y0, width, height) covering a bounding box plus ``margin``, clipped."""
    half = extent / 2
    x0 = max(int(np.floor(center[0] - half)) - margin, 0)
    y0 = max(int(np.floor(center[1] - half)) - margin, 0)
    x1 = min(int(np.ceil(center[0] + half)) + margin, resolution)
    y1 = min(int(np.ceil(center[1] + half)) + margin, resolution)
    return x0, y0, x1 - x0, y1 - y0


def _objects(attributes: dict) -> list[dict]:
    """The one or two objects of a record as dicts with keys shape, color, size, position."""
    objects = [{field: attributes.get(field) for field in _FIELDS}]
    if attributes.get("second_shape") is not None:
        objects.append({field: attributes.get(f"second_{field}") for field in _FIELDS})
    return objects


def _validate(attributes: dict) -> None:
    allowed = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}
    checks = [(f, o[f], v) for o in _objects(attributes) for f, v in allowed.items()]
    for field, value, values in [
        *checks,
        ("background", attributes.get("background"), BACKGROUNDS),
    ]:
        if value not in values:
            raise ValueError(f"{field}={value!r} is not valid; use one of {tuple(values)}")


def render(
    attributes: dict,
    resolution: int = 32,
    rng: np.random.Generator | None = None,
    supersample: int = 4,
) -> np.ndarray:
    """Render a record's objects; returns uint8 (resolution, resolution, 3).

    ``attributes`` holds shape, color, size, position, background and optionally the
    ``second_*`` fields. With ``rng=None`` objects sit exactly at their nominal place and size;
    with a generator, position and extent get the documented jitter.
    """
    _validate(attributes)
    if resolution < 16:
        raise ValueError(f"resolution={resolution} is too small; use 32, 64 or 128")
    scale = resolution / REFERENCE_RESOLUTION
    canvas = np.empty((resolution, resolution, 3), np.float32)  # (H, W, 3)
    canvas[:] = BACKGROUNDS[attributes["background"]]
    for obj in _objects(attributes):
        jitter = np.zeros(3) if rng is None else rng.uniform(-1.0, 1.0, size=3)
        center = (np.asarray(ANCHORS[obj["position"]]) + POSITION_JITTER * jitter[:2]) * scale
        extent = (SIZE_EXTENT[obj["size"]] + SIZE_JITTER[obj["size"]] * jitter[2]) * scale
        x0, y0, width, height = window = object_window(center, extent, resolution)
        coverage = shape_coverage(obj["shape"], center, extent, window, supersample)[..., None]
        region = canvas[y0 : y0 + height, x0 : x0 + width]  # (h, w, 3) view
        region[:] = region * (1 - coverage) + np.asarray(COLORS[obj["color"]]) * coverage
    return np.rint(canvas).clip(0, 255).astype(np.uint8)


def _draw_pairs(rng: np.random.Generator, num_samples: int, held_out: str) -> np.ndarray:
    if held_out not in _PAIR_INDEX:
        raise ValueError(f"held_out={held_out!r} is not valid; use 'exclude', 'include' or 'only'")
    return _PAIR_INDEX[held_out][rng.integers(len(_PAIR_INDEX[held_out]), size=num_samples)]


def sample_attribute_batch(
    rng: np.random.Generator,
    num_samples: int,
    held_out: str = "exclude",
    second_object_prob: float = 0.0,
) -> list[dict]:
    """Draw ``num_samples`` attribute records (vectorised).

    ``held_out``: "exclude" never uses a HELD_OUT pair, "only" makes every first object a
    HELD_OUT pair, "include" draws uniformly over all 48 pairs. The second object (present with
    ``second_object_prob``) never uses a held-out pair under "exclude" and is drawn from all pairs
    otherwise; two-object scenes use two different corners.
    """
    if not 0.0 <= second_object_prob <= 1.0:
        raise ValueError(f"second_object_prob={second_object_prob} must be in [0, 1]")
    first = _draw_pairs(rng, num_samples, held_out)
    second = _draw_pairs(rng, num_samples, "exclude" if held_out == "exclude" else "include")
    has_second = rng.random(num_samples) < second_object_prob
    sizes = rng.integers(len(SIZES), size=(num_samples, 2))
    backgrounds = rng.integers(len(BACKGROUNDS), size=num_samples)
    single_positions = rng.integers(len(POSITIONS), size=num_samples)
    corner_pairs = np.argsort(rng.random((num_samples, len(CORNERS))), axis=1)[:, :2]  # distinct
    records = []
    for i in range(num_samples):
        color, shape = _ALL_PAIRS[first[i]]
        record = {"shape": shape, "color": color, "size": SIZES[sizes[i, 0]]}
        record["position"] = (
            CORNERS[corner_pairs[i, 0]] if has_second[i] else POSITIONS[single_positions[i]]
        )
        record["background"] = tuple(BACKGROUNDS)[backgrounds[i]]
        record |= dict.fromkeys(SECOND_FIELDS)
        if has_second[i]:
            record["second_color"], record["second_shape"] = _ALL_PAIRS[second[i]]
            record["second_size"] = SIZES[sizes[i, 1]]
            record["second_position"] = CORNERS[corner_pairs[i, 1]]
        records.append(record)
    return records


def sample_attributes(
    rng: np.random.Generator, held_out: str = "exclude", second_object_prob: float = 0.0
) -> dict:
    """Draw one attribute record; see ``sample_attribute_batch``."""
    return sample_attribute_batch(rng, 1, held_out, second_object_prob)[0]


def is_held_out(attributes: dict) -> bool:
    """True when the first or the second object is a HELD_OUT (colour, shape) pair."""
    return any((obj["color"], obj["shape"]) in HELD_OUT for obj in _objects(attributes))


# Caption vocabulary: synonyms make the model read words rather than memorise one string.
SYNONYMS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus"),
    "ring": ("ring", "donut"),
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
    "top left": ("top left", "upper left", "top-left"),
    "top right": ("top right", "upper right", "top-right"),
    "bottom left": ("bottom left", "lower left", "bottom-left"),
    "bottom right": ("bottom right", "lower right", "bottom-right"),
    "center": ("center", "middle"),
    "purple": ("purple", "violet"),
    "gray": ("gray", "grey"),
}
OBJECT_TEMPLATES = (
    "a {size} {color} {shape} in the {position}",
    "a {size} {color} {shape} at the {position}",
    "in the {position} a {size} {color} {shape}",  # fronted: only where a clause starts
)
CAPTION_TEMPLATES = (  # (template, whether the fronted object template reads well in it)
    ("{objects} on a {background} background", True),
    ("a {background} background with {objects}", False),
    ("there is {objects} on a {background} background", False),
    ("{background} background, {objects}", True),
)


def _word(rng: np.random.Generator, value: str) -> str:
    options = SYNONYMS.get(value, (value,))
    return options[rng.integers(len(options))]


def caption_for(attributes: dict, rng: np.random.Generator) -> str:
    """A caption naming every attribute of every object, from a random template and synonyms."""
    _validate(attributes)
    template, fronted_ok = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    num_object_templates = len(OBJECT_TEMPLATES) if fronted_ok else len(OBJECT_TEMPLATES) - 1
    phrases = []
    for obj in _objects(attributes):
        words = {field: _word(rng, obj[field]) for field in _FIELDS}
        phrases.append(OBJECT_TEMPLATES[rng.integers(num_object_templates)].format(**words))
    return template.format(
        objects=" and ".join(phrases), background=_word(rng, attributes["background"])
    )


@dataclass
class ShapesConfig:
    """Generation settings of a Shapes dataset (saved as JSON beside derived artifacts)."""

    resolution: int = 32
    second_object_prob: float = 0.0
    held_out_fraction: float | None = None  # None: 0 for train, 0.25 for validation and test
    supersample: int = 4

    def __post_init__(self):
        if self.resolution < 16:
            raise ValueError(f"resolution={self.resolution} must be >= 16 (use 32, 64 or 128)")
        if not 0.0 <= self.second_object_prob <= 1.0:
            raise ValueError(f"second_object_prob={self.second_object_prob} must be in [0, 1]")
        if self.held_out_fraction is not None and not 0.0 <= self.held_out_fraction <= 1.0:
            raise ValueError(f"held_out_fraction={self.held_out_fraction} must be in [0, 1]")
        if self.supersample < 1:
            raise ValueError(f"supersample={self.supersample} must be >= 1")

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (the keyword arguments of `make_shapes_dataset`)."""
        return asdict(self)

    def dataset(self, split: str, num_samples: int, seed: int = 0) -> datasets.Dataset:
        """`num_samples` rows of `split` ("train", "validation" or "test") rendered with these
        settings: PIL RGB images of resolution x resolution, captions and attributes."""
        return make_shapes_dataset(split, num_samples, seed=seed, **self.to_dict())


def _features() -> datasets.Features:
    columns = {"image": datasets.Image(), "caption": datasets.Value("string")}
    for name in (*_FIELDS, "background", *SECOND_FIELDS):
        columns[name] = datasets.Value("string")
    columns["held_out"] = datasets.Value("bool")
    return datasets.Features(columns)


def _png_bytes(image: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def _split_records(split: str, num_samples: int, seed: int, config: ShapesConfig):
    """(attribute records, generator for rendering) of one split, seeded by (seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; use one of {SPLITS}")
    if num_samples < 0:
        raise ValueError(f"num_samples={num_samples} must be >= 0")
    fraction = config.held_out_fraction
    if fraction is None:
        fraction = 0.0 if split == "train" else 0.25
    if split == "train" and fraction > 0:
        raise ValueError(f"held_out_fraction={fraction} with split 'train'; use 0 or None")
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split)]))
    num_held_out = int(rng.binomial(num_samples, fraction)) if fraction > 0 else 0
    records = sample_attribute_batch(rng, num_held_out, "only", config.second_object_prob)
    records += sample_attribute_batch(
        rng, num_samples - num_held_out, "exclude", config.second_object_prob
    )
    order = rng.permutation(num_samples)  # interleave held-out records with the rest
    return [records[i] for i in order], rng


def make_shapes_dataset(
    split: str = "train",
    num_samples: int = 1000,
    resolution: int = 32,
    seed: int = 0,
    second_object_prob: float = 0.0,
    held_out_fraction: float | None = None,
    supersample: int = 4,
) -> datasets.Dataset:
    """Build a Shapes split as an in-memory ``datasets.Dataset``.

    Columns: ``image`` (PIL RGB, resolution x resolution), ``caption``, the attributes
    ``shape, color, size, position, background``, ``second_shape, second_color, second_size,
    second_position`` (None without a second object) and ``held_out`` (any HELD_OUT pair).
    Same arguments give the same dataset; the three splits use independent random streams.
    """
    config = ShapesConfig(resolution, second_object_prob, held_out_fraction, supersample)
    records, rng = _split_records(split, num_samples, seed, config)
    columns = {name: [] for name in _features()}
    for record in records:
        image = render(record, config.resolution, rng, config.supersample)
        columns["image"].append(_png_bytes(image))
        columns["caption"].append(caption_for(record, rng))
        for name, value in record.items():
            columns[name].append(value)
        columns["held_out"].append(is_held_out(record))
    return datasets.Dataset.from_dict(columns, features=_features())
