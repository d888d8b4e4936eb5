"""The demo's training flags per device and precision: which stages run under bf16 autocast,
and the flags of the tokenizer, prior and scorer jobs (scripts/demo.py)."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

# Native bf16 arithmetic: Intel's AMX tiles (Sapphire Rapids and later) and AVX512-BF16 dot
# products (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later). Elsewhere torch
# emulates bf16, which is slower than fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bf16_flags(cpuinfo: str) -> tuple[str, ...]:
    """The BF16_CPU_FLAGS that the "flags" line of a /proc/cpuinfo text lists."""
    line = next((row for row in cpuinfo.splitlines() if row.startswith("flags")), "")
    listed = set(line.partition(":")[2].split())
    return tuple(flag for flag in BF16_CPU_FLAGS if flag in listed)


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """This CPU's native bf16 instructions (Linux's /proc/cpuinfo; () elsewhere)."""
    try:
        return native_bf16_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return ()


def bf16_stages(args: argparse.Namespace) -> tuple[str, ...]:
    """The training stages that run under bf16 autocast."""
    # On 2 cores with AMX the prior's step took 0.068 s in bf16 against 0.101 s in fp32
    # (attention kept in fp32, codegrid/precision.py); with AVX512-BF16 (an AMD EPYC) 0.107 s
    # against 0.164 s. On one demo run's codes, 3900 bf16 steps (2714 fp32 steps' time by the
    # AMX ratio) reached a validation loss of 0.220 and 90.5% / 56.5% of seen / held-out test
    # prompts all right, against 0.241 and 85.0% / 55.0% (one pair of runs). The tokenizer is
    # 0.6 dB lower than fp32 at equal steps on the EPYC but 1.26-1.4x faster: at equal time (2140
    # bf16 steps against 1700, two seeds) it reached 32.18 / 32.53 dB against 31.92 / 32.11
    # (docs/experiments.md). On the AMX Xeon it was 1.06 dB lower at 1800 steps for 1.24x the
    # steps in the job; equal time was not measured there.
    native = args.device == "cuda" or cpu_bf16_flags()
    if args.precision == "bf16" or (args.precision == "auto" and native):
        return ("tokenizer", "prior")
    return ()


def tokenizer_batch_size(args: argparse.Namespace) -> int:
    """--tokenizer-batch-size, or the device's default (why 16 on a CPU: train_settings)."""
    return args.tokenizer_batch_size or (16 if args.device == "cpu" else 256)


