"""The parts of a training job that both jobs share: common flags, the resumable train state,
checkpoint writing/restoring around `common.checkpoint`, and the step loop with its progress bar.

A job supplies a `step_fn(step) -> dict of floats` (one optimizer step, already agreed across
ranks) and a `periodic_fn(step)` (validation, images, checkpoints); the loop owns the step
counter, the wall-clock budget and the tqdm bar.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from codegrid.io import config_from_dict
from common.budget import StepBudget
from common.checkpoint import CHECKPOINTS, load_latest_checkpoint, save_checkpoint
from common.ema import EMA
from common.guards import NonFiniteGuard, assert_finite_weights, locally_nonfinite, reduce_step
from common.run_folder import RunFolder, make_accelerator
from common.validation import (
    require_choice,
    require_fraction,
    require_non_negative,
    require_positive,
    require_steps,
)

MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "none")


def add_common_arguments(parser: argparse.ArgumentParser, learning_rate: float) -> None:
    """Flags shared by both training jobs (output, schedule, precision, checkpoints, ...)."""
    add = parser.add_argument
    # fmt: off
    add("--output-dir", type=Path, required=True, help="run folder: args.json, train.log, "
        "metrics.jsonl, curves.png, tensorboard/, checkpoints/, images/, best/ and final/ exports")
    add("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    add("--batch-size", type=int, default=64, help="samples per process per micro-batch; the "
        "global batch is batch-size x processes x gradient-accumulation-steps")
    add("--learning-rate", type=float, default=learning_rate, help="peak learning rate")
    add("--warmup-steps", type=int, default=100, help="linear LR warmup steps")
    add("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of the peak")
    add("--max-steps", type=int, default=None, help="optimizer steps (caps the budget's count)")
    add("--time-budget-minutes", type=float, default=None, help="wall-clock budget: after ~40 "
        "steps the step time fixes the total step count (and the LR schedule) so the run ends "
        "in time, re-planned 3 times from the pace since the last plan; the count is stored in "
        "checkpoints, and --resume keeps it")
    add("--min-steps", type=int, default=None, help="with --time-budget-minutes: train at least "
        "this many steps when the budget's count is lower, as far as --time-limit-minutes allows "
        "(for a stage that needs a number of steps to be useful on a slow machine)")
    add("--time-limit-minutes", type=float, default=None, help="hard wall-clock cap for "
        "--min-steps, >= --time-budget-minutes (default: the budget itself, so no stretching)")
    add("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    add("--mixed-precision", default=None, help=f"one of {MIXED_PRECISION}; bf16 for GPUs. "
        "Default: `accelerate launch --mixed_precision` or the accelerate config, else fp32")
    add("--cpu", action="store_true", help="force the CPU even if a GPU is present")
    add("--num-threads", type=int, default=0, help="torch CPU threads per process (0 = torch's "
        "default; on a busy machine 1 can be several times faster than oversubscribed 2)")
    add("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    add("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip (0 disables)")
    add("--ema-decay", type=float, default=0.0, help="EMA of weights, e.g. 0.999 (0 = off); "
        "evaluation and exports then use the averaged weights")
    add("--checkpoint-every", type=int, default=0, help="save a checkpoint every N steps and "
        "at the end (0 = never)")
    add("--keep-checkpoints", type=int, default=2, help="keep the newest K checkpoints")
    add("--resume", action="store_true", help="continue from the newest complete checkpoint "
        "in --output-dir (a corrupt one is skipped with a warning); starts fresh if none")
    add("--eval-every", type=int, default=0, help="validate every N steps and at the end "
        "(0 = only at the end)")
    add("--image-every", type=int, default=0, help="write an image grid every N steps and at "
        "the end (0 = only at the end)")
    add("--log-every", type=int, default=10, help="write training metrics every N steps")
    add("--max-nonfinite-steps", type=int, default=10, help="stop after N non-finite steps in "
        "a row (each is skipped and counted; 0 = never stop)")
    add("--report-to", default="tensorboard", help=f"one of {REPORT_TO}")
    add("--no-progress", action="store_true", help="hide the tqdm progress bar")
    # fmt: on


def validate_common_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the flag, its value and the allowed values."""
    require_positive(args, "batch_size", "learning_rate", "max_steps", "time_budget_minutes")
    require_positive(args, "min_steps", "time_limit_minutes")
    require_positive(args, "gradient_accumulation_steps", "keep_checkpoints", "log_every")
    require_non_negative(args, "warmup_steps", "max_grad_norm", "checkpoint_every", "eval_every")
    require_non_negative(args, "image_every", "max_nonfinite_steps", "num_workers", "num_threads")
    require_fraction(args, "min_lr_ratio")
    require_fraction(args, "ema_decay", upper_open=True)
    if args.mixed_precision is not None:
        require_choice(args, "mixed_precision", MIXED_PRECISION)
    require_choice(args, "report_to", REPORT_TO)
    require_steps(args)


