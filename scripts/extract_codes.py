"""Encode an image-caption dataset once with a frozen image tokenizer, for training the prior.

    python scripts/extract_codes.py --tokenizer runs/vqgan/export --data shapes --out codes/
    accelerate launch scripts/extract_codes.py --tokenizer DIR --data my_images/ --out codes/

Every rank encodes its share of fixed-size shards (shard k goes to rank k mod world size) and
writes each one atomically; rank 0 then merges them in order into OUT/<split>/ (a `datasets`
Arrow dataset: caption, codes (h, w), flipped, source_index and pass-through columns such as
the Shapes attributes) and writes OUT/codes_meta.json with the tokenizer's identity, last.
A rerun with the same settings skips finished shards (or everything, once the metadata exists),
so an interrupted run resumes; the number of processes may change between runs. Read the
result with `pipelines.data.codes.load_codes`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from common.help import HelpFormatter
from tqdm.auto import tqdm

from codegrid.io import atomic_directory
from pipelines.data.codes import CODES_FORMAT, CODES_META, CODES_VERSION, write_json_atomic
from pipelines.data.images import load_image_caption_dataset
from pipelines.data.sources import available_splits

SHARDS = ".shards"
_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see --help)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)  # fmt: skip
    add = parser.add_argument
    add("--tokenizer", required=True, help="image tokenizer folder (VQGAN.save_pretrained output)")
    add("--data", default="shapes", help="'shapes', an image folder, .tar shards (file, folder "
        "or glob), a save_to_disk folder, or a Hub dataset name")  # fmt: skip
    add("--out", required=True, help="output folder (created; a rerun resumes it)")
    add("--splits", nargs="+", default=["train", "validation"], help="splits to extract")
    add("--validation-fraction", type=float, default=0.05, help="share of train held out as "
        "'validation' when the data has no validation split (0 disables)")  # fmt: skip
    add("--resolution", type=int, default=None, help="image side in pixels (default: the "
        "tokenizer's configured resolution)")  # fmt: skip
    add("--num-samples", type=int, default=None, help="Shapes: train images to generate; "
        "other data: read only the first N candidates of train (default: all; Shapes: 1000)")  # fmt: skip
    add("--num-validation-samples", type=int, default=None, help="the same for validation "
        "(default: all; Shapes: 1000)")  # fmt: skip
    add("--seed", type=int, default=0, help="Shapes seed and validation hold-out seed")
    add("--flip", action="store_true", help="also store horizontally flipped copies (Shapes: "
        "left/right swapped in caption and position; other data: captions unchanged)")  # fmt: skip
    add("--batch-size", type=int, default=64, help="images per tokenizer forward pass")
    add("--num-workers", type=int, default=0, help="DataLoader workers per process")
    add("--shard-size", type=int, default=2048, help="images per shard (the resume unit)")
    add(
        "--image-column",
        default=None,
        help="image column of a `datasets` source (default: detected)",
    )
    add(
        "--caption-column",
        default=None,
        help="caption column (folders: metadata key; default: detected)",
    )
    add("--missing-caption", choices=["null", "skip"], default="null", help="images without "
        "a caption: 'null' trains them with the empty caption, 'skip' drops them")  # fmt: skip
    add("--overwrite", action="store_true", help="delete OUT and start again")
    args = parser.parse_args(argv)
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0.0 <= args.validation_fraction < 1.0:
        parser.error(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    return args


def load_image_tokenizer(path: str) -> Any:
    """The frozen tokenizer (ImageTokenizer protocol). The hook for other tokenizer kinds."""
    from tokenizer import VQGAN

    return VQGAN.from_pretrained(path)


def swap_left_right(text: str) -> str:
    """'top left' -> 'top right' and back, as whole words (the mirror image's description)."""
    return _LEFT_RIGHT.sub(lambda match: "right" if match.group(1) == "left" else "left", text)


def build_splits(args: argparse.Namespace, resolution: int) -> dict[str, Any]:
    """Validated datasets per split; validation is held out of train if the data lacks it."""
    offered = available_splits(args.data)
    wanted, result = list(args.splits), {}
    carve = "validation" in wanted and offered is not None and "validation" not in offered
    carve = carve and "train" in offered and args.validation_fraction > 0
    for split in wanted + (["train"] if carve and "train" not in wanted else []):
        if offered is not None and split not in offered:
            continue
        limit = args.num_validation_samples if split == "validation" else args.num_samples
        result[split] = load_image_caption_dataset(
            args.data, split=split, resolution=resolution, num_samples=limit, seed=args.seed,
            image_column=args.image_column, caption_column=args.caption_column,
            missing_caption=args.missing_caption, distributed=True,
        )  # fmt: skip
    if carve:
        train = result["train"]
        order = np.random.default_rng(args.seed).permutation(len(train)).tolist()
        held = max(1, round(args.validation_fraction * len(train))) if len(train) > 1 else 0
        result["validation"] = train.subset(sorted(order[:held]))
        result["train"] = train.subset(sorted(order[held:]))
    result = {split: result[split] for split in wanted if split in result}
    missing = [split for split in wanted if split not in result]
    if missing:
        warnings.warn(
            f"--data {args.data} has no split(s) {missing}; offered: {offered}", stacklevel=2
        )
    return result


def fingerprint(args: argparse.Namespace, identity: dict, resolution: int) -> str:
    """sha256 of everything that changes the output; shards of another job are never reused."""
    keys = ("data", "splits", "validation_fraction", "num_samples", "num_validation_samples",
            "seed", "flip", "shard_size", "image_column", "caption_column", "missing_caption")  # fmt: skip
    values = {key: getattr(args, key) for key in keys}
    values.update(data=str(args.data), identity=identity, resolution=resolution)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def shard_features(dataset: Any, grid: tuple[int, int], codes_dtype: str) -> datasets.Features:
    """caption, codes (h, w), flipped, source_index (position in the split's validated image
    list), source (file name, tar member or row), then the source's pass-through columns."""
    features = {
        "caption": datasets.Value("string"),
        "codes": datasets.Array2D(shape=grid, dtype=codes_dtype),
        "flipped": datasets.Value("bool"),
        "source_index": datasets.Value("int64"),
        "source": datasets.Value("string"),
    }
    if dataset.extra_table is not None:
        features.update(dataset.extra_table.features)
    return datasets.Features(features)


def mirrored(caption: str, extras: dict, is_shapes: bool) -> tuple[str, dict]:
    """Caption and attributes of the mirror image: Shapes swaps left/right; others unchanged."""
    if not is_shapes:
        return caption, extras
    swapped = {key: swap_left_right(value) if "position" in key and isinstance(value, str)
               else value for key, value in extras.items()}  # fmt: skip
    return swap_left_right(caption), swapped


def encode_shard(tokenizer, dataset, indices, args, device, progress) -> dict[str, list]:
    """Columns of one shard: each item, followed (with --flip) by its mirror image."""
    subset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, args.batch_size, num_workers=args.num_workers)
    columns: dict[str, list] = {}
    done = 0
    for batch in loader:
        images = batch["image"].to(device)  # (B, 3, R, R) in [-1, 1]
        count = images.shape[0]
        if args.flip:
            images = torch.cat([images, images.flip(-1)])  # (2B, 3, R, R): originals, mirrors
        with torch.inference_mode():
            codes = tokenizer.encode(images).cpu().numpy()  # (B or 2B, h, w)
        for offset, caption in enumerate(batch["caption"]):
            index = indices[done + offset]
            rows = [(False, caption, dataset.extras(index), codes[offset])]
            if args.flip:
                rows.append((True, *mirrored(caption, rows[0][2], args.data == "shapes"),
                             codes[count + offset]))  # fmt: skip
            for flipped, text, extras, grid in rows:
                fixed = {"caption": text, "codes": grid, "flipped": flipped,
                         "source_index": index, "source": dataset.names[index]}  # fmt: skip
                for key, value in (*fixed.items(), *extras.items()):
                    columns.setdefault(key, []).append(value)
        done += count
        progress.update(count)
    return columns


