r"""Train the VQGAN image tokenizer (stage 1) on Shapes, an image folder or a `datasets` dataset.

    python scripts/train_tokenizer.py --output-dir runs/vqgan --time-budget-minutes 5
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no scripts/train_tokenizer.py --output-dir runs/vqgan --max-steps 2000

Plain VQ-VAE (van den Oord et al. 2017): --disc-weight 0 --perceptual-weight 0 --quantizer vq
--no-l2-normalize --no-restart.

Losses (taming, Esser et al. 2021): L1/L2 reconstruction + perceptual (LPIPS) + quantizer loss,
and from --disc-start a PatchGAN trained with hinge loss; after --disc-warmup-steps more its
adversarial term enters the generator loss with taming's adaptive weight, optionally with LeCam
regularisation (Tseng et al. 2021). Outputs: OUTPUT/final and OUTPUT/best (VQGAN
save_pretrained folders), checkpoints, metrics.jsonl (train losses, lr, codebook usage and
perplexity; val PSNR and usage), TensorBoard, train.log and reconstruction grids in images/.
On `accelerate launch --cpu --num_processes 2`: that runs ONE process; use --multi_gpu as above.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from common import curves, loop
from common import validation as checks
from common.data import load_image_splits, step_batches
from common.evaluation import reconstruction_metrics
from common.faults import fires, kill_point
from common.guards import StateSnapshot
from common.help import HelpFormatter
from common.images import save_png, tensor_grid
from common.optim import adamw
from common.run_folder import RunFolder
from common.sampler import record_indices
from common.schedule import set_learning_rate, warmup_cosine
from common.vqgan_objective import VQGANObjective, build_objective

from tokenizer import PRESETS, VQGAN, VQGANConfig
from tokenizer.losses import GAN_LOSSES, NLayerDiscriminator
from tokenizer.modules import NORMS
from tokenizer.quantize import RESTART_SOURCES
from tokenizer.vqgan import ENCODERS

QUANTIZER_FLAGS = {
    "quantizer": "quantizer",
    "codebook_size": "codebook_size",
    "codebook_dim": "codebook_dim",
    "l2_normalize": "l2_normalize",
    "restart": "restart_dead_codes",
    "ema_codebook": "ema",
    "beta": "beta",
    "entropy_weight": "entropy_weight",
    "ch": "ch",
    "ch_mult": "ch_mult",
    "restart_threshold": "restart_threshold",
    "restart_from": "restart_from",
    "fsq_levels": "fsq_levels",
    "mid_attention": "mid_attention",
    "norm": "norm",
    "encoder": "encoder",
    "code_search_candidates": "code_search_candidates",
    "code_search_threshold": "code_search_threshold",
}


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the job, each with its --help text."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    loop.add_common_arguments(parser, learning_rate=1e-3)
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_loss_arguments(parser)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The VQGAN's architecture and quantizer flags; None keeps the preset's value."""
    add, optional = parser.add_argument, argparse.BooleanOptionalAction
    # fmt: off
    add("--preset", default="cpu-tiny", help=f"VQGAN preset, one of {sorted(PRESETS)}")
    add("--ch", type=int, default=None, help="base channel width (default: the preset's)")
    add("--ch-mult", type=_int_tuple, default=None, help="channel multipliers, e.g. 1,2,2 (default: the preset's)")
    add("--mid-attention", action=optional, default=None,
        help="self-attention in the encoder and decoder mid blocks (taming always has it; "
        "default: the preset's)")
    add("--norm", choices=NORMS, default=None,
        help="'group': taming's GroupNorm (32 groups), whose statistics span the whole image; "
        "'layer': GroupNorm with one group, which keeps each channel's mean; 'channel': a "
        "LayerNorm over the channels of each position, so a code depends on its neighbourhood "
        "only; 'none': no normalisation (default: the preset's)")
    add("--encoder", choices=ENCODERS, default=None,
        help="'conv': taming's convolutional encoder (a code sees the whole image); 'patch': a "
        "per-patch MLP, so a code depends on its own f x f patch only (default: the preset's)")
    add("--quantizer", default=None, help="'vq' or 'fsq' (default: the preset's)")
    add("--codebook-size", type=int, default=None, help="number of codes (vq) (default: the preset's)")
    add("--codebook-dim", type=int, default=None, help="code vector size (vq; 8 = LlamaGen) (default: the preset's)")
    add("--fsq-levels", type=_int_tuple, default=None, help="FSQ levels, e.g. 8,6,5 (default: the preset's)")
    add("--l2-normalize", action=optional, default=None,
        help="l2-normalised codebook lookup (ViT-VQGAN/LlamaGen; default: the preset's)")
    add("--restart", action=optional, default=None,
        help="restart dead codes from encoder outputs (default: the preset's)")
    add("--restart-threshold", type=int, default=None, help="steps unused before a restart (default: the preset's)")
    add("--restart-from", choices=RESTART_SOURCES, default=None,
        help="restart dead codes from random encoder outputs or from those farthest from any "
        "code (default: the preset's)")
    add("--ema-codebook", action=optional, default=None,
        help="EMA codebook updates instead of the codebook loss")
    add("--beta", type=float, default=None, help="commitment weight (default 0.25)")
    add("--entropy-weight", type=float, default=None, help="codebook entropy penalty weight (default: the preset's)")
    add("--code-search-candidates", type=int, default=None,
        help="saved with the tokenizer: its encode (code extraction, evaluation) chooses each "
        "code among its R latent-nearest by the error of the decoded image, at about 4R "
        "decodes per batch; training is unchanged; 1 = the nearest code (default: the preset's)")
    add("--code-search-threshold", type=float, default=None,
        help="least fall of the squared error ([-1, 1] units, summed over channels and the 3x3 "
        "codes around it) for the search to swap a code (default: the preset's)")
    # fmt: on


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the images come from and how they are augmented."""
    add = parser.add_argument
    # fmt: off
    add("--data", default="shapes", help="'shapes', an image folder, .tar shards, a "
        "save_to_disk folder or a datasets name (validation split: 'validation' if present)")
    add("--resolution", type=int, default=32, help="image side; a multiple of the downsample "
        "factor")
    add("--num-train-samples", type=int, default=20000, help="Shapes: images to generate; "
        "other data: read only the first N candidates")
    add("--num-val-samples", type=int, default=256, help="validation images")
    add("--flip", action="store_true", help="random horizontal flips of training images")
    add("--channel-shuffle", type=float, default=0.0, help="probability of permuting a training "
        "image's RGB channels (0: off); more colours per shape for the tokenizer, grays kept "
        "(docs/experiments.md)")
    # fmt: on


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """The loss terms (reconstruction, perceptual, GAN), both optimizers' settings and a debug
    flag."""
    add = parser.add_argument
    # fmt: off
    add("--reconstruction", default="l1", help="'l1' (taming) or 'l2'")
    add("--edge-weight", type=float, default=0.0, help="extra weight on the reconstruction "
        "error near edges, e.g. 1 (0: off); sharper small objects (docs/experiments.md)")
    add("--perceptual-weight", type=float, default=1.0, help="LPIPS weight; 0 disables. When "
        "the VGG16 weights are not on disk it is turned off with one log line")
    add("--perceptual-random-backbone", action="store_true", help="LPIPS with a random VGG "
        "trunk (tests only: not a meaningful perceptual distance)")
    add("--disc-weight", type=float, default=0.5, help="GAN weight (x adaptive weight); 0 "
        "trains no discriminator")
    add("--disc-start", type=int, default=20000, help="step at which the discriminator starts")
    add("--disc-warmup-steps", type=int, default=1000, help="discriminator-only steps before "
        "its loss enters the generator loss")
    add("--disc-loss", default="hinge", help=f"one of {GAN_LOSSES}")
    add("--disc-layers", type=int, default=3, help="PatchGAN layers (resolution >= 3 * 2^N)")
    add("--disc-channels", type=int, default=64, help="PatchGAN base channels (taming's ndf)")
    add("--disc-learning-rate", type=float, default=None, help="the discriminator's peak learning "
        "rate (default: --learning-rate)")
    add("--lecam-weight", type=float, default=0.0, help="LeCam regulariser weight, e.g. 0.001")
    add("--adam-beta1", type=float, default=0.9, help="Adam beta1 (both optimizers)")
    add("--adam-beta2", type=float, default=0.95, help="Adam beta2 (LlamaGen's 0.95)")
    add("--adam-epsilon", type=float, default=1e-8, help="Adam epsilon")
    add("--weight-decay", type=float, default=0.0, help="AdamW decay (conv/linear weights only)")
    add("--record-sample-indices", action="store_true", help="debug: append the sample "
        "indices each rank trains on to OUTPUT/samples-rank<R>.txt (used by the DDP test)")
    # fmt: on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the flags (see --help); bad values raise ValueError."""
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag, the value and the allowed values."""
    loop.validate_common_arguments(args)
    checks.require_choice(args, "preset", PRESETS)
    checks.require_choice(args, "reconstruction", ("l1", "l2"))
    checks.require_choice(args, "disc_loss", GAN_LOSSES)
    if args.quantizer is not None:
        checks.require_choice(args, "quantizer", ("vq", "fsq"))
    checks.require_positive(args, "resolution", "num_train_samples", "num_val_samples", "ch")
    checks.require_positive(args, "codebook_size", "codebook_dim", "adam_epsilon")
    checks.require_positive(args, "disc_layers", "disc_channels", "disc_learning_rate")
    checks.require_non_negative(args, "perceptual_weight", "disc_weight", "lecam_weight")
    checks.require_non_negative(args, "edge_weight", "code_search_threshold")
    checks.require_positive(args, "code_search_candidates")
    checks.require_fraction(args, "channel_shuffle")
    checks.require_non_negative(args, "disc_start", "disc_warmup_steps", "weight_decay")
    if args.disc_weight > 0 and args.resolution < 3 * 2**args.disc_layers:
        most = max(1, (args.resolution // 3).bit_length() - 1)
        raise ValueError(
            f"--disc-layers={args.disc_layers} is invalid for --resolution {args.resolution}; "
            f"allowed: at most {most} (or --disc-weight 0)"
        )
    factor = 2 ** (len(args.ch_mult or PRESETS[args.preset].ch_mult) - 1)
    if args.resolution % factor:
        example = factor * (args.resolution // factor + 1)
        raise ValueError(
            f"--resolution={args.resolution} is invalid; allowed: a multiple of the downsample "
            f"factor {factor} of --preset {args.preset}, e.g. {example}"
        )
    model_config(args)  # the flags together (e.g. FSQ with a code search) must form a config


def model_config(args: argparse.Namespace) -> VQGANConfig:
    """The preset with the flags that were given (ValueError names a bad field)."""
    overrides = {
        field: getattr(args, flag)
        for flag, field in QUANTIZER_FLAGS.items()
        if getattr(args, flag) is not None
    }
    return VQGANConfig.from_preset(args.preset, resolution=args.resolution, **overrides)


@dataclasses.dataclass
class Job:
    """Everything the step, evaluation and checkpoint helpers use."""

    ctx: loop.Context
    model: Any  # VQGAN, possibly wrapped by DDP
    opt_g: Any
    opt_d: Any | None
    objective: VQGANObjective
    train: Any
    val: Any
    batches: Any = None
    snapshot: StateSnapshot | None = None

    @property
    def vqgan(self) -> VQGAN:
        return self.ctx.accelerator.unwrap_model(self.model)

    def models(self) -> list[torch.nn.Module]:
        """The unwrapped trained modules (VQGAN, discriminator)."""
        disc = self.objective.disc_module
        return [self.vqgan] + ([disc] if disc is not None else [])


def load_data(args: argparse.Namespace, run: RunFolder) -> tuple[Any, Any]:
    """Train and validation datasets of (3, R, R) images in [-1, 1]; skips are logged."""
    return load_image_splits(args, run, flip=args.flip, channel_shuffle=args.channel_shuffle)


def setup(args: argparse.Namespace, accelerator, run: RunFolder) -> Job:
    """Data, models, losses and optimizers, prepared by accelerate."""
    train, val = load_data(args, run)
    model = VQGAN(model_config(args))
    disc = None
    if args.disc_weight > 0:
        disc = NLayerDiscriminator(ndf=args.disc_channels, n_layers=args.disc_layers)
    adam = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    opt_g = adamw(model, args.learning_rate, args.weight_decay, **adam)
    opt_d = None
    if disc is not None:
        lr_d = args.disc_learning_rate or args.learning_rate
        opt_d = adamw(disc, lr_d, args.weight_decay, **adam)
        disc, opt_d = accelerator.prepare(disc, opt_d)
    model, opt_g = accelerator.prepare(model, opt_g)
    objective = build_objective(args, accelerator, disc, run.warning)
    ctx = loop.make_context(args, accelerator, run, accelerator.unwrap_model(model))
    run.info(f"VQGAN {model_config(args)}; {sum(p.numel() for p in model.parameters())} parameters")
    job = Job(ctx, model, opt_g, opt_d, objective, train, val)
    disc_module = [objective.disc_module] if objective.disc_module is not None else []
    job.snapshot = StateSnapshot(full=[job.vqgan.quantize], buffers_only=disc_module)
    return job


def stack_images(items: list[dict]) -> dict[str, torch.Tensor]:
    """Collate dataset items into {"image": (B, 3, R, R)} (captions are not needed here)."""
    return {"image": torch.stack([item["image"] for item in items])}


def make_batches(job: Job, train: Any) -> Any:
    """An iterator over this rank's micro-batches, starting at the current step."""
    return step_batches(job.ctx.args, job.ctx.accelerator, job.ctx.state.step, train, stack_images)