@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint stores as JSON besides accelerate's state and the tensors."""

    step: int = 0
    total_steps: int | None = None
    best_metric: float | None = None
    best_step: int | None = None
    ema_updates: int = 0
    overflow_steps: int = 0  # fp16 steps in which the GradScaler skipped an optimizer
    nonfinite: dict[str, int] = dataclasses.field(default_factory=dict)
    job: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    """The objects every helper of a job needs."""

    args: argparse.Namespace
    accelerator: Accelerator
    run: RunFolder
    budget: StepBudget
    guard: NonFiniteGuard
    ema: EMA | None
    ema_model: torch.nn.Module | None = None
    state: TrainState = dataclasses.field(default_factory=TrainState)
    last_checkpoint: str | None = None

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.args.output_dir) / CHECKPOINTS


def make_context(args, accelerator, run, ema_model: torch.nn.Module | None) -> Context:
    """Budget, guard and (if --ema-decay > 0) the EMA of `ema_model` (the unwrapped model)."""
    budget = StepBudget(
        args.time_budget_minutes,
        args.max_steps,
        started=run.started,
        min_steps=args.min_steps,
        limit_minutes=args.time_limit_minutes,
    )
    ema = EMA(ema_model, args.ema_decay) if args.ema_decay > 0 and ema_model is not None else None
    guard = NonFiniteGuard(args.max_nonfinite_steps)
    return Context(args, accelerator, run, budget, guard, ema, ema_model)


