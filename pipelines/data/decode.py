"""Robust decoding of image files and caption bytes, and the report of what was skipped.

`decode_image` turns bytes, a path or a PIL image into an upright RGB image or raises
`ImageDecodeError` with a `reason`; `DataReport` counts reasons and keeps the first few names.
The outcome of every kind of bad input is tabled in `pipelines/data/images.py`.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_EXAMPLES = 5
# Reasons an image is dropped; every reason in DataReport.counts not listed here keeps the
# image (missing_caption, empty_caption, non_utf8_caption).
SKIP_REASONS = ("empty_file", "not_an_image", "corrupt", "too_large", "too_small",
                "unsupported_mode", "missing_file", "bad_metadata_line", "bad_shard",
                "skipped_missing_caption")  # fmt: skip


@dataclass
class DataReport:
    """Counts of problems per reason, the first few names per reason, and totals.

    `scope` says what the counts cover: "global" (the whole dataset: a validation pass, or one
    already reduced across ranks) or "rank" (only this process's share, e.g. a stream).
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    num_valid: int = 0
    scope: str = "global"

    def add(self, reason: str, name: str) -> None:
        """Count one occurrence of `reason` for the item called `name`."""
        self.counts[reason] += 1
        names = self.examples.setdefault(reason, [])
        if len(names) < MAX_EXAMPLES:
            names.append(str(name))

    @property
    def num_skipped(self) -> int:
        """Items dropped (the sum of the SKIP_REASONS counts)."""
        return sum(self.counts[reason] for reason in SKIP_REASONS)

    def merge(self, other: DataReport) -> None:
        """Add `other`'s counts and examples into this report."""
        self.counts.update(other.counts)
        self.num_valid += other.num_valid
        for reason, names in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(names[: MAX_EXAMPLES - len(mine)])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (num_skipped is informative; from_dict ignores it)."""
        counts = dict(sorted(self.counts.items()))
        return {**vars(self), "counts": counts, "num_skipped": self.num_skipped}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataReport:
        """Inverse of `to_dict`."""
        examples = {key: list(names) for key, names in values["examples"].items()}
        return cls(Counter(values["counts"]), examples, values["num_valid"], values["scope"])

    def summary(self) -> str:
        """One line: valid count, then `reason=count (first names)` for each reason."""
        parts = [f"{self.num_valid} valid"]
        for reason, count in sorted(self.counts.items()):
            names = ", ".join(self.examples.get(reason, []))
            parts.append(f"{reason}={count} (e.g. {names})")
        return "; ".join(parts)

    def warn(self, source: str) -> None:
        """Emit one UserWarning naming the first few problem items, if there were any."""
        if self.counts:
            warnings.warn(f"data source {source}: {self.summary()}", UserWarning, stacklevel=3)


def reduce_report(report: DataReport) -> DataReport:
    """Sum a per-rank report over all torch.distributed ranks; every rank must call it.

    A "global" report (already covering the whole dataset) is returned unchanged, so calling
    this twice, or on a map-style dataset's report, never double counts.
    """
    if report.scope == "global" or not (dist.is_available() and dist.is_initialized()):
        return report
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report.to_dict())
    total = DataReport(scope="global")
    for values in gathered:
        total.merge(DataReport.from_dict(values))
    return total


def decode_caption_bytes(data: bytes) -> tuple[str, bool]:
    """UTF-8 decode; invalid bytes become U+FFFD. Returns (text, had_invalid_bytes)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


DEFAULT_MAX_PIXELS = 40_000_000  # below PIL's own warning level (89.5 MP), e.g. 8000x5000
DEFAULT_MIN_SIZE = 8
WHITE = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, KeyError, IndexError, TypeError,
                  struct.error, zlib.error)  # fmt: skip


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is a `DataReport` reason such as "corrupt"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings: background RGB for transparency, pixel limit, minimum side."""

    background: tuple[int, int, int] = WHITE
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_size: int = DEFAULT_MIN_SIZE


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open with PIL's bomb warning turned into a refusal (our default limit is lower).

    A caller who sets max_pixels above PIL's warning level has decided the limit: then the
    warning is redundant and ignored; our own check in `decode_image` still applies.
    """
    with warnings.catch_warnings():
        action = "error" if max_pixels <= Image.MAX_IMAGE_PIXELS else "ignore"
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise ImageDecodeError("too_large", f"decompression bomb refused: {error}") from error
        except UnidentifiedImageError as error:
            raise ImageDecodeError("not_an_image", "not a readable image format") from error
        except _DECODE_ERRORS as error:
            raise ImageDecodeError("corrupt", f"cannot open: {error}") from error


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """An RGB image: alpha composited onto `background`, 16-bit scaled by 1/257 (not clipped)."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image)  # (H, W) uint16 or int32
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageDecodeError("unsupported_mode", "32-bit integer image outside 0..65535")
        gray = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)  # (H, W)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        raise ImageDecodeError("unsupported_mode", "floating-point image (mode F)")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        base = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(base, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def decode_image(
    source: bytes | str | os.PathLike | Image.Image | None,
    *,
    background: tuple[int, int, int] = WHITE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> Image.Image:
    """Decode bytes, a path or a PIL image into an upright RGB PIL image, or raise.

    Raises:
        ImageDecodeError: with `.reason` one of empty_file, missing_file (also a path that
            exists but cannot be read: a folder, no permission, an I/O error), not_an_image,
            corrupt, too_large (width*height > max_pixels, checked before decoding pixels),
            too_small (shorter side < min_size) or unsupported_mode.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        if source is None:
            raise ImageDecodeError("missing_file", "no image in this row")
        if isinstance(source, (str, os.PathLike)):
            try:
                source = Path(source).read_bytes()
            except FileNotFoundError as error:
                raise ImageDecodeError("missing_file", f"{source} not found") from error
            except OSError as error:  # a folder, no permission, an I/O error: unreadable
                raise ImageDecodeError(
                    "missing_file", f"{source} cannot be read: {error}"
                ) from error
        if len(source) == 0:
            raise ImageDecodeError("empty_file", "zero-byte file")
        image = _open(source, max_pixels)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError("too_large", f"{width}x{height} exceeds max_pixels={max_pixels}")
    if min(width, height) < min_size:
        raise ImageDecodeError("too_small", f"{width}x{height} is below min_size={min_size}")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image, background)
    except ImageDecodeError:
        raise
    except _DECODE_ERRORS as error:
        raise ImageDecodeError("corrupt", f"cannot decode: {error}") from error