def _no_sync(accelerator, model, active: bool):
    return accelerator.no_sync(model) if active else contextlib.nullcontext()


def train_step(job: Job, step: int) -> dict[str, float]:
    """One optimizer step of G (and D in the GAN phase) over the accumulated micro-batches."""
    ctx, args, accelerator, objective = job.ctx, job.ctx.args, job.ctx.accelerator, job.objective
    accumulation = args.gradient_accumulation_steps
    total = loop.learning_rate_total(ctx)
    factor = warmup_cosine(step, total, args.warmup_steps, args.min_lr_ratio)
    set_learning_rate(job.opt_g, args.learning_rate * factor)
    disc_on, adversarial = objective.phase(step)
    if disc_on:
        set_learning_rate(job.opt_d, (args.disc_learning_rate or args.learning_rate) * factor)
    job.snapshot.capture()
    poisoned, terms, losses, logits = fires("nan-loss"), {}, [], []
    for micro in range(accumulation):
        batch = next(job.batches)
        if args.record_sample_indices:
            record_indices(args.output_dir, accelerator.process_index, batch["index"])
        images = batch["image"].to(accelerator.device)
        last = micro == accumulation - 1
        with _no_sync(accelerator, job.model, not last):
            loss, fake, step_terms = objective.generator_loss(
                job.model, job.vqgan.get_last_layer(), images, adversarial
            )
            loss = loss * float("nan") if poisoned else loss
            accelerator.backward(loss / accumulation)
        losses.append(loss.detach())
        if disc_on:
            with _no_sync(accelerator, objective.disc, not last):
                d_loss, real_logits, fake_logits, d_terms = objective.discriminator_loss(
                    images, fake
                )
                accelerator.backward(d_loss / accumulation)
            losses.append(d_loss.detach())
            logits.append((real_logits, fake_logits))
            step_terms.update(d_terms)
        for key, value in step_terms.items():
            terms[key] = terms.get(key, 0.0) + value.float() / accumulation
    kill_point("mid-step")
    return _apply_update(job, step, losses, terms, logits, disc_on)