def train_settings(args: argparse.Namespace) -> dict:
    """Flags of the training jobs. The preset is fixed (32 px, 8x8 codes, 1024 codes); a GPU gets
    a wider tokenizer, larger batches and bf16 in the same wall time."""
    cpu = args.device == "cpu"
    # Small batches win on 2 cores. In equal time (4 minutes, bf16, seeds 0 and 1) the tokenizer
    # at batch 16 made 1.7-1.9x the steps of batch 32 and reached 31.21-32.01 dB against
    # 30.82-31.82, its ceiling on 400 + 400 seen / held-out test renders 78.2-83.0% / 66.7-73.5%
    # against 77.5-79.2% / 62.5-63.7%; batch 8 fell back to 30.97 dB and 75.0% / 58.0%
    # (docs/experiments.md). The prior gains from more steps too (batch 16 against 32 and 8
    # with taming's encoder). On the patch
    # encoder's codes with code features, 2837 steps at batch 16 drew 87.0% / 48.0% of seen /
    # held-out test prompts all right at lr 1e-3, against 81.5% / 46.0% at 5e-4, 75.0% / 34.5%
    # at 2e-3 and 53.0% / 8.5% at 4e-3 (docs/experiments.md). The GPU rate is untested.
    tokenizer_batch = tokenizer_batch_size(args)
    prior_batch = args.prior_batch_size or (16 if cpu else 256)
    prior_lr = "1e-3" if cpu else "3e-3"
    # L2 beat L1 by about 4 dB (29.4 vs 25.1 dB at equal steps): PSNR is an L2 measure, and the
    # small objects are a few percent of the pixels. With the patch encoder, at 2097 steps, lr
    # 4e-3 and the edge-weighted loss kept the shape of 82% of small objects in the judge's eyes
    # (32.75 dB) against 64% at lr 2e-3 without it (32.13 dB), 73% at 2e-3 with it and 70% at
    # 4e-3 without (docs/experiments.md). The GPU setting keeps the rate it was last run with.
    tokenizer_lr = "4e-3" if cpu else "2e-3"
    tokenizer = ["--preset", "cpu-tiny", "--batch-size", tokenizer_batch]
    tokenizer += ["--learning-rate", tokenizer_lr, "--edge-weight", "1"]
    tokenizer += ["--reconstruction", "l2", "--disc-weight", "0", "--perceptual-weight", "0"]
    tokenizer += ["--warmup-steps", "50", "--checkpoint-every", "250"]
    if cpu:
        # No norms in the decoder: a bf16 step took 0.033-0.039 s against 0.041-0.055 s with
        # GroupNorm (2 threads, interleaved). At 3000 steps, seeds 0 and 1, it reached 33.7-33.9
        # dB against 31.9-32.0, seen / held-out ceilings 83.8 / 73.8% and 78.0 / 68.5% against
        # 83.3 / 72.0% and 76.2 / 63.2%. Four demo runs: 34.41-34.58 dB against 31.44-32.50,
        # 84.0-87.5% / 49.0-54.5% of seen / held-out prompts against 81.0-85.5% / 50.0-61.5%
        # in five with GroupNorm (docs/experiments.md). The GPU keeps the preset's GroupNorm.
        tokenizer += ["--norm", "none"]
    # History (256 codes, batch 32): after 1.5 min the validation loss was 1.83 nats at lr 3e-3,
    # 1.93 at 6e-3 and 2.70 at 1.2e-2; batch 64 at 6e-3 gave 2.38 (half the steps).
    prior = ["--preset", "cpu-tiny", "--batch-size", prior_batch, "--learning-rate", prior_lr]
    prior += ["--warmup-steps", "50", "--checkpoint-every", "250"]
    # Code features: each code's matte (its outline and its colours, embedded apart). On the
    # codes of three demo runs, at equal steps, held-out colour-shape pairs were all right for
    # 58.5-65.5% against 34.0-55.0% with the mean patch in one MLP (which had raised them from
    # 18.0% to 37.0% over free rows alone), seen prompts for 90.0-92.0% (docs/experiments.md).
    prior += ["--code-features", "matte"]
    # Text tokens attend to themselves only, so the shape word's state has not read the colour
    # word: on run G's codes, at 4000 steps, held-out pairs were all right for 56.5-64.5% (four
    # seeds, mean 60.6%) against 53.0-59.5% with causal text (five priors, mean 55.1%), seen
    # prompts 87.5-90.0% against 87.5-91.5%: about one noise width (docs/experiments.md).
    prior += ["--text-attention", "self"]
    if not cpu:
        # Loader workers: one process decodes about 4000 Shapes images/s (measured on this
        # project's CPU), a cap of ~15 steps/s at batch 256; the 3.5-minute H200 run without
        # workers trained the tokenizer at ~8 steps/s. The worker count is untested on a GPU.
        tokenizer += ["--ch", "64", "--num-workers", "6"]
    stages = bf16_stages(args)
    tokenizer += ["--mixed-precision", "bf16" if "tokenizer" in stages else "no"]
    prior += ["--mixed-precision", "bf16" if "prior" in stages else "no"]
    images = args.num_train_images or (10000 if cpu else 100000)
    validation = max(32, min(1000, images // 20))
    # The scorer's rate and batch were tried once each (docs/experiments.md); fp32 throughout.
    scorer = ["--batch-size", args.scorer_batch_size, "--learning-rate", "2e-3"]
    scorer += ["--warmup-steps", "50"]
    scorer += ["--checkpoint-every", "100"]
    return {
        "tokenizer": [str(flag) for flag in tokenizer],
        "prior": [str(flag) for flag in prior],
        "scorer": [str(flag) for flag in scorer],
        "num_train_images": images,
        "num_validation_images": validation,
    }
