"""Turn the emoji npm packages into a captioned image folder (about 12,000 images at 64 px).

    npm install --prefix ~/emoji emoji-datasource-twitter@16.0.0 emoji-datasource-google@16.0.0 \\
        openmoji@17.0.0
    python scripts/prepare_emoji.py --npm-dir ~/emoji --out data/emoji

Writes OUT/images/<style>/<hexcode>.png (RGB, alpha composited onto the background) and
OUT/metadata.jsonl (file_name, text, style, hexcode, group), a Hugging Face `imagefolder` that
`load_image_caption_dataset("data/emoji")` reads. Captions are OpenMoji's CLDR annotation plus
tags, joined by code point (FE0F ignored), e.g. "twitter style emoji of red apple, fruit";
without an OpenMoji entry the emoji-datasource name is used. OpenMoji SVGs are rasterized with
cairosvg if installed, else the system librsvg + cairo through ctypes; with neither, OpenMoji is
skipped with a warning. Licences (written to OUT/LICENSES.txt): Twemoji CC-BY 4.0, Noto Emoji
Apache-2.0, OpenMoji CC BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from common.help import HelpFormatter
from PIL import Image

from codegrid.io import atomic_directory
from pipelines.data.decode import ImageDecodeError, decode_image

PACKAGES = {"twitter": "emoji-datasource-twitter", "google": "emoji-datasource-google",
            "openmoji": "openmoji"}  # fmt: skip
NPM_COMMAND = ("npm install --prefix DIR emoji-datasource-twitter@16.0.0 "
               "emoji-datasource-google@16.0.0 openmoji@17.0.0")  # fmt: skip
SKIN_TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone",
              "1F3FD": "medium skin tone", "1F3FE": "medium-dark skin tone",
              "1F3FF": "dark skin tone"}  # fmt: skip
LICENSES = """Images in this folder come from:
- twitter: Twemoji (jdecked/twemoji fork, via emoji-datasource-twitter), CC-BY 4.0
- google: Noto Emoji (via emoji-datasource-google), Apache-2.0
- openmoji: OpenMoji (openmoji npm package), CC BY-SA 4.0 (share-alike, attribution)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see --help)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"Install the packages first: {NPM_COMMAND}",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("--npm-dir", required=True, help="the --prefix folder of the npm install (holding "
        "node_modules/), or a node_modules folder")  # fmt: skip
    add("--out", required=True, help="output image folder (must not exist unless --overwrite)")
    add("--styles", nargs="+", choices=sorted(PACKAGES), default=["twitter", "google", "openmoji"],
        help="emoji sets to include")  # fmt: skip
    add("--size", type=int, default=64, help="output side in pixels (the PNGs are 64 px; "
        "other sizes are resized with Lanczos, SVGs are rendered at this size)")  # fmt: skip
    add(
        "--background",
        default="white",
        help="colour under transparent pixels (PIL name or #rrggbb)",
    )
    add("--max-tags", type=int, default=3, help="OpenMoji tags appended to each caption")
    add("--no-skin-tones", action="store_true", help="leave out the skin-tone variants")
    add("--include-brands", action="store_true", help="keep OpenMoji's trademark logos "
        "(subgroup 'brand'), left out by default")  # fmt: skip
    add("--svg-rasterizer", choices=["auto", "cairosvg", "librsvg", "none"], default="auto",
        help="how to render OpenMoji SVGs; 'none' skips OpenMoji")  # fmt: skip
    add("--num-validation", type=int, default=0, help="if > 0: split into train/ and "
        "validation/ folders, drawing whole emoji (every style of one hexcode) into validation "
        "in a seeded order until it holds at least this many images")  # fmt: skip
    add("--seed", type=int, default=0, help="seed of the validation draw")
    add("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    if args.size <= 0 or args.max_tags < 0 or args.num_validation < 0:
        parser.error("--size must be positive, --max-tags and --num-validation non-negative")
    return args


class _RsvgRectangle(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in ("x", "y", "width", "height")]


class _GError(ctypes.Structure):
    _fields_ = [("domain", ctypes.c_uint32), ("code", ctypes.c_int), ("message", ctypes.c_char_p)]


def _load_library(names: tuple[str, ...]) -> ctypes.CDLL:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError(f"none of {names} can be loaded")


class LibrsvgRasterizer:
    """SVG -> RGB through the system's librsvg (>= 2.46) and cairo, called with ctypes."""

    def __init__(self):
        self.rsvg = _load_library(("librsvg-2.so.2", "librsvg-2.2.dylib", "librsvg-2-2.dll"))
        self.cairo = _load_library(("libcairo.so.2", "libcairo.2.dylib", "libcairo-2.dll"))
        self.glib = _load_library(
            ("libgobject-2.0.so.0", "libgobject-2.0.0.dylib", "libgobject-2.0-0.dll")
        )
        pointer = ctypes.c_void_p
        for library, name, restype, argtypes in (
            (self.rsvg, "rsvg_handle_new_from_file", pointer, [ctypes.c_char_p, pointer]),
            (self.rsvg, "rsvg_handle_render_document", ctypes.c_int, [pointer] * 4),
            (self.cairo, "cairo_image_surface_create", pointer, [ctypes.c_int] * 3),
            (self.cairo, "cairo_create", pointer, [pointer]),
            (self.cairo, "cairo_image_surface_get_data", pointer, [pointer]),
            (self.cairo, "cairo_image_surface_get_stride", ctypes.c_int, [pointer]),
            (self.cairo, "cairo_surface_flush", None, [pointer]),
            (self.cairo, "cairo_destroy", None, [pointer]),
            (self.cairo, "cairo_surface_destroy", None, [pointer]),
            (self.glib, "g_object_unref", None, [pointer]),
            (self.glib, "g_error_free", None, [pointer]),
        ):
            function = getattr(library, name)  # AttributeError: librsvg older than 2.46
            function.restype, function.argtypes = restype, argtypes

    def _raise(self, error: ctypes.c_void_p, path: Path) -> None:
        message = ctypes.cast(error, ctypes.POINTER(_GError)).contents.message if error else b"?"
        if error:
            self.glib.g_error_free(error)
        raise OSError(f"librsvg cannot render {path}: {message.decode(errors='replace')}")

    def __call__(self, path: Path, size: int, background: tuple[int, int, int]) -> Image.Image:
        error = ctypes.c_void_p()
        handle = self.rsvg.rsvg_handle_new_from_file(str(path).encode(), ctypes.byref(error))
        if not handle:
            self._raise(error, path)
        surface = self.cairo.cairo_image_surface_create(0, size, size)  # 0: CAIRO_FORMAT_ARGB32
        context = self.cairo.cairo_create(surface)
        try:
            viewport = _RsvgRectangle(0.0, 0.0, float(size), float(size))
            if not self.rsvg.rsvg_handle_render_document(
                handle, context, ctypes.byref(viewport), ctypes.byref(error)
            ):
                self._raise(error, path)
            self.cairo.cairo_surface_flush(surface)
            stride = self.cairo.cairo_image_surface_get_stride(surface)
            data = ctypes.string_at(self.cairo.cairo_image_surface_get_data(surface), stride * size)
        finally:
            self.glib.g_object_unref(handle)
            self.cairo.cairo_destroy(context)
            self.cairo.cairo_surface_destroy(surface)
        pixels = np.frombuffer(data, np.uint8).reshape(size, stride // 4, 4)[:, :size]  # (S, S, 4)
        if sys.byteorder == "big":  # ARGB32 is a native-endian word: bytes are A,R,G,B here
            pixels = pixels[..., ::-1]
        color = pixels[..., 2::-1].astype(np.float64)  # (S, S, 3) RGB, premultiplied by alpha
        alpha = pixels[..., 3:].astype(np.float64) / 255.0  # (S, S, 1)
        rgb = color + (1.0 - alpha) * np.asarray(background, np.float64)  # premultiplied "over"
        return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def _cairosvg_rasterizer():
    import cairosvg

    def render(path: Path, size: int, background: tuple[int, int, int]) -> Image.Image:
        try:
            data = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
        except MemoryError:
            raise
        except Exception as error:  # one SVG it cannot parse must not end the job
            # cairosvg 2.9.1 raises AttributeError on openmoji 17's 1F3F4-E0065-E0073-E0063-E006D-
            # E007F.svg (a marker it cannot resolve); write_style skips and counts OSErrors.
            raise OSError(f"cairosvg failed: {type(error).__name__}: {error}") from error
        return decode_image(data, background=background, min_size=1)

    return render


def find_rasterizer(kind: str = "auto"):
    """A `(svg_path, size, background) -> RGB image` function, or None when none is available.

    "auto" tries cairosvg, then librsvg; asking for one by name raises if it is unavailable.
    """
    if kind == "none":
        return None
    makers = {"cairosvg": _cairosvg_rasterizer, "librsvg": LibrsvgRasterizer}
    for name in ("cairosvg", "librsvg") if kind == "auto" else (kind,):
        try:
            return makers[name]()
        except (ImportError, OSError, AttributeError) as error:
            if kind != "auto":
                raise ValueError(f"--svg-rasterizer {kind} is not available here ({error}); use "
                                 "'auto', or install cairosvg / librsvg2-2 + libcairo2") from error  # fmt: skip
    return None


def normalize_hexcode(code: str) -> str:
    """'2764-FE0F' -> '2764': the join key between emoji-datasource and OpenMoji."""
    return "-".join(part for part in code.upper().split("-") if part and part != "FE0F")


def find_package(npm_dir: Path, name: str) -> Path:
    """The folder of npm package `name` under an npm prefix or a node_modules folder."""
    for folder in (npm_dir / "node_modules" / name, npm_dir / name):
        if (folder / "package.json").is_file():
            return folder
    raise FileNotFoundError(f"npm package {name} not found under --npm-dir {npm_dir}; install "
                            f"it with: {NPM_COMMAND}")  # fmt: skip


def load_annotations(openmoji: Path | None) -> dict[str, dict[str, Any]]:
    """normalized hexcode -> OpenMoji entry (annotation, tags list, group, subgroups, hexcode)."""
    if openmoji is None:
        return {}
    entries = json.loads((openmoji / "data" / "openmoji.json").read_text(encoding="utf-8"))
    result = {}
    for entry in entries:
        tags = [tag.strip() for tag in (entry.get("tags") or "").split(",") if tag.strip()]
        result[normalize_hexcode(entry["hexcode"])] = {**entry, "tags": tags}
    return result


def make_caption(style: str, annotation: str, tags: list[str], max_tags: int) -> str:
    """'<style> style emoji of <annotation>, <tags not already in the annotation>'."""
    words = set(re.findall(r"\w+", annotation.lower()))
    extra = [tag for tag in tags if not set(re.findall(r"\w+", tag.lower())) <= words]
    return ", ".join([f"{style} style emoji of {annotation}", *extra[:max_tags]])


def datasource_items(package: Path, style: str, skin_tones: bool) -> list[dict[str, Any]]:
    """(hexcode, png path, fallback name, group) of every image emoji.json lists for `style`."""
    items = []
    for entry in json.loads((package / "emoji.json").read_text(encoding="utf-8")):
        base_name = (entry.get("name") or entry.get("short_name") or "").lower()
        variants = [(entry, base_name)]
        if skin_tones:
            for key, variant in (entry.get("skin_variations") or {}).items():
                tones = ", ".join(SKIN_TONES.get(part, part) for part in key.split("-"))
                variants.append((variant, f"{base_name}: {tones}"))
        for record, name in variants:
            if record.get(f"has_img_{style}", True):
                path = package / "img" / style / "64" / record["image"]
                items.append({"hexcode": record["unified"], "path": path, "name": name,
                              "group": entry.get("category", "")})  # fmt: skip
    return items


def openmoji_items(package: Path, annotations: dict, args) -> list[dict[str, Any]]:
    """(hexcode, svg path, group) per OpenMoji entry, brands and skin tones as requested."""
    items = []
    for entry in annotations.values():
        if entry.get("subgroups") == "brand" and not args.include_brands:
            continue
        if entry.get("skintone") and args.no_skin_tones:
            continue
        path = package / "color" / "svg" / f"{entry['hexcode']}.svg"
        items.append({"hexcode": entry["hexcode"], "path": path, "name": entry["annotation"],
                      "group": entry.get("group", "")})  # fmt: skip
    return items


def render_item(item: dict, style: str, rasterizer, args) -> Image.Image:
    """The item's RGB image at --size, alpha composited onto the background."""
    background = Image.new("RGB", (1, 1), args.background).getpixel((0, 0))
    if style == "openmoji":
        return rasterizer(item["path"], args.size, background)
    image = decode_image(item["path"], background=background, min_size=1)
    if image.size != (args.size, args.size):
        image = image.resize((args.size, args.size), Image.Resampling.LANCZOS)
    return image


def write_style(out: Path, style: str, items: list, annotations: dict, rasterizer, args,
                counts: Counter) -> list[dict]:  # fmt: skip
    """Write one style's PNGs; returns its metadata rows."""
    rows, seen = [], set()
    for item in items:
        key = normalize_hexcode(item["hexcode"])
        if key in seen:
            continue
        seen.add(key)
        try:
            image = render_item(item, style, rasterizer, args)
        except (ImageDecodeError, OSError) as error:
            counts[f"{style}: unreadable image"] += 1
            warnings.warn(f"{item['path']}: {error}; skipped", stacklevel=2)
            continue
        entry = annotations.get(key)
        if entry is None:
            counts[f"{style}: caption from emoji.json name"] += 1
            caption = make_caption(style, item["name"], [], 0)
        else:
            caption = make_caption(style, entry["annotation"], entry["tags"], args.max_tags)
        file_name = f"images/{style}/{key.lower()}.png"
        (out / file_name).parent.mkdir(parents=True, exist_ok=True)
        image.save(out / file_name)
        rows.append({"file_name": file_name, "text": caption, "style": style,
                     "hexcode": item["hexcode"], "group": item["group"]})  # fmt: skip
    counts[f"{style}: images"] += len(rows)
    return rows


def main(args: argparse.Namespace) -> Path:
    """Build the folder; returns its path."""
    npm_dir, out = Path(args.npm_dir).expanduser(), Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    packages = {style: find_package(npm_dir, PACKAGES[style]) for style in args.styles}
    try:
        openmoji = packages.get("openmoji") or find_package(npm_dir, PACKAGES["openmoji"])
    except FileNotFoundError:
        openmoji = None
        warnings.warn("openmoji is not installed: captions fall back to emoji.json names",
                      stacklevel=2)  # fmt: skip
    annotations = load_annotations(openmoji)
    rasterizer, styles = None, list(args.styles)
    if "openmoji" in styles:
        rasterizer = find_rasterizer(args.svg_rasterizer)
        if rasterizer is None:
            warnings.warn("no SVG rasterizer (pip install cairosvg, or apt-get install librsvg2-2 "
                          "libcairo2): OpenMoji is skipped", stacklevel=2)  # fmt: skip
            styles.remove("openmoji")
    counts: Counter = Counter()
    with atomic_directory(out) as tmp:
        rows = []
        for style in styles:
            if style == "openmoji":
                items = openmoji_items(packages[style], annotations, args)
            else:
                items = datasource_items(packages[style], style, not args.no_skin_tones)
            rows += write_style(tmp, style, items, annotations, rasterizer, args, counts)
        splits = {"": rows}
        if args.num_validation:
            splits = split_by_emoji(rows, args.num_validation, args.seed)
            for name, split_rows in splits.items():
                counts[f"{name} split"] = len(split_rows)
                for row in split_rows:
                    target = tmp / name / row["file_name"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    (tmp / row["file_name"]).rename(target)
            shutil.rmtree(tmp / "images")  # only the emptied style folders are left
        for name, split_rows in splits.items():
            with open(tmp / name / "metadata.jsonl", "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows)
        (tmp / "LICENSES.txt").write_text(LICENSES)
    print(f"[prepare_emoji] wrote {len(rows)} images to {out}: {dict(sorted(counts.items()))}")
    return out


def split_by_emoji(rows: list[dict], num_validation: int, seed: int) -> dict[str, list[dict]]:
    """{"train": rows, "validation": rows}: whole emoji go to validation, in an order drawn with
    `seed`, until it holds >= num_validation rows, so no style of a validation emoji is trained
    on. Row order within each split is kept."""
    hexcodes = sorted({normalize_hexcode(row["hexcode"]) for row in rows})
    order = np.random.default_rng(seed).permutation(len(hexcodes))
    per_emoji = Counter(normalize_hexcode(row["hexcode"]) for row in rows)
    chosen, total = set(), 0
    for index in order:
        if total >= num_validation:
            break
        chosen.add(hexcodes[index])
        total += per_emoji[hexcodes[index]]
    if len(chosen) == len(hexcodes):  # also when every emoji together is too few
        raise ValueError(
            f"--num-validation={num_validation} leaves no training images ({len(rows)} images "
            "in all); use a smaller value"
        )
    held = [normalize_hexcode(row["hexcode"]) in chosen for row in rows]
    return {
        "train": [row for row, out in zip(rows, held, strict=True) if not out],
        "validation": [row for row, out in zip(rows, held, strict=True) if out],
    }


if __name__ == "__main__":
    main(parse_args())
