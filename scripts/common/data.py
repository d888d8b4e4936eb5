"""The image datasets and step-indexed loaders that the image-reading jobs share (the tokenizer
and the scorer): train and validation splits with their skip reports, and an iterator over
this rank's micro-batches that resumes at any step."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from common.run_folder import RunFolder
from common.sampler import StepBatches, StepSampler
from pipelines.data.images import load_image_caption_dataset
from pipelines.data.sources import available_splits


def load_image_splits(args: argparse.Namespace, run: RunFolder, **train_options) -> tuple:
    """(train, validation) datasets of {"image": (3, R, R) in [-1, 1], "caption"} from --data,
    --resolution, --num-train-samples and --num-val-samples; `train_options` (flips, channel
    shuffles) apply to the training split only. Without a validation split the first
    --num-val-samples training images validate, with a warning; skipped images are logged."""
    common = dict(resolution=args.resolution, seed=args.seed, distributed=True)
    train = load_image_caption_dataset(
        args.data, split="train", num_samples=args.num_train_samples, **train_options, **common
    )
    # Decided from the source's splits (None: a Hub name, assumed to have one), so that any
    # other error of a real validation split is raised, not replaced by training images.
    if "validation" in (available_splits(args.data) or ["validation"]):
        val = load_image_caption_dataset(
            args.data, split="validation", num_samples=args.num_val_samples, **common
        )
    else:
        run.warning(
            f"no validation split in --data {args.data}; validating on the first "
            f"{args.num_val_samples} training images"
        )
        val = train.subset(list(range(min(len(train), args.num_val_samples))))
    run.info(f"train data: {len(train)} images; report: {train.report.summary()}")
    run.info(f"validation data: {len(val)} images; report: {val.report.summary()}")
    return train, val


def step_batches(
    args: argparse.Namespace, accelerator, step: int, dataset: Any, collate: Callable
) -> Any:
    """An iterator over this rank's collated micro-batches from optimizer step `step` on; the
    order is a function of the step alone (common.sampler), so a resumed run reads the same."""
    sampler = StepSampler(
        len(dataset),
        args.batch_size,
        accumulation=args.gradient_accumulation_steps,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=args.seed,
    )
    loader = torch.utils.data.DataLoader(
        StepBatches(dataset, sampler, collate),
        batch_size=None,
        sampler=range(step * args.gradient_accumulation_steps, 2**62),
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    return iter(loader)