def _apply_update(job: Job, step: int, losses: list, terms: dict, logits: list, disc_on: bool):
    """Step G (and D) unless a rank saw a non-finite value; a skipped step's in-place buffer
    updates (codebook statistics) are undone."""
    pairs = [(job.model, job.opt_g)] + ([(job.objective.disc, job.opt_d)] if disc_on else [])

    def on_success() -> None:
        lecam = job.objective.lecam
        if lecam is not None and logits:
            lecam.update(torch.cat([r for r, _ in logits]), torch.cat([f for _, f in logits]))
        if disc_on and job.ctx.state.job.get("disc_started_at") is None:
            job.ctx.state.job["disc_started_at"] = step

    return loop.finish_step(job.ctx, pairs, losses, terms, step, on_success, job.snapshot.restore)


@torch.no_grad()
def evaluate(job: Job) -> tuple[dict[str, float], torch.Tensor]:
    """Validation PSNR and codebook usage (with the EMA weights if enabled), the usage of the
    training batches since the last validation or checkpoint, and a grid of 8 images above
    their reconstructions."""
    ctx, vqgan, device = job.ctx, job.vqgan, job.ctx.accelerator.device
    train_usage = vqgan.codebook_usage(all_reduce=True)["usage"]
    vqgan.eval()
    with loop.averaged_weights(ctx, vqgan):
        metrics = reconstruction_metrics(vqgan, job.val, ctx.accelerator, ctx.args.batch_size)
        originals = torch.stack([job.val[i]["image"] for i in range(min(8, len(job.val)))])
        grid = torch.cat([originals, vqgan(originals.to(device)).reconstruction.cpu()])
    vqgan.reset_codebook_usage()
    vqgan.train()
    return {**metrics, "train_usage": train_usage}, grid


