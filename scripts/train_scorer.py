r"""Train the image-caption scorer that reranks a pipeline's candidates, on images with captions.

    python scripts/train_scorer.py --text-tokenizer runs/prior/final/text_tokenizer \
        --output-dir runs/scorer --time-budget-minutes 1
    python scripts/make_pipeline.py ... --scorer runs/scorer/final --num-candidates 16

The scorer (`pipelines.scorer.ImageTextScorer`) reads the ids of the pipeline's own text
tokenizer, so pass the prior's (--text-tokenizer). It learns CLIP's symmetric InfoNCE loss over
the images of a batch and their captions (Radford et al. 2021); a caption that occurs twice in a
batch is not a negative of the other's image. Under `accelerate launch` each rank contrasts its
own batch (no all-gather of embeddings), and every rank validates on all validation images.
There are no random flips: a flip would swap left and right, which captions may name.
metrics.jsonl gets the training loss, the validation loss and the validation accuracy (the
share of validation images whose best caption within a chunk of --batch-size is their own).
Export: OUTPUT/final (and OUTPUT/best, lowest validation loss), save_pretrained folders.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from common import curves, loop
from common import validation as checks
from common.data import load_image_splits, step_batches
from common.faults import fires, kill_point
from common.help import HelpFormatter
from common.optim import adamw
from common.run_folder import RunFolder
from common.sampler import record_indices
from common.schedule import set_learning_rate, warmup_cosine

from pipelines.scorer import ImageTextScorer, ScorerConfig, contrastive_loss
from prior import TextTokenizer


def _int_tuple(text: str) -> tuple[int, ...]:
    """'16,32,64' -> (16, 32, 64)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated integers") from error


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the job, each with its --help text."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    loop.add_common_arguments(parser, learning_rate=2e-3)
    add = parser.add_argument
    defaults = ScorerConfig(text_vocab_size=1, text_pad_id=0)
    # fmt: off
    add("--text-tokenizer", type=Path, required=True, help="the pipeline's TextTokenizer "
        "folder (train_prior.py exports it as OUTPUT/final/text_tokenizer)")
    add("--data", default="shapes", help="'shapes', an image folder, .tar shards, a "
        "save_to_disk folder or a datasets name (validation split: 'validation' if present)")
    add("--resolution", type=int, default=32, help="image side: the pipeline's resolution")
    add("--num-train-samples", type=int, default=10000, help="Shapes: images to generate; "
        "other data: read only the first N candidates")
    add("--num-val-samples", type=int, default=1000, help="validation images")
    add("--channels", type=_int_tuple, default=defaults.channels, help="image tower widths; "
        "the first convolution keeps the resolution, each later one halves it")
    add("--pooled-grid", type=int, default=defaults.pooled_grid, help="cells per side of the "
        "pool after the convolutions (keeps where things are)")
    add("--embed-dim", type=int, default=defaults.embed_dim, help="joint embedding width")
    add("--weight-decay", type=float, default=0.05, help="AdamW decay of matrices only")
    add("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    add("--adam-beta2", type=float, default=0.98, help="AdamW beta2 (CLIP's)")
    add("--adam-epsilon", type=float, default=1e-6, help="AdamW epsilon (CLIP's)")
    add("--record-sample-indices", action="store_true", help="debug: append the sample "
        "indices each rank trains on to OUTPUT/samples-rank<R>.txt")
    # fmt: on
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the flags (see --help); bad values raise ValueError."""
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag, the value and the allowed values."""
    loop.validate_common_arguments(args)
    checks.require_positive(args, "resolution", "num_train_samples", "num_val_samples")
    checks.require_positive(args, "pooled_grid", "embed_dim", "adam_epsilon")
    checks.require_non_negative(args, "weight_decay")
    if not args.channels or min(args.channels) < 1:
        raise ValueError(f"--channels={args.channels} is invalid; use widths >= 1, e.g. 16,32,64")
    if args.num_val_samples < 2:
        raise ValueError(
            f"--num-val-samples={args.num_val_samples} is invalid; validation contrasts "
            "images with each other's captions, so use >= 2"
        )
    if args.batch_size < 2:
        raise ValueError(
            f"--batch-size={args.batch_size} is invalid; contrastive training needs >= 2 "
            "images per batch (the other captions are the negatives)"
        )
    if not args.text_tokenizer.exists():
        raise FileNotFoundError(
            f"--text-tokenizer {args.text_tokenizer} does not exist; pass the pipeline's text "
            "tokenizer folder (train_prior.py's OUTPUT/final/text_tokenizer)"
        )


@dataclasses.dataclass
class Job:
    """Everything the step, evaluation and checkpoint helpers use."""

    ctx: loop.Context
    model: Any  # ImageTextScorer, possibly wrapped by DDP
    optimizer: Any
    text_tokenizer: TextTokenizer
    train: Any
    val: Any
    batches: Any = None

    @property
    def scorer(self) -> ImageTextScorer:
        return self.ctx.accelerator.unwrap_model(self.model)


def setup(args: argparse.Namespace, accelerator, run: RunFolder) -> Job:
    """Data, text tokenizer, scorer and optimizer, prepared by accelerate."""
    text_tokenizer = TextTokenizer.from_pretrained(args.text_tokenizer)
    train, val = load_image_splits(args, run)  # no flips: captions may name left and right
    config = ScorerConfig(
        text_vocab_size=text_tokenizer.vocab_size,
        text_pad_id=text_tokenizer.pad_id,
        channels=args.channels,
        pooled_grid=args.pooled_grid,
        embed_dim=args.embed_dim,
    )
    model = ImageTextScorer(config)
    adam = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    optimizer = adamw(model, args.learning_rate, args.weight_decay, **adam)
    run.info(f"{text_tokenizer}; scorer {config}, {model.num_parameters()} parameters")
    model, optimizer = accelerator.prepare(model, optimizer)
    ctx = loop.make_context(args, accelerator, run, accelerator.unwrap_model(model))
    return Job(ctx, model, optimizer, text_tokenizer, train, val)


def collate(items: list[dict]) -> dict[str, Any]:
    """Dataset items -> {"image": (B, 3, R, R), "caption": [str] * B}."""
    return {
        "image": torch.stack([item["image"] for item in items]),
        "caption": [item["caption"] for item in items],
    }


def train_step(job: Job, step: int) -> dict[str, float]:
    """One optimizer step over the accumulated micro-batches (each contrasted on its own)."""
    ctx, args, accelerator = job.ctx, job.ctx.args, job.ctx.accelerator
    accumulation = args.gradient_accumulation_steps
    factor = warmup_cosine(
        step, loop.learning_rate_total(ctx), args.warmup_steps, args.min_lr_ratio
    )
    set_learning_rate(job.optimizer, args.learning_rate * factor)
    poisoned, losses, total = fires("nan-loss"), [], 0.0
    for micro in range(accumulation):
        batch = next(job.batches)
        if args.record_sample_indices:
            record_indices(args.output_dir, accelerator.process_index, batch["index"])
        images = batch["image"].to(accelerator.device)
        text = job.text_tokenizer(batch["caption"]).to(accelerator.device)  # (B, T)
        last = micro == accumulation - 1
        with accelerator.no_sync(job.model) if not last else contextlib.nullcontext():
            with accelerator.autocast():
                loss = contrastive_loss(job.model(images, text), text)
            loss = loss * float("nan") if poisoned else loss
            accelerator.backward(loss / accumulation)
        losses.append(loss.detach())
        total = total + loss.detach().float() / accumulation
    kill_point("mid-step")
    scale = job.scorer.logit_scale.detach().exp()
    terms = {"loss": total, "logit_scale": scale}
    return loop.finish_step(ctx, [(job.model, job.optimizer)], losses, terms, step)


@torch.no_grad()
def validate(job: Job) -> dict[str, float]:
    """Contrastive loss and in-chunk image -> caption accuracy on the validation images, in
    chunks of --batch-size (EMA weights if enabled). Every rank computes all of it."""
    scorer, args, device = job.scorer, job.ctx.args, job.ctx.accelerator.device
    scorer.eval()
    losses, correct, count = [], 0, 0
    with loop.averaged_weights(job.ctx, scorer):
        for start in range(0, len(job.val), args.batch_size):
            items = [
                job.val[index] for index in range(start, min(start + args.batch_size, len(job.val)))
            ]
            if len(items) < 2:
                continue
            batch = collate(items)
            text = job.text_tokenizer(batch["caption"]).to(device)  # (b, T)
            logits = scorer(batch["image"].to(device), text)  # (b, b)
            losses.append(float(contrastive_loss(logits, text)) * len(items))
            best = logits.argmax(dim=1)  # (b,)
            correct += int((text[best] == text).all(dim=1).sum())
            count += len(items)
    scorer.train()
    if count == 0:
        return {"val_loss": math.nan, "val_accuracy": math.nan}
    return {"val_loss": sum(losses) / count, "val_accuracy": correct / count}


def export(job: Job, folder: Path) -> None:
    """save_pretrained of the (EMA) weights on the main process."""
    if job.ctx.accelerator.is_main_process:
        with loop.averaged_weights(job.ctx, job.scorer):
            job.scorer.save_pretrained(folder)
    job.ctx.accelerator.wait_for_everyone()


def periodic(job: Job, step: int, is_last: bool) -> None:
    """Validation (+ best export) and checkpoint when due."""
    ctx, args = job.ctx, job.ctx.args
    if loop.due(step, args.eval_every, is_last):
        metrics = validate(job)
        ctx.run.log_metrics(step, metrics)
        ctx.run.write_curves(curves.SCORER)
        ctx.run.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if ctx.state.best_metric is None or metrics["val_loss"] < ctx.state.best_metric:
            ctx.state.best_metric, ctx.state.best_step = metrics["val_loss"], step
            export(job, Path(args.output_dir) / "best")
    if args.checkpoint_every and loop.due(step, args.checkpoint_every, is_last):
        loop.checkpoint(ctx, [job.scorer], {})


def prepare(job: Job, restored: dict) -> None:
    """This rank's batches from the restored step on (no extra tensors in a checkpoint)."""
    ctx = job.ctx
    job.batches = step_batches(ctx.args, ctx.accelerator, ctx.state.step, job.train, collate)


def train(args: argparse.Namespace) -> Job:
    """Train, then export OUTPUT/final; returns the job (model, state) for callers and tests."""
    steps = (train_step, periodic)
    return loop.run_job(args, "train_scorer", setup, prepare, steps, export, "validation loss")


def main(args: argparse.Namespace) -> Path:
    """Run the job; returns the exported OUTPUT/final folder."""
    train(args)
    return Path(args.output_dir) / "final"


if __name__ == "__main__":
    main(parse_args())
