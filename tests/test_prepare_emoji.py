"""scripts/prepare_emoji.py on a tiny fake npm tree (no npm, no network)."""

from __future__ import annotations

import json

import numpy as np
import prepare_emoji
import pytest
from PIL import Image

from pipelines.data.images import load_image_caption_dataset

SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
    '<rect x="36" y="0" width="36" height="72" fill="#ff0000"/></svg>'
)


def rgba_png(path, color, transparent_left=True):
    image = Image.new("RGBA", (64, 64), (*color, 255))
    if transparent_left:
        image.paste((0, 0, 0, 0), (0, 0, 32, 64))  # (0,0,0,0) becomes black under convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def keycap_png(path):
    image = Image.new("P", (64, 64), 1)
    image.putpalette([59, 136, 195, 0, 0, 255] + [0] * 762)
    image.paste(0, (0, 0, 8, 8))  # transparent corner whose palette colour is keycap blue
    image.save(path, transparency=0)


def fake_tree(root):
    entries = [
        {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "category": "Food & Drink"},
        {"name": "WAVING HAND SIGN", "unified": "1F44B", "image": "1f44b.png",
         "category": "People & Body",
         "skin_variations": {"1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png"}}},
        {"name": "HASH KEY", "unified": "0023-FE0F-20E3", "image": "0023-fe0f-20e3.png",
         "category": "Symbols"},
        {"name": "NEW THING", "unified": "1FAFF", "image": "1faff.png", "category": "Symbols"},
    ]  # fmt: skip
    for style in ("twitter", "google"):
        package = root / "node_modules" / f"emoji-datasource-{style}"
        images = package / "img" / style / "64"
        rgba_png(images / "1f34e.png", (255, 0, 0))
        rgba_png(images / "1f44b.png", (255, 200, 0))
        rgba_png(images / "1f44b-1f3fb.png", (250, 220, 180))
        rgba_png(images / "1faff.png", (0, 128, 0))
        keycap_png(images / "0023-fe0f-20e3.png")
        (package / "package.json").write_text("{}")
        (package / "emoji.json").write_text(json.dumps(entries))
    openmoji = root / "node_modules" / "openmoji"
    (openmoji / "data").mkdir(parents=True)
    (openmoji / "color" / "svg").mkdir(parents=True)
    (openmoji / "package.json").write_text("{}")
    annotations = [
        {"hexcode": "1F34E", "annotation": "red apple", "tags": "apple, fruit, red",
         "group": "food-drink", "subgroups": "food-fruit", "skintone": ""},
        {"hexcode": "1F44B", "annotation": "waving hand", "tags": "hand, wave, waving",
         "group": "people-body", "subgroups": "hand-fingers-open", "skintone": ""},
        {"hexcode": "1F44B-1F3FB", "annotation": "waving hand: light skin tone", "tags": "",
         "group": "people-body", "subgroups": "hand-fingers-open", "skintone": "1"},
        {"hexcode": "0023-FE0F-20E3", "annotation": "keycap: #", "tags": "keycap",
         "group": "symbols", "subgroups": "keycap", "skintone": ""},
        {"hexcode": "E1C0", "annotation": "some logo", "tags": "", "group": "extras-openmoji",
         "subgroups": "brand", "skintone": ""},
    ]  # fmt: skip
    (openmoji / "data" / "openmoji.json").write_text(json.dumps(annotations))
    for entry in annotations:
        (openmoji / "color" / "svg" / f"{entry['hexcode']}.svg").write_text(SVG)
    return root