def export(job: Job, folder: Path) -> None:
    """save_pretrained of the (EMA) weights on the main process."""
    if job.ctx.accelerator.is_main_process:
        with loop.averaged_weights(job.ctx, job.vqgan):
            job.vqgan.save_pretrained(folder)
    job.ctx.accelerator.wait_for_everyone()


def periodic(job: Job, step: int, is_last: bool) -> None:
    """Validation (+ best export), reconstruction grid and checkpoint when due."""
    ctx, args = job.ctx, job.ctx.args
    if loop.due(step, args.eval_every, is_last) or loop.due(step, args.image_every, is_last):
        metrics, grid = evaluate(job)
        ctx.run.log_metrics(step, metrics)
        ctx.run.write_curves(curves.TOKENIZER)
        ctx.run.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if ctx.accelerator.is_main_process and loop.due(step, args.image_every, is_last):
            save_png(
                tensor_grid(grid, columns=max(1, len(grid) // 2)),
                Path(args.output_dir) / "images" / f"reconstruction-{step:08d}.png",
            )
        if ctx.state.best_metric is None or metrics["val_psnr"] > ctx.state.best_metric:
            ctx.state.best_metric, ctx.state.best_step = metrics["val_psnr"], step
            export(job, Path(args.output_dir) / "best")
    if args.checkpoint_every and loop.due(step, args.checkpoint_every, is_last):
        loop.checkpoint(ctx, job.models(), job.objective.state_tensors())
        job.vqgan.reset_codebook_usage()  # train_usage windows then restart exactly on resume


def prepare(job: Job, restored: dict) -> None:
    """The GAN objective's restored tensors (discriminator, LeCam state), then the batches."""
    job.objective.load_state_tensors(restored)
    job.batches = make_batches(job, job.train)


def train(args: argparse.Namespace) -> Job:
    """Train, then export OUTPUT/final; returns the job (models, state) for callers and tests."""
    steps = (train_step, periodic)
    return loop.run_job(args, "train_tokenizer", setup, prepare, steps, export, "val PSNR")


def main(args: argparse.Namespace) -> Path:
    """Run the job; returns the exported OUTPUT/final folder."""
    train(args)
    return Path(args.output_dir) / "final"


if __name__ == "__main__":
    main(parse_args())