def averaged_weights(ctx: Context, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Run `model` (unwrapped) with its EMA weights inside the block when --ema-decay > 0."""
    return ctx.ema.swapped(model) if ctx.ema is not None else contextlib.nullcontext()


def restore(ctx: Context) -> dict[str, torch.Tensor]:
    """With --resume, load the newest complete checkpoint; returns its extra tensors ({} when
    there is none)."""
    if not ctx.args.resume:
        return {}
    loaded = load_latest_checkpoint(ctx.accelerator, ctx.checkpoint_root, ctx.run.logger)
    if loaded is None:
        ctx.run.info(f"--resume: no checkpoint under {ctx.checkpoint_root}; starting from step 0")
        return {}
    folder, values, tensors = loaded
    ctx.state = config_from_dict(TrainState, values, source=f"{folder}/trainer_state.json")
    total = ctx.state.total_steps
    if ctx.args.time_budget_minutes is None and total is not None and ctx.args.max_steps != total:
        ctx.run.warning(
            f"--max-steps {ctx.args.max_steps} replaces the checkpoint's total of "
            f"{total} steps: the LR schedule is stretched from here on"
        )
        total = ctx.args.max_steps
    ctx.budget.restore(total)
    ctx.guard.load_state_dict(ctx.state.nonfinite)
    if ctx.ema is not None:
        ctx.ema.load_state_tensors(tensors, ctx.state.ema_updates)
    ctx.last_checkpoint = str(folder)
    ctx.run.truncate_metrics(ctx.state.step)
    ctx.run.info(f"resumed from {folder} at step {ctx.state.step}")
    return tensors


def checkpoint(
    ctx: Context, models: list[torch.nn.Module], tensors: dict[str, torch.Tensor]
) -> None:
    """Write a checkpoint of the current step (weights are checked finite first)."""
    for model in models:
        assert_finite_weights(model, f"checkpoint step {ctx.state.step}")
    ctx.state.total_steps = ctx.budget.total_steps
    ctx.state.nonfinite = ctx.guard.state_dict()
    extra = dict(tensors)
    if ctx.ema is not None:
        ctx.state.ema_updates = ctx.ema.num_updates
        extra.update(ctx.ema.state_tensors())
    folder = save_checkpoint(
        ctx.accelerator,
        ctx.checkpoint_root,
        ctx.state.step,
        dataclasses.asdict(ctx.state),
        extra,
        keep_last=ctx.args.keep_checkpoints,
    )
    ctx.last_checkpoint = str(folder)
    ctx.run.info(f"checkpoint {folder}")


def due(step: int, every: int, is_last: bool) -> bool:
    """True every `every` steps and at the last step."""
    return is_last or (every > 0 and step % every == 0)


def learning_rate_total(ctx: Context) -> int:
    """The step count the LR schedule spans (max-steps while the budget is still measuring)."""
    return ctx.budget.current_total(ctx.args.max_steps or 10**9)


def log_budget(ctx: Context) -> None:
    """One line for the budget's count when it is fixed or re-planned."""
    budget = ctx.budget
    seconds, total = budget.seconds_per_step, budget.total_steps
    if budget.replanned_from is not None:
        ctx.run.info(
            f"time budget re-planned at step {ctx.state.step}: {seconds:.3f} s/step since the "
            f"last plan -> {total} steps in total (was {budget.replanned_from})"
        )
        return
    floor, limit = budget.min_steps, budget.limit / 60
    ctx.run.info(
        f"time budget {ctx.args.time_budget_minutes} min: {seconds:.3f} s/step -> {total} steps "
        "in total" + (f" (--min-steps {floor}, limit {limit:g} min)" if floor else "")
    )


def train_loop(
    ctx: Context,
    step_fn: Callable[[int], dict[str, float]],
    periodic_fn: Callable[[int, bool], None],
) -> None:
    """Run steps until the total is reached; `periodic_fn(step, is_last)` runs after each."""
    bar = tqdm(
        total=ctx.budget.total_steps,
        initial=ctx.state.step,
        dynamic_ncols=True,
        disable=ctx.args.no_progress or not ctx.accelerator.is_main_process,
    )
    interval = (ctx.state.step, time.monotonic())  # throughput since the last metrics line
    while ctx.state.step < ctx.budget.current_total(ctx.args.max_steps or math.inf):
        metrics = step_fn(ctx.state.step)
        ctx.state.step += 1
        if ctx.budget.observe(ctx.state.step, ctx.accelerator):
            bar.total = ctx.budget.total_steps
            log_budget(ctx)
        step = ctx.state.step
        if step % ctx.args.log_every == 0 or step == 1:
            rate = (step - interval[0]) / max(time.monotonic() - interval[1], 1e-9)
            interval = (step, time.monotonic())
            totals = {"nonfinite_total": ctx.guard.total, "steps_per_second": rate}
            if "overflow" in metrics:
                totals["overflow_total"] = ctx.state.overflow_steps
            ctx.run.log_metrics(step, {**metrics, **totals})
        bar.update(1)
        bar.set_postfix({key: f"{metrics[key]:.4f}" for key in list(metrics)[:2]}, refresh=False)
        periodic_fn(step, step >= ctx.budget.current_total(ctx.args.max_steps or math.inf))
    bar.close()


def step_pairs(
    accelerator: Accelerator,
    pairs: list[tuple[torch.nn.Module, AcceleratedOptimizer]],
    max_grad_norm: float,
) -> None:
    """Clip (if max_grad_norm > 0) and step each (model, optimizer) pair from `prepare()`.

    Under fp16 all pairs share one GradScaler, and each AcceleratedOptimizer.step ends with
    scaler.update(), which may change the scale and forgets which optimizers were unscaled. So
    each optimizer is unscaled alone (accelerator.clip_grad_norm_ would unscale all of them, and
    the second pair's gradients again after the first update), and every pair but the last
    steps through scaler.step, leaving the one update to the last: PyTorch's AMP recipe for
    several optimizers (one scaler.step each, then one scaler.update()). The clip is
    torch's, so this suits DDP and single processes (what these jobs launch), not FSDP or
    DeepSpeed, whose accelerate clip paths differ; the scaler.step path assumes manual
    accumulation (sync_gradients stays True), as both jobs do.
    """
    scaler = accelerator.scaler  # None unless fp16 on an accelerator
    for index, (model, optimizer) in enumerate(pairs):
        if max_grad_norm > 0:
            accelerator.unscale_gradients(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if scaler is not None and index < len(pairs) - 1:
            scaler.step(optimizer.optimizer)
        else:
            optimizer.step()


def finish_step(
    ctx: Context,
    pairs: list[tuple[torch.nn.Module, AcceleratedOptimizer]],
    losses: list[torch.Tensor],
    terms: dict[str, Any],
    step: int,
    on_success: Callable[[], None] | None = None,
    on_skip: Callable[[], None] | None = None,
) -> dict[str, float]:
    """After the backward passes of `step`: skip it on every rank if any rank saw a non-finite
    loss or gradient, else clip and step each (model, optimizer) pair and update the EMA.

    Returns the step's metrics averaged over ranks, plus lr, whether it was skipped and, under
    fp16, whether the GradScaler skipped an optimizer for overflowing gradients ("overflow";
    the weight EMA is then not updated, also when only the discriminator overflowed and the
    generator did step: one missed EMA update costs less than averaging in a skipped one).
    Raises NonFiniteLossError after --max-nonfinite-steps skips in a row; overflows do not
    count, since the scaler backs off and goes on by design.
    """
    args, accelerator = ctx.args, ctx.accelerator
    # With fp16 the GradScaler already skips steps whose gradients overflow; check only losses.
    scaler = accelerator.scaler
    params = [p for model, _ in pairs for p in model.parameters()] if scaler is None else []
    skipped, metrics = reduce_step(accelerator, locally_nonfinite(losses, params), terms)
    overflow = False
    if skipped:
        if on_skip is not None:
            on_skip()
    else:
        scale = scaler.get_scale() if scaler is not None else None
        step_pairs(accelerator, pairs, args.max_grad_norm)
        # GradScaler.update() lowers the scale exactly when some optimizer found an inf/NaN
        # gradient and skipped its step. The forward was finite, so buffers it updated in
        # place (codebook statistics) stay; only the weight EMA waits for a real step.
        overflow = scale is not None and scaler.get_scale() < scale
        ctx.state.overflow_steps += int(overflow)
        if ctx.ema is not None and not overflow:
            ctx.ema.update(ctx.ema_model)
        if on_success is not None:
            on_success()
    for _, optimizer in pairs:
        optimizer.zero_grad(set_to_none=True)
    ctx.guard.record(skipped, step + 1, ctx.last_checkpoint)
    lr = pairs[0][1].param_groups[0]["lr"]
    step_metrics = {**metrics, "lr": lr, "skipped": float(skipped)}
    return step_metrics | ({"overflow": float(overflow)} if scaler is not None else {})


def run_job(
    args: argparse.Namespace,
    name: str,
    setup: Callable,
    prepare: Callable,
    steps: tuple[Callable, Callable],
    export: Callable,
    metric: str,
) -> Any:
    """Every training job's top level: accelerator, seed and run folder `name`; `setup(args,
    accelerator, run)` builds the job, `prepare(job, restored)` gets the tensors a resumed
    checkpoint carried beyond the models, `steps` = (train_step, periodic) take the job first;
    then `export(job, OUTPUT/final)`. Returns the job (models, state) for callers and tests."""
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    run = RunFolder(accelerator, args, name)
    try:
        job = setup(args, accelerator, run)
        prepare(job, restore(job.ctx))
        train_step, periodic = steps
        train_loop(job.ctx, partial(train_step, job), partial(periodic, job))
        final = Path(args.output_dir) / "final"
        export(job, final)
        run.info(
            f"done at step {job.ctx.state.step}; exported {final} (best {metric} "
            f"{job.ctx.state.best_metric} at step {job.ctx.state.best_step})"
        )
        return job
    finally:
        run.close()
