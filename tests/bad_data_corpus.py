"""A corpus of bad and awkward image-caption files, generated at test time, with expected outcomes.

`build_bad_data_corpus(root)` writes an image folder (`.txt` sidecars, plus a `meta/` subfolder
with a `metadata.jsonl`); `build_bad_data_tar(path, corpus)` packs its top-level cases into a
WebDataset shard. Each returned `BadDataCorpus` knows the exact counts per reason that the data
layer must report (`expected_counts`), how many items are valid, and, per case, the caption and
pixel values the decoded image must have. Other test files (training-script reliability tests)
import it:  `from bad_data_corpus import build_bad_data_corpus`.

| case                      | outcome                  | checked                                |
|---------------------------|--------------------------|----------------------------------------|
| zero-byte .png / .jpg     | empty_file               | count                                  |
| truncated .png / .jpg     | corrupt                  | count                                  |
| corrupt PNG data, JPEG DHT| corrupt                  | count                                  |
| JPEG SOF damaged          | not_an_image             | count                                  |
| text file named .png      | not_an_image             | count                                  |
| JPEG scan bytes zeroed    | used (undetectable)      | size                                   |
| 1x1 image                 | too_small                | count                                  |
| 12x10 (smaller than crop) | used, resized up         | tensor (3, 16, 16), colour             |
| 100000^2, 10000^2, 50 MP headers | too_large         | count, refused before decoding         |
| CMYK (0,255,255,0) TIFF/JPEG | used                  | red (255,0,0)                          |
| 16-bit gray 0x8080        | used                     | 128 in every channel                   |
| 16-bit RGB (0x8080,0,0xffff) | used                  | (128, 0, 255)                          |
| palette with transparency | used                     | transparent half white, other red      |
| RGBA transparent red      | used                     | white; half-alpha black -> 127         |
| LA transparent            | used                     | white                                  |
| grayscale L=100           | used                     | (100, 100, 100)                        |
| EXIF orientation 6        | used                     | 20x10 -> 10x20, red on top             |
| missing / empty caption   | used, ""                 | missing_caption / empty_caption        |
| non-UTF-8 caption         | used, U+FFFD             | non_utf8_caption                       |
| 10,000 chars, emoji, CJK  | used unchanged           | exact caption                          |
| a/dup.png and b/dup.png   | both used                | both captions                          |
| metadata.jsonl lines      | bad JSON, non-string text, ../ path: bad_metadata_line; missing file: missing_file; null text: missing_caption; non-UTF-8: non_utf8_caption |
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CORPUS_RESOLUTION = 16  # the crop the corpus is designed around (the 12x10 case is smaller)
RED, WHITE = (255, 0, 0), (255, 255, 255)
LONG_CAPTION = "a" * 10_000


@dataclass
class CorpusCase:
    """One file: `outcome` is a skip reason or "used"; checks apply to the decoded RGB image."""

    name: str
    outcome: str
    caption: str | None = None  # expected caption when used
    caption_reason: str | None = None  # missing_caption / empty_caption / non_utf8_caption
    size: tuple[int, int] | None = None  # decoded (width, height)
    pixels: list[tuple[tuple[int, int], tuple[int, int, int], int]] = field(default_factory=list)


@dataclass
class BadDataCorpus:
    """Where the corpus is, its cases, and the metadata-line problems it contains."""

    root: Path
    cases: list[CorpusCase]
    metadata_problems: Counter = field(default_factory=Counter)

    @property
    def used(self) -> list[CorpusCase]:
        return [case for case in self.cases if case.outcome == "used"]

    @property
    def num_valid(self) -> int:
        return len(self.used)

    @property
    def expected_counts(self) -> Counter:
        """Exact DataReport.counts the data layer must produce."""
        counts = Counter(case.outcome for case in self.cases if case.outcome != "used")
        counts.update(case.caption_reason for case in self.used if case.caption_reason)
        counts.update(self.metadata_problems)
        return counts


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk (PIL cannot write 16-bit RGB or lie about its size)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))  # fmt: skip


def _noise(size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8))


def _broken_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected skip reason)."""
    png, jpeg = _encode(_noise(), "PNG"), _encode(_noise(), "JPEG", quality=90)
    bad_png = bytearray(png)
    start = bad_png.index(b"IDAT") + 8
    bad_png[start : start + 8] = bytes(byte ^ 0xFF for byte in bad_png[start : start + 8])
    bad_dht, bad_sof = bytearray(jpeg), bytearray(jpeg)
    dht = jpeg.index(b"\xff\xc4")
    bad_dht[dht + 5 : dht + 21] = b"\xff" * 16  # Huffman code counts that cannot be right
    bad_sof[jpeg.index(b"\xff\xc0") + 9] = 7  # seven colour components: not a JPEG PIL knows
    return {
        "zero_png.png": (b"", "empty_file"),
        "zero_jpg.jpg": (b"", "empty_file"),
        "truncated_png.png": (png[: len(png) // 2], "corrupt"),
        "truncated_jpg.jpg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "corrupt_data.png": (bytes(bad_png), "corrupt"),
        "corrupt_huffman.jpg": (bytes(bad_dht), "corrupt"),
        "corrupt_header.jpg": (bytes(bad_sof), "not_an_image"),
        "text.png": (b"this is a text file, not a PNG\n", "not_an_image"),
        "one_pixel.png": (_encode(Image.new("RGB", (1, 1), RED), "PNG"), "too_small"),
        "bomb_100000.png": (raw_png(100_000, 100_000, 8, 2, b""), "too_large"),
        "bomb_10000.png": (raw_png(10_000, 10_000, 8, 2, b""), "too_large"),
        "bomb_50mp.png": (raw_png(10_000, 5_000, 8, 2, b""), "too_large"),
    }


def _valid_images() -> list[tuple[str, bytes, CorpusCase]]:
    """(name, bytes, expected case) for images that must be used."""
    palette = Image.new("P", (16, 16))
    palette.putpalette([59, 136, 195, 255, 0, 0] + [0] * 762)  # index 0: keycap blue
    palette.paste(1, (8, 0, 16, 16))
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.paste((0, 0, 0, 128), (8, 0, 16, 16))
    rotated = Image.new("RGB", (20, 10), RED)
    rotated.paste((0, 0, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    gray16 = np.full((16, 16), 0x8080, np.uint16)
    rgb16 = b"".join(b"\x00" + struct.pack(">HHH", 0x8080, 0, 0xFFFF) * 16 for _ in range(16))
    damaged = bytearray(_encode(_noise(), "JPEG", quality=90))
    scan = damaged.index(b"\xff\xda")
    damaged[scan + 200 : scan + 240] = bytes(40)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    entries = [
        ("small.png", _encode(Image.new("RGB", (12, 10), (0, 255, 0)), "PNG"), (12, 10), [((5, 5), (0, 255, 0), 0)]),
        ("cmyk_tiff.tiff", _encode(cmyk, "TIFF"), (16, 16), [((3, 3), RED, 0)]),
        ("cmyk.jpg", _encode(cmyk, "JPEG", quality=95), (16, 16), [((8, 8), RED, 3)]),
        ("gray16.png", _encode(Image.fromarray(gray16), "PNG"), (16, 16), [((4, 4), (128,) * 3, 0)]),
        ("rgb16.png", raw_png(16, 16, 16, 2, rgb16), (16, 16), [((4, 4), (128, 0, 255), 0)]),
        ("palette_transparent.png", _encode(palette, "PNG", transparency=0), (16, 16),
         [((2, 2), WHITE, 0), ((12, 2), RED, 0)]),
        ("rgba_transparent_red.png", _encode(rgba, "PNG"), (16, 16),
         [((2, 2), WHITE, 0), ((12, 2), (127, 127, 127), 0)]),
        ("la_transparent.png", _encode(Image.new("LA", (16, 16), (0, 0)), "PNG"), (16, 16), [((2, 2), WHITE, 0)]),
        ("gray.png", _encode(Image.new("L", (16, 16), 100), "PNG"), (16, 16), [((2, 2), (100,) * 3, 0)]),
        ("exif_rotated.jpg", _encode(rotated, "JPEG", quality=95, exif=exif.tobytes()), (10, 20),
         [((5, 4), RED, 6), ((5, 15), (0, 0, 255), 6)]),
        ("damaged_scan.jpg", bytes(damaged), (32, 32), []),
    ]  # fmt: skip
    return [(name, data, CorpusCase(name, "used", size=size, pixels=pixels))
            for name, data, size, pixels in entries]  # fmt: skip


def _captions() -> dict[str, tuple[bytes | None, str, str | None]]:
    """name -> (sidecar bytes or None, expected caption, expected caption reason)."""
    return {
        "small.png": (None, "", "missing_caption"),
        "gray.png": (b"  \n", "", "empty_caption"),
        "cmyk.jpg": (b"caf\xe9 au lait", "caf\ufffd au lait", "non_utf8_caption"),
        "gray16.png": (LONG_CAPTION.encode(), LONG_CAPTION, None),
        "rgb16.png": ("🍎 a red apple 🍎".encode(), "🍎 a red apple 🍎", None),
        "palette_transparent.png": ("赤いリンゴ".encode(), "赤いリンゴ", None),
    }


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_bad_data_corpus(root: str | Path) -> BadDataCorpus:
    """Write the corpus under `root` and return what the data layer must make of it."""
    root = Path(root)
    cases = []
    for name, (data, reason) in _broken_files().items():
        _write(root / name, data)
        _write((root / name).with_suffix(".txt"), f"caption of {name}".encode())
        cases.append(CorpusCase(name, reason))
    captions = _captions()
    for name, data, case in _valid_images():
        _write(root / name, data)
        sidecar, case.caption, case.caption_reason = captions.get(
            name, (f"a picture called {name}".encode(), f"a picture called {name}", None)
        )
        if sidecar is not None:
            _write((root / name).with_suffix(".txt"), sidecar)
        cases.append(case)
    for folder, colour in (("a", RED), ("b", (0, 0, 255))):
        _write(root / folder / "dup.png", _encode(Image.new("RGB", (16, 16), colour), "PNG"))
        _write(root / folder / "dup.txt", f"duplicate name in folder {folder}".encode())
        cases.append(CorpusCase(f"{folder}/dup.png", "used", f"duplicate name in folder {folder}",
                                size=(16, 16), pixels=[((1, 1), colour, 0)]))  # fmt: skip
    cases += _write_metadata_folder(root / "meta")
    problems = Counter({"bad_metadata_line": 3, "missing_file": 1})
    return BadDataCorpus(root, cases, problems)


def _write_metadata_folder(folder: Path) -> list[CorpusCase]:
    green = _encode(Image.new("RGB", (16, 16), (0, 255, 0)), "PNG")
    for name in ("m1.png", "m3.png", "m4.png"):
        _write(folder / name, green)
    lines = [
        b'{"file_name": "m1.png", "text": "a caption from jsonl"}',
        b"{this line is not json",
        b'{"file_name": "missing.png", "text": "no such file"}',
        b'{"file_name": "m1.png", "text": 123}',
        b'{"file_name": "../../outside.png", "text": "outside the folder"}',
        b'{"file_name": "m3.png", "text": null}',
        b'{"file_name": "m4.png", "text": "na\xefve"}',
    ]
    _write(folder / "metadata.jsonl", b"\n".join(lines) + b"\n")
    pixel = [((1, 1), (0, 255, 0), 0)]
    return [
        CorpusCase("meta/m1.png", "used", "a caption from jsonl", None, (16, 16), pixel),
        CorpusCase("meta/m3.png", "used", "", "missing_caption", (16, 16), pixel),
        CorpusCase("meta/m4.png", "used", "na\ufffdve", "non_utf8_caption", (16, 16), pixel),
    ]


def build_bad_data_tar(path: str | Path, corpus: BadDataCorpus) -> BadDataCorpus:
    """Pack the corpus' non-metadata cases into one WebDataset shard at `path`."""
    path = Path(path)
    cases = [case for case in corpus.cases if not case.name.startswith("meta/")]
    with tarfile.open(path, "w") as tar:
        for case in cases:
            image = corpus.root / case.name
            key = case.name.rsplit(".", 1)[0]
            for member, file in (
                (f"{key}.{image.suffix[1:]}", image),
                (f"{key}.txt", image.with_suffix(".txt")),
            ):
                if file.is_file():
                    tar.add(file, arcname=member)
    # .tiff is not a WebDataset image extension: that sample has no image and is not a case.
    cases = [case for case in cases if not case.name.endswith(".tiff")]
    return BadDataCorpus(path, cases)
