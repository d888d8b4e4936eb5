"""Extracted image codes on disk: the layout `scripts/extract_codes.py` writes, and its loader.

    OUT/codes_meta.json     tokenizer identity, code grid, options, per-split row counts and
                            the data report of the source each split was read from (shared
                            by train and validation when validation is held out of train);
                            written last and atomically: the commit point
    OUT/<split>/            a `datasets` Arrow dataset (save_to_disk) with the columns
                            caption (str), codes (Array2D (h, w) int16 or int32), flipped (bool),
                            source_index (int64), source (str: file, tar member or row), plus
                            pass-through columns (the Shapes attributes)

The prior's training calls `load_codes(path, split, expected_identity=tokenizer_identity)`, which
refuses codes made by any other tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from codegrid.io import fsync_path

CODES_META = "codes_meta.json"
CODES_FORMAT = "codegrid-codes"
CODES_VERSION = 1
# Fields of codes_meta.json that the loaders read, and their JSON types.
_META_FIELDS = {
    "tokenizer": dict,
    "latent_shape": list,
    "resolution": int,
    "codebook_size": int,
    "splits": dict,
}


def write_json_atomic(path: str | os.PathLike, values: dict[str, Any]) -> None:
    """Write JSON to `path.tmp-<pid>`, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(values, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_codes_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an extraction folder, checked: format, `version` == CODES_VERSION, and
    the fields the loaders read (tokenizer, latent_shape, resolution, codebook_size, splits).

    Raises:
        FileNotFoundError: `path` has no codes_meta.json (not a finished extraction).
        ValueError: the file is not valid JSON, not a codes metadata file, written by another
            version of the layout, or lacks a field.
    """
    meta_path = Path(path) / CODES_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: {path} is not a finished code extraction; run "
            f"scripts/extract_codes.py --out {path} (a rerun resumes an interrupted one)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path} is not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != CODES_FORMAT:
        raise ValueError(f"{meta_path} is not a {CODES_FORMAT} metadata file")
    if meta.get("version") != CODES_VERSION:
        raise ValueError(
            f"{meta_path} has version={meta.get('version')!r} but this code reads version "
            f"{CODES_VERSION}; re-extract the codes: scripts/extract_codes.py --out {path}"
        )
    for field, kind in _META_FIELDS.items():
        if not isinstance(meta.get(field), kind):
            raise ValueError(
                f"{meta_path}: field {field!r} is {meta.get(field)!r}; expected a "
                f"{kind.__name__}. The file is malformed: re-extract the codes with "
                f"scripts/extract_codes.py --out {path}"
            )
    return meta


def check_tokenizer_identity(
    stored: dict[str, Any], expected: dict[str, Any], source: str = "codes"
) -> None:
    """Raise ValueError unless every key of `expected` has the same value in `stored`."""
    differing = sorted(key for key in expected if stored.get(key) != expected[key])
    if differing:
        raise ValueError(
            f"{source} were extracted with tokenizer {json.dumps(stored, sort_keys=True)}, but "
            f"the prior is configured for {json.dumps(expected, sort_keys=True)} (different: "
            f"{', '.join(differing)}); re-run scripts/extract_codes.py with the prior's tokenizer"
        )


def load_codes(
    path: str | os.PathLike,
    split: str = "train",
    expected_identity: dict[str, Any] | None = None,
    expected_latent_shape: tuple[int, int] | None = None,
) -> Any:
    """Load one split of extracted codes as a `datasets.Dataset`.

    Args:
        path: an `--out` folder of scripts/extract_codes.py.
        split: "train", "validation", ...
        expected_identity: the tokenizer identity the caller is configured for (e.g.
            `tokenizer.identity()`); every key given must match the stored identity.
        expected_latent_shape: the prior's (h, w) code grid, checked against the extraction.

    Returns:
        A `datasets.Dataset`; `dataset.with_format("torch")[:]["codes"]` is (N, h, w) int64.

    Raises:
        FileNotFoundError: not a finished extraction. ValueError: another tokenizer, another
        grid, or an unknown split (the message lists the extracted ones).
    """
    import datasets

    meta = read_codes_meta(path)
    if expected_identity is not None:
        check_tokenizer_identity(meta["tokenizer"], expected_identity, f"codes at {path}")
    grid = meta["latent_shape"]
    if expected_latent_shape is not None and list(expected_latent_shape) != grid:
        raise ValueError(
            f"codes at {path} form a {grid} grid (resolution {meta['resolution']}), but the prior "
            f"expects {list(expected_latent_shape)}; set the prior's image_grid to {tuple(grid)} "
            "or re-extract at the matching --resolution"
        )
    if split not in meta["splits"]:
        raise ValueError(
            f"split={split!r} was not extracted at {path}; splits: {sorted(meta['splits'])}"
        )
    return datasets.load_from_disk(str(Path(path) / split))
