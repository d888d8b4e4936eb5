r"""Train the GPT prior (stage 2) on image codes extracted by scripts/extract_codes.py.

    python scripts/train_prior.py --codes codes/ --image-tokenizer runs/vqgan/final \
        --output-dir runs/prior --time-budget-minutes 5
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no scripts/train_prior.py --codes codes/ --output-dir runs/prior ...

The codes carry the identity (config and weights sha256) of the image tokenizer that made them;
with --image-tokenizer, codes of any other tokenizer are refused, and a resumed run refuses
codes other than those it started on. Without --text-tokenizer a SentencePiece BPE model is
trained on the training captions and saved in the run folder. Captions are replaced by the null
caption with probability --caption-dropout (classifier-free guidance). AdamW without weight
decay on norms, biases and embeddings, gradient clipping, warmup + cosine. metrics.jsonl gets
the training loss and the validation loss in nats per image token; images/ gets a sample grid
of fixed prompts (decoded with --image-tokenizer, else the code ids as colours). Exports:
OUTPUT/final/prior and OUTPUT/final/text_tokenizer (save_pretrained folders), and
OUTPUT/final/image_tokenizer_identity.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import curves, loop
from common import validation as checks
from common.code_features import matte_features, matte_groups, mean_decoded_patches
from common.evaluation import image_token_loss
from common.faults import fires, kill_point
from common.help import HelpFormatter
from common.images import codes_to_images, save_png, tensor_grid
from common.optim import adamw
from common.run_folder import RunFolder
from common.sampler import StepSampler, record_indices
from common.schedule import set_learning_rate, warmup_cosine

from pipelines.data.codes import load_codes, read_codes_meta
from pipelines.data.decode import DataReport
from prior import PRESETS, Prior, PriorConfig, TextTokenizer, drop_captions, generate
from prior.model import TEXT_ATTENTION

IDENTITY_FILE = "image_tokenizer_identity.json"
CODE_FEATURES = ("none", "patches", "matte")
TEXT_TOKENIZER_DIR = "text_tokenizer"
ARCHITECTURE_FLAGS = (
    "d_model",
    "num_layers",
    "num_heads",
    "dropout",
    "text_loss_weight",
    "tie_image_embeddings",
    "text_attention",
)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the job, each with its --help text."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    loop.add_common_arguments(parser, learning_rate=6e-3)
    add = parser.add_argument
    # fmt: off
    add("--codes", type=Path, required=True, help="an --out folder of scripts/extract_codes.py")
    add("--image-tokenizer", type=Path, default=None, help="the VQGAN folder that made the "
        "codes: its identity is checked and sample grids are decoded with it")
    add("--text-tokenizer", type=Path, default=None, help="a TextTokenizer folder, a local HF "
        "tokenizer folder or a .model file (default: train SentencePiece on the captions)")
    add("--text-vocab-size", type=int, default=512, help="vocabulary of a trained tokenizer")
    add("--text-model-type", default="bpe", help="'bpe' or 'unigram' for a trained tokenizer")
    add("--text-length", type=int, default=20, help="text tokens per caption incl. BOS/EOS")
    add("--preset", default="cpu-tiny", help=f"prior preset, one of {sorted(PRESETS)}")
    add("--d-model", type=int, default=None, help="width (default: the preset's)")
    add("--num-layers", type=int, default=None, help="blocks (default: the preset's)")
    add("--num-heads", type=int, default=None, help="attention heads (default: the preset's)")
    add("--dropout", type=float, default=None, help="dropout (default: the preset's)")
    add("--tie-image-embeddings", action=argparse.BooleanOptionalAction, default=None,
        help="image head = the image embedding's code rows (default: the preset's; cpu-tiny ties)")
    add("--text-attention", choices=TEXT_ATTENTION, default=None, help="'causal': a text token "
        "attends to the ones before it (GPT); 'self': to itself only, so each word reaches the "
        "image positions unmixed, which composed held-out colour-shape pairs somewhat better on "
        "Shapes (docs/experiments.md; default: the preset's)")
    add("--text-loss-weight", type=float, default=None, help="0 (default) skips the text "
        "logits entirely, which keeps the step lean; DALL-E used 1/8")
    add("--code-features", choices=CODE_FEATURES, default="none", help="embed each code also "
        "by what it looks like decoded (needs --image-tokenizer): 'matte', its outline and its "
        "colours as separate groups, so outlines carry over between colours (the demo's); "
        "'patches', its mean patch through one MLP; 'none', free embedding rows only. Both "
        "help a prior compose colours and shapes it never saw together (docs/experiments.md)")
    add("--caption-dropout", type=float, default=0.1, help="null-caption probability (CFG)")
    add("--weight-decay", type=float, default=0.05, help="AdamW decay of matrices only")
    add("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    add("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    add("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    add("--gradient-checkpointing", action="store_true", help="recompute block activations "
        "in the backward pass (less memory, ~30%% more compute)")
    add("--num-val-samples", type=int, default=1000, help="held-out rows used for the "
        "validation loss (from the 'validation' split, else carved out of train)")
    add("--sample-prompts", nargs="+", default=None, help="prompts of the sample grid "
        "(default: the first --num-sample-prompts validation captions)")
    add("--num-sample-prompts", type=int, default=8, help="prompts in the sample grid")
    add("--guidance-scale", type=float, default=1.5, help="CFG scale of the sample grid")
    add("--record-sample-indices", action="store_true", help="debug: append the sample "
        "indices each rank trains on to OUTPUT/samples-rank<R>.txt (used by the DDP test)")
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
    checks.require_choice(args, "preset", PRESETS)
    checks.require_choice(args, "text_model_type", ("bpe", "unigram"))
    checks.require_positive(args, "adam_epsilon", "text_vocab_size", "num_val_samples")
    checks.require_positive(args, "d_model", "num_layers", "num_heads", "num_sample_prompts")
    checks.require_non_negative(args, "weight_decay", "guidance_scale", "text_loss_weight")
    checks.require_fraction(args, "caption_dropout")
    if args.text_length < 3:
        raise ValueError(
            f"--text-length={args.text_length} is invalid; allowed: an integer >= 3 (BOS and EOS "
            "take 2 tokens, plus at least 1 caption token)"
        )
    if args.code_features != "none" and args.image_tokenizer is None:
        raise ValueError(
            f"--code-features={args.code_features} decodes the codes and needs --image-tokenizer "
            "(the folder that made them); pass it or use --code-features none"
        )


@dataclasses.dataclass
class Job:
    """Everything the step, evaluation and checkpoint helpers use."""

    ctx: loop.Context
    model: Any  # Prior, possibly wrapped by DDP
    optimizer: Any
    text_tokenizer: TextTokenizer
    train: tuple[torch.Tensor, torch.Tensor]  # text ids (N, T), codes (N, h, w)
    val: tuple[torch.Tensor, torch.Tensor]
    prompts: list[str]
    sampler: StepSampler | None = None
    image_tokenizer: Any = None

    @property
    def prior(self) -> Prior:
        return self.ctx.accelerator.unwrap_model(self.model)


def expected_identity(args: argparse.Namespace, run: RunFolder) -> tuple[dict | None, Any]:
    """(identity the codes must match, the loaded image tokenizer or None). A resumed run also
    insists on the identity it started with."""
    identity, tokenizer = None, None
    if args.image_tokenizer is not None:
        from extract_codes import load_image_tokenizer

        tokenizer = load_image_tokenizer(str(args.image_tokenizer))
        identity = tokenizer.identity()
    saved = Path(args.output_dir) / IDENTITY_FILE
    if args.resume and saved.is_file():
        started = json.loads(saved.read_text())
        if identity is not None and identity != started:
            raise ValueError(
                f"--image-tokenizer {args.image_tokenizer} is not the tokenizer this run started "
                f"with ({saved}); resume with the same tokenizer and codes, or use a new "
                "--output-dir"
            )
        identity = started
    return identity, tokenizer


def load_splits(args: argparse.Namespace, run: RunFolder, identity: dict | None) -> tuple:
    """(train dataset, validation dataset) of extracted codes; refuses another tokenizer's."""
    meta = read_codes_meta(args.codes)
    train = load_codes(args.codes, "train", expected_identity=identity)
    if "validation" in meta["splits"]:
        val = load_codes(args.codes, "validation", expected_identity=identity)
        val = val.select(range(min(len(val), args.num_val_samples)))
    else:
        order = np.random.default_rng(args.seed).permutation(len(train))
        held = min(args.num_val_samples, len(train) // 10)
        run.warning(f"{args.codes} has no validation split; holding out {held} training rows")
        val, train = train.select(sorted(order[:held])), train.select(sorted(order[held:]))
    if run.is_main and not (Path(args.output_dir) / IDENTITY_FILE).is_file():
        (Path(args.output_dir) / IDENTITY_FILE).write_text(json.dumps(meta["tokenizer"], indent=2))
    run.info(
        f"codes: {len(train)} train / {len(val)} validation rows, grid "
        f"{meta['latent_shape']}, codebook {meta['codebook_size']}, tokenizer {meta['tokenizer']}"
    )
    for split, values in meta["splits"].items():  # what extraction skipped, for the run log
        run.info(f"extraction report ({split}): {DataReport.from_dict(values['report']).summary()}")
    return train, val, meta


def text_tokenizer_for(args: argparse.Namespace, accelerator, captions: list[str]) -> TextTokenizer:
    """--text-tokenizer, the run's saved one (on resume), or SentencePiece trained on the
    captions by the main process and saved to OUTPUT/text_tokenizer."""
    if args.text_tokenizer is not None:
        return TextTokenizer.from_pretrained(args.text_tokenizer, text_length=args.text_length)
    folder = Path(args.output_dir) / TEXT_TOKENIZER_DIR
    if accelerator.is_main_process and not (args.resume and folder.is_dir()):
        options = dict(text_length=args.text_length, model_type=args.text_model_type)
        TextTokenizer.train(captions, args.text_vocab_size, **options).save_pretrained(folder)
    accelerator.wait_for_everyone()
    return TextTokenizer.from_pretrained(folder)


def to_tensors(dataset: Any, tokenizer: TextTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(text ids (N, T) long, codes (N, h, w) long), held in memory: codes are small."""
    codes = dataset.with_format("torch", columns=["codes"])[:]["codes"].long()  # (N, h, w)
    return tokenizer(list(dataset["caption"])), codes


def build_prior(
    args: argparse.Namespace,
    meta: dict,
    tokenizer: TextTokenizer,
    features: torch.Tensor | None = None,
    groups: tuple[int, ...] = (),
) -> Prior:
    """The prior sized for these codes and this text tokenizer, with `features` (V, F) as its
    code features when given, embedded in `groups` (PriorConfig.code_feature_groups)."""
    overrides = {
        name: getattr(args, name) for name in ARCHITECTURE_FLAGS if getattr(args, name) is not None
    }
    overrides.update(
        codebook_size=int(meta["codebook_size"]), image_grid=tuple(meta["latent_shape"])
    )
    text = dict(text_vocab_size=tokenizer.vocab_size, text_length=tokenizer.text_length)
    if features is not None:
        overrides.update(code_feature_dim=features.shape[1], code_feature_groups=groups)
    config = PriorConfig.from_preset(args.preset, text_pad_id=tokenizer.pad_id, **text, **overrides)
    model = Prior(config)
    if features is not None:
        model.code_features.features.copy_(features)
    model.gradient_checkpointing = args.gradient_checkpointing
    return model


def setup(args: argparse.Namespace, accelerator, run: RunFolder) -> Job:
    """Codes, text tokenizer, prior and optimizer, prepared by accelerate."""
    identity, image_tokenizer = expected_identity(args, run)
    train, val, meta = load_splits(args, run, identity)
    tokenizer = text_tokenizer_for(args, accelerator, list(train["caption"]))
    if hasattr(image_tokenizer, "to"):  # an nn.Module; other ImageTokenizer kinds may not be
        image_tokenizer = image_tokenizer.to(accelerator.device).eval()
    data = to_tensors(train, tokenizer), to_tensors(val, tokenizer)
    features, groups = None, ()
    if args.code_features != "none":
        codes = data[0][1]  # (N, h, w) training codes
        size, device = int(meta["codebook_size"]), accelerator.device
        if args.code_features == "patches":
            features = mean_decoded_patches(image_tokenizer, codes, size, device)
        else:
            features = matte_features(image_tokenizer, codes, size, device)
            groups = matte_groups(features.shape[1])
        run.info(f"code features: {args.code_features} over {len(codes)} training grids")
    model = build_prior(args, meta, tokenizer, features, groups)
    adam = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    optimizer = adamw(model, args.learning_rate, args.weight_decay, **adam)
    model, optimizer = accelerator.prepare(model, optimizer)
    ctx = loop.make_context(args, accelerator, run, accelerator.unwrap_model(model))
    run.info(
        f"{tokenizer}; prior {accelerator.unwrap_model(model).config}, "
        f"{accelerator.unwrap_model(model).num_parameters()} parameters"
    )
    prompts = args.sample_prompts or list(val["caption"][: args.num_sample_prompts])
    return Job(ctx, model, optimizer, tokenizer, *data, prompts, image_tokenizer=image_tokenizer)


def micro_batch(job: Job, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (text ids, codes) of micro-batch `micro` of `step`, with caption dropout.

    The dropout draw is made for the step's whole global batch from a generator seeded by
    (seed, step) and sliced where this rank's rows sit in it, so a sample's draw does not depend
    on the number of processes or accumulation steps, and a resumed run redraws it exactly
    (there is no generator state to save)."""
    args, accelerator, sampler = job.ctx.args, job.ctx.accelerator, job.sampler
    indices, _ = sampler.indices(step, micro)
    if args.record_sample_indices:
        record_indices(args.output_dir, accelerator.process_index, indices)
    text, codes = job.train[0][indices], job.train[1][indices]
    start = (micro * sampler.world_size + sampler.rank) * sampler.batch_size
    rows = text.new_full((sampler.global_batch_size, text.shape[1]), job.text_tokenizer.pad_id)
    rows[start : start + len(text)] = text  # (global batch, T): only this rank's rows matter
    seed = np.random.SeedSequence([args.seed, step]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed))
    null = job.text_tokenizer.null_ids(1)
    text = drop_captions(rows, null, args.caption_dropout, generator)[start : start + len(text)]
    return text.to(accelerator.device), codes.to(accelerator.device)


def train_step(job: Job, step: int) -> dict[str, float]:
    """One optimizer step over the accumulated micro-batches."""
    ctx, args, accelerator = job.ctx, job.ctx.args, job.ctx.accelerator
    accumulation = args.gradient_accumulation_steps
    total = loop.learning_rate_total(ctx)
    factor = warmup_cosine(step, total, args.warmup_steps, args.min_lr_ratio)
    set_learning_rate(job.optimizer, args.learning_rate * factor)
    poisoned, losses, total = fires("nan-loss"), [], 0.0
    for micro in range(accumulation):
        text, codes = micro_batch(job, step, micro)
        sync = micro == accumulation - 1
        with accelerator.no_sync(job.model) if not sync else contextlib.nullcontext():
            with accelerator.autocast():
                loss = job.model(text, codes).loss
            loss = loss * float("nan") if poisoned else loss
            accelerator.backward(loss / accumulation)
        losses.append(loss.detach())
        total = total + loss.detach().float() / accumulation
    kill_point("mid-step")
    return loop.finish_step(ctx, [(job.model, job.optimizer)], losses, {"loss": total}, step)


def validation_loss(job: Job) -> float:
    """Nats per image token on the held-out codes (EMA weights if enabled; all ranks)."""
    args, prior = job.ctx.args, job.prior
    prior.eval()
    with loop.averaged_weights(job.ctx, job.prior):
        loss = image_token_loss(prior, *job.val, job.ctx.accelerator, args.batch_size)
    prior.train()
    return loss


@torch.no_grad()
def sample_grid(job: Job, step: int) -> None:
    """Main process: sample the fixed prompts with CFG and save images/samples-<step>.png."""
    args, prior = job.ctx.args, job.prior
    device = job.ctx.accelerator.device
    text = job.text_tokenizer(job.prompts).to(device)
    null = job.text_tokenizer.null_ids(1).to(device)
    prior.eval()
    with loop.averaged_weights(job.ctx, job.prior):
        codes = generate(
            prior,
            text,
            null_text_ids=null,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator(device).manual_seed(args.seed),
        )
    prior.train()
    if job.image_tokenizer is not None and getattr(job.image_tokenizer, "can_decode", True):
        images = job.image_tokenizer.decode(codes).cpu()
    else:
        images = codes_to_images(codes, prior.config.codebook_size)
    save_png(
        tensor_grid(images, columns=min(8, len(images))),
        Path(args.output_dir) / "images" / f"samples-{step:08d}.png",
    )


def export(job: Job, folder: Path) -> None:
    """save_pretrained of the (EMA) prior and the text tokenizer into folder/prior and
    folder/text_tokenizer, plus the image tokenizer's identity."""
    if job.ctx.accelerator.is_main_process:
        with loop.averaged_weights(job.ctx, job.prior):
            job.prior.save_pretrained(folder / "prior")
        job.text_tokenizer.save_pretrained(folder / TEXT_TOKENIZER_DIR)
        identity = Path(job.ctx.args.output_dir) / IDENTITY_FILE
        (folder / IDENTITY_FILE).write_text(identity.read_text())
    job.ctx.accelerator.wait_for_everyone()


def periodic(job: Job, step: int, is_last: bool) -> None:
    """Validation loss (+ best export), sample grid and checkpoint when due."""
    ctx, args = job.ctx, job.ctx.args
    if loop.due(step, args.eval_every, is_last):
        loss = validation_loss(job)
        ctx.run.log_metrics(step, {"val_loss": loss})
        ctx.run.write_curves(curves.PRIOR)
        ctx.run.info(f"step {step}: validation loss {loss:.4f} nats per image token")
        if ctx.state.best_metric is None or loss < ctx.state.best_metric:
            ctx.state.best_metric, ctx.state.best_step = loss, step
            export(job, Path(args.output_dir) / "best")
    if loop.due(step, args.image_every, is_last) and ctx.accelerator.is_main_process:
        sample_grid(job, step)
    if args.checkpoint_every and loop.due(step, args.checkpoint_every, is_last):
        loop.checkpoint(ctx, [job.prior], {})


def prepare(job: Job, restored: dict) -> None:
    """The sampler of this rank's batches (the prior's checkpoints carry no extra tensors)."""
    args, accelerator = job.ctx.args, job.ctx.accelerator
    job.sampler = StepSampler(
        len(job.train[1]),
        args.batch_size,
        accumulation=args.gradient_accumulation_steps,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=args.seed,
    )


def train(args: argparse.Namespace) -> Job:
    """Train, then export OUTPUT/final; returns the job (models, state) for callers and tests."""
    steps = (train_step, periodic)
    return loop.run_job(args, "train_prior", setup, prepare, steps, export, "validation loss")


def main(args: argparse.Namespace) -> Path:
    """Run the job; returns the exported OUTPUT/final folder."""
    train(args)
    return Path(args.output_dir) / "final"


if __name__ == "__main__":
    main(parse_args())
