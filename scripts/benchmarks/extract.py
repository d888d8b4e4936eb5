"""Benchmark 4 of issue 7: code extraction throughput against a bare `VQGAN.encode` loop.

Ours is `scripts/extract_codes.py`'s per-split path (`extract_split`: DataLoader over the
validated dataset, PNG decode and transform, `encode`, the Arrow shard written atomically to
disk) over an in-memory `datasets.Dataset` of PNG images. The reference encodes the same images
already decoded into one tensor, in batches of the same size, and writes nothing. Both use the
f16 256 px tokenizer (taming-f16-1024 architecture, random weights); it costs about a second per
image on 2 cores, so the run uses few images (`--extract-images`, default 8).
"""

from __future__ import annotations

import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Row, Settings, time_pair
from tokenizer import VQGAN, VQGANConfig

BATCH_SIZE = 4


def _in_memory_source(count: int, resolution: int, seed: int):
    """A `datasets.Dataset` of `count` random RGB PNG images with captions, held in memory."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (count, resolution, resolution, 3), dtype=np.uint8)
    images = [Image.fromarray(array) for array in pixels]
    captions = [f"image {index}" for index in range(count)]
    # One pass-through column, like Shapes' attributes, which extraction copies to its output.
    labels = [f"label {index % 3}" for index in range(count)]
    columns = {"image": images, "caption": captions, "label": labels}
    string = datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), "caption": string, "label": string})
    return datasets.Dataset.from_dict(columns, features=features)


def _tokenizer(settings: Settings) -> VQGAN:
    if settings.smoke:
        config = VQGANConfig.from_preset("cpu-tiny")
    else:
        config = VQGANConfig.from_preset("taming-f16-1024")
    torch.manual_seed(settings.seed)
    return VQGAN(config).eval()


def bench_extract(settings: Settings) -> list[Row]:
    """images/s of extract_codes' split extraction vs encode on pre-loaded tensors."""
    import datasets
    import extract_codes

    from pipelines.data.images import load_image_caption_dataset

    model = _tokenizer(settings)
    resolution, count = model.config.resolution, settings.extract_images
    dataset = load_image_caption_dataset(
        _in_memory_source(count, resolution, settings.seed), resolution=resolution
    )
    preloaded = torch.stack([dataset[index]["image"] for index in range(len(dataset))])
    grid = model.latent_shape(resolution, resolution)
    args = extract_codes.parse_args(
        ["--tokenizer", "unused", "--out", "unused", "--batch-size", str(BATCH_SIZE)]
    )
    # One process; is_main_process=False only silences extract_split's progress bar.
    accelerator = types.SimpleNamespace(
        process_index=0, num_processes=1, is_main_process=False, device=torch.device("cpu")
    )
    datasets.disable_progress_bars()
    scratch = tempfile.TemporaryDirectory(prefix="bench-extract-")
    runs = iter(range(10**6))

    def ours() -> None:
        job_dir = Path(scratch.name) / f"run-{next(runs)}"  # a fresh job: nothing to resume
        extract_codes.extract_split(
            accelerator, model, dataset, "train", args, job_dir, grid, "int16"
        )

    def bare() -> None:
        for start in range(0, count, BATCH_SIZE):
            model.encode(preloaded[start : start + BATCH_SIZE])

    with scratch:
        ours_s, bare_s, raw = time_pair(ours, bare, settings)
    return [
        Row("extract", f"extract_codes path vs bare encode loop, {resolution}px, {count} images",
            count / ours_s, count / bare_s, "images/s", bare_s / ours_s, 0.85,
            note=f"batch {BATCH_SIZE}; ours decodes PNG and writes Arrow shards",
            extra={"seconds": raw}),
    ]  # fmt: skip