def extract_split(accelerator, tokenizer, dataset, split, args, job_dir, grid, codes_dtype):
    """Encode this rank's unfinished shards of one split; returns the number of shards."""
    num_shards = math.ceil(len(dataset) / args.shard_size)
    mine = range(accelerator.process_index, num_shards, accelerator.num_processes)
    todo = [k for k in mine if not (job_dir / split / f"shard-{k:05d}").is_dir()]
    total = sum(min(args.shard_size, len(dataset) - k * args.shard_size) for k in todo)
    features = shard_features(dataset, grid, codes_dtype)
    desc = f"{split} (rank {accelerator.process_index})"
    with tqdm(total=total, desc=desc, disable=not accelerator.is_main_process) as progress:
        for k in todo:
            indices = list(range(k * args.shard_size, min(len(dataset), (k + 1) * args.shard_size)))
            columns = encode_shard(tokenizer, dataset, indices, args, accelerator.device, progress)
            columns["codes"] = [row.astype(codes_dtype) for row in columns["codes"]]
            shard = datasets.Dataset.from_dict(columns, features=features)
            with atomic_directory(job_dir / split / f"shard-{k:05d}") as tmp:
                shard.save_to_disk(str(tmp))
    return num_shards


def merge(out: Path, job_dir: Path, splits: dict, num_shards: dict, meta: dict) -> None:
    """Concatenate the shards of each split in order into OUT/<split>/, then write the meta."""
    for split, dataset in splits.items():
        if num_shards[split] == 0:
            continue
        parts = [datasets.load_from_disk(str(job_dir / split / f"shard-{k:05d}"))
                 for k in range(num_shards[split])]  # fmt: skip
        merged = datasets.concatenate_datasets(parts)
        with atomic_directory(out / split) as tmp:
            merged.save_to_disk(str(tmp))
        meta["splits"][split] = {"num_rows": len(merged), "num_images": len(dataset),
                                 "report": dataset.report.to_dict()}  # fmt: skip
        print(f"[extract_codes] {split}: {len(merged)} rows from {len(dataset)} images; "
              f"data report: {dataset.report.summary()}")  # fmt: skip
    write_json_atomic(out / CODES_META, meta)
    shutil.rmtree(job_dir)