def read_rows(out):
    lines = (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return {(row["style"], row["hexcode"]): row for row in map(json.loads, lines)}


def test_png_styles_captions_and_alpha(tmp_path):
    tree = fake_tree(tmp_path / "npm")
    args = prepare_emoji.parse_args(["--npm-dir", str(tree), "--out", str(tmp_path / "out"),
                                     "--styles", "twitter", "google", "--max-tags", "2"])  # fmt: skip
    out = prepare_emoji.main(args)
    rows = read_rows(out)
    assert len(rows) == 10
    assert rows["twitter", "1F34E"]["text"] == "twitter style emoji of red apple, fruit"
    assert rows["google", "1F44B"]["text"] == "google style emoji of waving hand, wave"
    assert (
        rows["twitter", "1F44B-1F3FB"]["text"]
        == "twitter style emoji of waving hand: light skin tone"
    )
    assert rows["twitter", "0023-FE0F-20E3"]["text"] == "twitter style emoji of keycap: #"
    assert (
        rows["twitter", "1FAFF"]["text"] == "twitter style emoji of new thing"
    )  # no OpenMoji entry
    apple = np.asarray(Image.open(out / rows["twitter", "1F34E"]["file_name"]))
    assert apple.shape == (64, 64, 3)
    assert apple[10, 5].tolist() == [255, 255, 255] and apple[10, 50].tolist() == [255, 0, 0]
    keycap = np.asarray(Image.open(out / rows["google", "0023-FE0F-20E3"]["file_name"]))
    assert keycap[2, 2].tolist() == [255, 255, 255] and keycap[30, 30].tolist() == [0, 0, 255]
    assert "CC-BY 4.0" in (out / "LICENSES.txt").read_text()
    dataset = load_image_caption_dataset(out, resolution=32)
    assert len(dataset) == 10 and dict(dataset.report.counts) == {}


def test_options_size_skin_tones_and_existing_out(tmp_path):
    tree = fake_tree(tmp_path / "npm")
    out = tmp_path / "out"
    argv = ["--npm-dir", str(tree / "node_modules"), "--out", str(out), "--styles", "twitter",
            "--size", "32", "--no-skin-tones", "--background", "#000000"]  # fmt: skip
    prepare_emoji.main(prepare_emoji.parse_args(argv))
    rows = read_rows(out)
    assert ("twitter", "1F44B-1F3FB") not in rows and len(rows) == 4
    apple = np.asarray(Image.open(out / rows["twitter", "1F34E"]["file_name"]))
    assert apple.shape == (32, 32, 3) and apple[5, 2].tolist() == [0, 0, 0]
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_emoji.main(prepare_emoji.parse_args(argv))
    with pytest.raises(FileNotFoundError, match="npm install"):
        prepare_emoji.main(prepare_emoji.parse_args(["--npm-dir", str(tmp_path), "--out",
                                                     str(tmp_path / "o2")]))  # fmt: skip


def test_openmoji_rasterized_or_skipped_clearly(tmp_path):
    tree = fake_tree(tmp_path / "npm")
    argv = ["--npm-dir", str(tree), "--styles", "openmoji"]
    with pytest.warns(UserWarning, match="no SVG rasterizer.*OpenMoji is skipped"):
        out = prepare_emoji.main(
            prepare_emoji.parse_args(
                [*argv, "--out", str(tmp_path / "none"), "--svg-rasterizer", "none"]
            )
        )
    assert read_rows(out) == {}
    if prepare_emoji.find_rasterizer("auto") is None:
        pytest.skip("no SVG rasterizer here (neither cairosvg nor librsvg); skip path tested above")
    out = prepare_emoji.main(prepare_emoji.parse_args([*argv, "--out", str(tmp_path / "om")]))
    rows = read_rows(out)
    assert sorted(hexcode for _, hexcode in rows) == [
        "0023-FE0F-20E3",
        "1F34E",
        "1F44B",
        "1F44B-1F3FB",
    ]
    assert rows["openmoji", "1F34E"]["text"] == "openmoji style emoji of red apple, fruit"
    pixels = np.asarray(Image.open(out / rows["openmoji", "1F34E"]["file_name"]))
    assert pixels[20, 8].tolist() == [255, 255, 255] and pixels[20, 56].tolist() == [255, 0, 0]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_code:
        prepare_emoji.parse_args(["--help"])
    assert exit_code.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--npm-dir", "--out", "--styles", "--size", "--background", "--max-tags",
                 "--no-skin-tones", "--include-brands", "--svg-rasterizer", "--overwrite"):  # fmt: skip
        assert flag in text
    assert "npm install" in text


def test_svg_the_rasterizer_cannot_render_is_skipped_and_counted(tmp_path, monkeypatch, capsys):
    """cairosvg raises arbitrary exceptions on some SVGs (AttributeError on one OpenMoji 17
    flag): that file is skipped with a warning and counted, the rest is written."""
    import sys
    import types

    from PIL import Image as PILImage

    def svg2png(url, output_width, output_height):
        if url.endswith("1F34E.svg"):
            raise AttributeError("'NoneType' object has no attribute 'get'")
        buffer = __import__("io").BytesIO()
        PILImage.new("RGBA", (output_width, output_height), (0, 0, 255, 255)).save(buffer, "PNG")
        return buffer.getvalue()

    monkeypatch.setitem(sys.modules, "cairosvg", types.SimpleNamespace(svg2png=svg2png))
    tree = fake_tree(tmp_path / "npm")
    argv = ["--npm-dir", str(tree), "--styles", "openmoji", "--svg-rasterizer", "cairosvg"]
    with pytest.warns(UserWarning, match=r"1F34E\.svg: cairosvg failed: AttributeError"):
        out = prepare_emoji.main(prepare_emoji.parse_args([*argv, "--out", str(tmp_path / "o")]))
    assert "'openmoji: unreadable image': 1" in capsys.readouterr().out
    rows = read_rows(out)
    assert sorted(hexcode for _, hexcode in rows) == ["0023-FE0F-20E3", "1F44B", "1F44B-1F3FB"]
    pixels = np.asarray(Image.open(out / rows["openmoji", "1F44B"]["file_name"]))
    assert pixels[3, 3].tolist() == [0, 0, 255]


def test_validation_split_holds_whole_emoji(tmp_path):
    tree = fake_tree(tmp_path / "npm")
    argv = ["--npm-dir", str(tree), "--styles", "twitter", "google", "--num-validation", "3"]
    out = prepare_emoji.main(prepare_emoji.parse_args([*argv, "--out", str(tmp_path / "o")]))
    assert sorted(path.name for path in out.iterdir()) == ["LICENSES.txt", "train", "validation"]
    train, validation = read_rows(out / "train"), read_rows(out / "validation")
    assert len(train) + len(validation) == 10 and len(validation) >= 3
    # every style of an emoji lands in the same split
    assert not {hexcode for _, hexcode in train} & {hexcode for _, hexcode in validation}
    for split, rows in (("train", train), ("validation", validation)):
        assert all((out / split / row["file_name"]).is_file() for row in rows.values())
        assert len(load_image_caption_dataset(out, split=split, resolution=32)) == len(rows)
    again = prepare_emoji.main(prepare_emoji.parse_args([*argv, "--out", str(tmp_path / "o2")]))
    assert read_rows(again / "validation") == validation  # seeded
    with pytest.raises(ValueError, match="--num-validation=10 leaves no training images"):
        prepare_emoji.main(
            prepare_emoji.parse_args([*argv[:-1], "10", "--out", str(tmp_path / "o3")])
        )
