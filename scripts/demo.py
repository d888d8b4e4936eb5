"""The demo: train a tiny tokenizer and prior on 32-pixel Shapes, then sample and evaluate.

    python scripts/demo.py                      # what `make demo` runs; about 9 minutes on 2 cores
    python scripts/demo.py --device cuda        # a larger configuration on a GPU
    python scripts/demo.py --fresh              # start again instead of reusing finished stages

Stages (each a job a user could type; the command is printed before it runs):
  tokenizer  scripts/train_tokenizer.py --preset cpu-tiny on Shapes (32 px -> 8x8 codes)
  codes      scripts/extract_codes.py encodes the Shapes train and validation splits once
  prior      scripts/train_prior.py --preset cpu-tiny on the codes, with caption dropout
  scorer     with --num-candidates > 1 only: scripts/train_scorer.py, the image-caption scorer
             that reranks candidates
  evaluate   scripts/make_pipeline.py, then scripts/evaluate_pipeline.py: a sweep of sampling
             settings on validation prompts (stored as the pipeline defaults; with reranking
             each image is the best of --num-candidates and the likelihood weight is swept
             too), test figures on separate seen and held-out prompts, the judge on the
             tokenizer's own reconstructions of the test renders, tokenizer PSNR and usage
  grid       samples OUT/grid.png for GRID_PROMPTS (4 of them held-out pairs)

Budget (`--budget-minutes`, everything after install; PLANS gives the default and the split,
one for one sample per image and one for reranking): the tokenizer gets a share of it,
stretched on a slow machine to TOKENIZER_MIN_IMAGES images within TOKENIZER_LIMIT_SHARE; the
scorer gets a fixed time; the prior gets what is left after the tokenizer and extraction,
minus the scorer's time and a reserve for pipeline assembly, evaluation and the grid.
Finished stages are recorded in OUT/demo_state.json and reused by the next run (with their
original times) unless --fresh. OUT/metrics.json gathers the figures and the wall time of
every stage.

Precision (`--precision`, default auto): bf16 autocast for both training stages on a GPU or on
a CPU with native bf16 (bf16 matmuls ran about 2.2x faster than fp32 with AVX512-BF16 on an AMD
EPYC, 4.9-5.6x with AMX on an Intel Xeon), fp32 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common.demo_grid import stage_grid as sample_grid
from common.demo_report import build_metrics, print_summary
from common.demo_settings import tokenizer_batch_size, train_settings
from common.demo_state import clear_outputs, load_state, save_state
from common.help import HelpFormatter

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
STAGES = ("tokenizer", "codes", "prior", "scorer", "evaluate", "grid")
# The budget's split with one sample per image (False, the default) and with reranking (True).
# One sample: the tokenizer gets 0.34, not 0.42: without the decoder's mid-block attention
# 2050-2070 tokenizer steps (32.95-32.97 dB) left seen ceilings of 94.5-95.0%, and the prior's
# 2925-2933 steps drew 88.0% and 93.0% of seen test prompts against 85.0-87.5% after 2349-2759
# (docs/experiments.md). Reranking: the scorer stage and the larger evaluation take about 2.6
# minutes, so the budget grows to 9.9 and the tokenizer's share falls to 0.28 (it reached 34.45
# dB with 0.31 of 9.75). Evaluation and grid took 111-117 s with 8 candidates: sampling 16
# candidates for each of 200 prompts took 48-52 s with guidance and 31-34 s without (2 threads,
# AMD EPYC). Two such demo runs drew 82.0% / 58.5% and 87.5% / 39.0% of seen / held-out prompts,
# against 81.0% / 55.0% and 89.0% / 38.5% for one sample from the same priors: on 2 cores the
# time reranking takes from the prior is worth more than the reranking (docs/experiments.md).
PLANS = {
    False: {"budget": 9.5, "tokenizer_share": 0.34, "reserve": 1.25, "scorer": 0.0},
    True: {"budget": 9.9, "tokenizer_share": 0.28, "reserve": 1.9, "scorer": 0.7},
}
# 30 dB took about 1300-1350 steps of 32 images in the demo runs (29.21-29.99 dB after 1066-1260
# steps on slow stretches, 30.22-30.89 dB after 1346-1455; docs/experiments.md): on a slow
# machine the tokenizer may take up to half the budget to see 1400 such batches, and the prior
# gets less. 2000 was tried: one run's ceiling on seen test renders was 88.5% after 2000 steps,
# within the 85.5-95.0% of runs with 1562-2070, and its prior, with 3091 steps instead of about
# 3800, drew 86.5% / 45.0% of seen / held-out prompts all right (docs/experiments.md). The floor
# counts images, so that it means the same at any --tokenizer-batch-size.
TOKENIZER_MIN_IMAGES = 1400 * 32
TOKENIZER_LIMIT_SHARE = 0.5
# Scorer training (the reranking plan's 0.7 minutes): 400 steps of 128 images took 31 s on 2
# threads and reached 94.2% validation accuracy, 800 steps 94.8%; on one draw of 8 candidates
# for the 200 held-out test prompts their picks were all right for 65.0% and 66.5% (one run
# each; docs/experiments.md).
SCORER_BATCH_SIZE = 128
NUM_CANDIDATES = 1
# Sampling settings tried on validation prompts, with reranking (True) and without. Without:
# scale 3 and temperature 1 were the worst settings of every demo sweep so far, and with the
# patch encoder's near-deterministic codes 0.1 and 0.2 beat 0.35. With: the best of 16
# candidates was right for 93.0% of seen validation prompts at temperature 0.5 and 0.35 alike,
# and some candidate was for 87.5% of held-out test prompts at 0.5 (docs/experiments.md).
SWEEPS = {
    True: {"guidance": "1,1.5", "temperature": "0.5"},
    False: {"guidance": "1,1.5,2", "temperature": "0.35,0.2,0.1"},
}
STARTUP_MINUTES = 0.1  # interpreter and import time of a job, outside its own budget


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the demo, each with its --help text; None defaults are resolved by
    parse_args from the plan (one sample or reranking)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add = parser.add_argument
    add("--resolution", type=int, default=32, choices=[32], help="the demo preset is 32 px")
    add(
        "--budget-minutes",
        type=float,
        default=None,
        help=f"total wall clock after install (default: {PLANS[False]['budget']:g}, or "
        f"{PLANS[True]['budget']:g} with reranking)",
    )
    add(
        "--output-dir",
        type=Path,
        default=REPO / "outputs" / "demo",
        help="run folder of all stages (default: outputs/demo in the repository)",
    )
    add(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu (default) or cuda: on cuda the same preset trains with a 64-channel tokenizer, "
        "batch 256, bf16 and 6 loader workers in the same time",
    )
    add(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="training precision. 'auto': bf16 autocast on a GPU and on a CPU with native bf16 "
        "(amx_bf16 or avx512_bf16 in /proc/cpuinfo), whose bf16 matmuls ran 1.4-5.6x faster "
        "than fp32 on this project's machines; fp32 on other CPUs, where bf16 is emulated "
        "(default: auto)",
    )
    add("--seed", type=int, default=0, help="seed of every stage")
    add("--fresh", action="store_true", help="redo every stage")
    for flag in ("--tokenizer-steps", "--prior-steps", "--scorer-steps"):
        add(flag, type=int, default=None, help="cap on optimizer steps (smoke runs)")
    add("--num-train-images", type=int, default=None, help="Shapes training images of both "
        "stages (default: 10000 on cpu, 100000 on cuda)")  # fmt: skip
    add("--tokenizer-batch-size", type=int, default=None, help="tokenizer images per step "
        "(default: 16 on cpu, 256 on cuda)")  # fmt: skip
    add("--prior-batch-size", type=int, default=None, help="prior code grids per step "
        "(default: 16 on cpu, 256 on cuda)")  # fmt: skip
    add("--scorer-batch-size", type=int, default=SCORER_BATCH_SIZE, help="scorer images per step")
    add_evaluation_arguments(parser)
    return parser


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation's prompts, candidates and sweeps."""
    add = parser.add_argument
    add("--num-test-prompts", type=int, default=200, help="seen and held-out, each")
    add("--num-validation-prompts", type=int, default=200, help="prompts of the sweep")
    add("--tokenizer-images", type=int, default=1000, help="validation images for PSNR/usage")
    add(
        "--num-candidates",
        type=int,
        default=NUM_CANDIDATES,
        help="candidates sampled per image, the best kept by the scorer (above 1 adds the "
        "scorer stage; on 2 cores 8 did not pay for the prior time it took, docs/experiments.md)",
    )
    add(
        "--sweep-guidance",
        default=None,
        help=f"guidance scales tried on validation (default: {SWEEPS[True]['guidance']} with "
        f"reranking, {SWEEPS[False]['guidance']} without)",
    )
    add(
        "--sweep-temperature",
        default=None,
        help="temperatures tried with every guidance scale (default: "
        f"{SWEEPS[True]['temperature']} with reranking, {SWEEPS[False]['temperature']} without)",
    )
    add(
        "--sweep-likelihood-weight",
        default="0,0.01,0.03,0.1",
        help="weights of the prior's log-likelihood in the rerank score, tried on each draw "
        "(default: 0,0.01,0.03,0.1)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with the plan's budget and sweeps filled in; bad values exit with usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    reranking = args.num_candidates > 1
    if args.budget_minutes is None:
        args.budget_minutes = PLANS[reranking]["budget"]
    args.sweep_guidance = args.sweep_guidance or SWEEPS[reranking]["guidance"]
    args.sweep_temperature = args.sweep_temperature or SWEEPS[reranking]["temperature"]
    if args.budget_minutes <= 0:
        parser.error(f"--budget-minutes={args.budget_minutes} must be > 0")
    optional = ("tokenizer_steps", "prior_steps", "scorer_steps", "num_train_images")
    sizes = ("tokenizer_batch_size", "prior_batch_size", "scorer_batch_size", "num_candidates")
    for name in (*optional, *sizes):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return args


def settings_key(args: argparse.Namespace) -> dict:
    """What a finished stage depends on; reusing stages made with other settings is refused."""
    names = ("resolution", "device", "seed", "tokenizer_steps", "prior_steps", "scorer_steps")
    names += ("budget_minutes", "num_candidates")
    return {**{name: getattr(args, name) for name in names}, **train_settings(args)}


def job_threads() -> int:
    """Intra-op threads per job: OMP_NUM_THREADS if set, else every core.

    A load-average guess was tried and dropped: the load still counts the previous job for a
    minute, so a demo started right after another job ran at 1 thread and half the speed. On a
    machine that other processes keep busy, set OMP_NUM_THREADS=1: OpenMP threads wait for each
    other at every parallel region, and a descheduled partner made a tokenizer step 5x slower
    (measured on 2 cores at load 6).
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return os.cpu_count() or 1


def run(command: list[str], commands: list[str]) -> None:
    """Print a job's command line, run it with inherited output, fail loudly."""
    line = shlex.join(command)
    threads = job_threads()
    commands.append(line)
    print(f"  $ OMP_NUM_THREADS={threads} {line}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=REPO, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"command failed with exit code {result.returncode}: {line}\n"
            "rerun the demo to resume from the finished stages, or pass --fresh"
        )


def job(script: str, *flags: object) -> list[str]:
    return [sys.executable, str(SCRIPTS / script), *(str(flag) for flag in flags)]


def tokenizer_min_steps(args: argparse.Namespace) -> int:
    """The tokenizer's floor, TOKENIZER_MIN_IMAGES, in steps of the job's batch size."""
    return -(-TOKENIZER_MIN_IMAGES // tokenizer_batch_size(args))


# ------------------------------------------------------------------ the stages
def stage_tokenizer(args, out: Path, minutes: float, commands: list[str]) -> Path:
    """Train the VQGAN on 32-pixel Shapes (8x8 code grid, 1024 codes)."""
    flags = ["--output-dir", out / "tokenizer", "--resolution", args.resolution]
    flags += ["--seed", args.seed, "--time-budget-minutes", f"{minutes:.3f}", "--resume"]
    if args.tokenizer_steps is None:
        limit = max(TOKENIZER_LIMIT_SHARE * args.budget_minutes - STARTUP_MINUTES, minutes)
        flags += ["--min-steps", tokenizer_min_steps(args), "--time-limit-minutes", f"{limit:.3f}"]
    flags += ["--num-train-samples", train_settings(args)["num_train_images"]]
    flags += ["--report-to", "none", *(["--cpu"] if args.device == "cpu" else [])]
    flags += ["--num-val-samples", train_settings(args)["num_validation_images"]]
    if args.tokenizer_steps is not None:
        flags += ["--max-steps", args.tokenizer_steps, "--warmup-steps", "0"]
    run(job("train_tokenizer.py", *train_settings(args)["tokenizer"], *flags), commands)
    return out / "tokenizer" / "final"


def stage_codes(args, out: Path, minutes: float, commands: list[str]) -> Path:
    """Extract the codes of the Shapes train and validation splits."""
    images = train_settings(args)["num_train_images"]
    validation = train_settings(args)["num_validation_images"]
    flags = ["--tokenizer", out / "tokenizer" / "final", "--data", "shapes", "--out", out / "codes"]
    flags += ["--num-samples", images, "--num-validation-samples", validation]
    flags += ["--seed", args.seed, "--batch-size", "256"]
    flags += ["--num-workers", "6"] if args.device != "cpu" else []
    run(job("extract_codes.py", *flags), commands)
    return out / "codes"


def stage_prior(args, out: Path, minutes: float, commands: list[str]) -> Path:
    """Train the prior on the codes (caption dropout for guidance)."""
    flags = ["--codes", out / "codes", "--image-tokenizer", out / "tokenizer" / "final"]
    flags += ["--output-dir", out / "prior", "--seed", args.seed]
    flags += ["--time-budget-minutes", f"{minutes:.3f}", "--resume", "--report-to", "none"]
    flags += ["--cpu"] if args.device == "cpu" else []
    if args.prior_steps is not None:
        flags += ["--max-steps", args.prior_steps, "--warmup-steps", "0"]
    run(job("train_prior.py", *train_settings(args)["prior"], *flags), commands)
    return out / "prior" / "final"


def stage_scorer(args, out: Path, minutes: float, commands: list[str]) -> Path:
    """Train the image-caption scorer on the Shapes renders, over the prior's text tokenizer."""
    text_tokenizer = out / "prior" / "final" / "text_tokenizer"
    flags = ["--text-tokenizer", text_tokenizer, "--output-dir", out / "scorer"]
    flags += ["--resolution", args.resolution, "--seed", args.seed, "--resume"]
    flags += ["--time-budget-minutes", f"{minutes:.3f}", "--report-to", "none"]
    flags += ["--num-train-samples", train_settings(args)["num_train_images"]]
    flags += ["--num-val-samples", train_settings(args)["num_validation_images"]]
    flags += ["--cpu"] if args.device == "cpu" else []
    if args.scorer_steps is not None:
        flags += ["--max-steps", args.scorer_steps, "--warmup-steps", "0"]
    run(job("train_scorer.py", *train_settings(args)["scorer"], *flags), commands)
    return out / "scorer" / "final"


def stage_evaluate(args, out: Path, minutes: float, commands: list[str]) -> Path:
    """Make the pipeline; sweep sampling settings on validation prompts; judge test prompts."""
    pipeline = out / "pipeline"
    prior = out / "prior" / "final"  # train_prior.py exports prior/ and text_tokenizer/ here
    flags = ["--image-tokenizer", out / "tokenizer" / "final", "--prior", prior / "prior"]
    flags += ["--text-tokenizer", prior / "text_tokenizer", "--out", pipeline]
    if args.num_candidates > 1:
        flags += ["--scorer", out / "scorer" / "final", "--num-candidates", args.num_candidates]
    run(job("make_pipeline.py", *flags), commands)
    flags = ["--pipeline", pipeline, "--num-prompts", args.num_test_prompts, "--held-out"]
    flags += ["--sweep-guidance", args.sweep_guidance]
    flags += ["--sweep-temperature", args.sweep_temperature]
    if args.num_candidates > 1:
        flags += ["--sweep-likelihood-weight", args.sweep_likelihood_weight]
        flags += ["--batch-size", "256"]  # candidates: fewer, larger sampling batches
    flags += ["--num-validation-prompts", args.num_validation_prompts]
    flags += ["--tokenizer-images", args.tokenizer_images, "--seed", args.seed]
    flags += ["--device", args.device, "--out", out / "evaluation.json"]
    run(job("evaluate_pipeline.py", *flags), commands)
    return out / "evaluation.json"


def stage_grid(args, out: Path, minutes: float, commands: list[str]) -> Path:
    """Sample the grid with the tuned defaults; print each prompt with its images.

    Runs in process: the grid is the demo's own output, not a job a user would type."""
    return sample_grid(args, out, job_threads())


# stage -> (function, product whose existence marks the stage finished)
STAGE_TABLE = {
    "tokenizer": (stage_tokenizer, "tokenizer/final"),
    "codes": (stage_codes, "codes/codes_meta.json"),
    "prior": (stage_prior, "prior/final"),
    "scorer": (stage_scorer, "scorer/final"),
    "evaluate": (stage_evaluate, "evaluation.json"),
    "grid": (stage_grid, "grid.png"),
}


# ------------------------------------------------------------------ budget, metrics, main
def stages(args: argparse.Namespace) -> tuple[str, ...]:
    """The stages this demo runs: the scorer only when it reranks."""
    return tuple(stage for stage in STAGES if stage != "scorer" or args.num_candidates > 1)


def stage_minutes(stage: str, args: argparse.Namespace, state: dict) -> float:
    """Training budget of a stage in minutes (0 for stages without one)."""
    floor = 0.05  # the jobs' step-time measurement needs a few seconds
    plan = PLANS[args.num_candidates > 1]
    if stage == "tokenizer":
        return max(plan["tokenizer_share"] * args.budget_minutes - STARTUP_MINUTES, floor)
    if stage == "prior":
        spent = sum(state["stages"][name]["seconds"] for name in ("tokenizer", "codes")) / 60
        startups = (2 if plan["scorer"] else 1) * STARTUP_MINUTES
        reserve = plan["reserve"] + plan["scorer"] + startups
        return max(args.budget_minutes - spent - reserve, floor)
    if stage == "scorer":
        return plan["scorer"]
    return 0.0


def main(args: argparse.Namespace) -> dict:
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        clear_outputs(out)
    state = load_state(out, settings_key(args))
    started, redo = time.monotonic(), False
    active = stages(args)
    for index, stage in enumerate(active, 1):
        function, product = STAGE_TABLE[stage]
        description = function.__doc__.splitlines()[0].rstrip(".")
        print(f"[{index}/{len(active)}] {stage}: {description}", flush=True)
        record = state["stages"].get(stage)
        if not redo and record is not None and (out / product).exists():
            print(
                f"  reusing {out / product} ({record['seconds']:.0f} s in an earlier "
                "run; --fresh redoes it)"
            )
            continue
        redo = True  # every later stage depends on this one
        for later in active[index - 1 :]:
            state["stages"].pop(later, None)
        minutes = stage_minutes(stage, args, state)
        if minutes:
            print(f"  budget {minutes:.2f} min of {args.budget_minutes:g}", flush=True)
        begin, commands = time.monotonic(), []
        function(args, out, minutes, commands)
        seconds = round(time.monotonic() - begin, 1)
        record = {"seconds": seconds, "budget_minutes": minutes, "commands": commands}
        state["stages"][stage] = record
        save_state(out, state)
        print(f"  {stage} done in {seconds:.0f} s", flush=True)
    metrics = build_metrics(args, out, state, time.monotonic() - started)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_summary(metrics, out)
    return metrics


if __name__ == "__main__":
    try:
        main(parse_args())
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        sys.exit(f"demo: {error}")