def job_is_done(out: Path, job_id: str) -> bool:
    """True if OUT holds this finished job; ValueError if it holds (parts of) another one."""
    meta_path, job_path = out / CODES_META, out / SHARDS / "job.json"
    for path in (meta_path, job_path):
        if path.is_file() and json.loads(path.read_text())["fingerprint"] != job_id:
            raise ValueError(
                f"--out {out} holds codes of a different extraction (another tokenizer, data or "
                "options); pass --overwrite to replace them, or choose another --out"
            )
    return meta_path.is_file()


def main(args: argparse.Namespace) -> Path:
    """Run the extraction; returns the output folder."""
    # Without a GPU, CPU mode makes `accelerate launch --multi_gpu` ranks join one gloo group;
    # otherwise accelerate 1.x gives every rank a world of its own.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate sees {accelerator.num_processes}; "
            "on a machine without GPUs set ACCELERATE_USE_CPU=1 (then ranks use gloo on CPU)"
        )
    datasets.disable_progress_bars()  # one bar per shard save is noise; ours counts images
    out, job_dir = Path(args.out), Path(args.out) / SHARDS
    tokenizer = load_image_tokenizer(args.tokenizer)
    if hasattr(tokenizer, "to"):
        tokenizer = tokenizer.to(accelerator.device).eval()
    identity = tokenizer.identity()
    resolution = args.resolution or int(identity.get("resolution") or 32)
    grid = tuple(tokenizer.latent_shape(resolution, resolution))
    codes_dtype = "int16" if tokenizer.codebook_size <= 2**15 else "int32"
    job_id = fingerprint(args, identity, resolution)
    if args.overwrite and accelerator.is_main_process and out.exists():
        shutil.rmtree(out)
    accelerator.wait_for_everyone()
    if job_is_done(out, job_id):
        accelerator.print(f"[extract_codes] {out} is complete; nothing to do")
        return out
    if accelerator.is_main_process:
        job_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(job_dir / "job.json", {"fingerprint": job_id})
    if args.flip and args.data != "shapes":
        warnings.warn("--flip on data other than Shapes: captions are stored unchanged, so "
                      "'left' and 'right' in them describe the unflipped image", stacklevel=2)  # fmt: skip
    accelerator.wait_for_everyone()
    splits = build_splits(args, resolution)
    num_shards = {split: extract_split(accelerator, tokenizer, dataset, split, args, job_dir,
                                       grid, codes_dtype) for split, dataset in splits.items()}  # fmt: skip
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"format": CODES_FORMAT, "version": CODES_VERSION, "fingerprint": job_id,
                "tokenizer": identity, "latent_shape": list(grid), "resolution": resolution,
                "codebook_size": tokenizer.codebook_size, "codes_dtype": codes_dtype,
                "data": str(args.data), "flip": args.flip, "splits": {}}  # fmt: skip
        merge(out, job_dir, splits, num_shards, meta)
    accelerator.wait_for_everyone()
    return out


if __name__ == "__main__":
    main(parse_args())
