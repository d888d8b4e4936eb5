"""Side-by-side benchmarks against reference implementations.

    python scripts/bench.py all                  # every CPU ratio, printed as a table
    python scripts/bench.py tokenizer --json out.json
    python scripts/bench.py gpu --json gpu.json   # one <= 5 minute accelerator run

Every ratio is measured in one run against a reference on the same machine: both sides under
`torch.inference_mode()` (training excepted), the same `torch.set_num_threads`, a warm-up, and
the median of `--runs` (>= 5) runs interleaved ABBA. Targets are reported, never enforced; the
exit status is 1 only when an equivalence check fails (an optimised path disagreeing with
its reference) or a `gpu` section raises, 0 otherwise.

Subcommands:
  tokenizer  our VQGAN vs the taming-transformers modules with identical weights, f16 at 256 px,
             batch 4, encode + decode: equivalence within 1e-4, time ours/theirs <= 0.8.
  sampling   8 CFG images x 256 tokens vs HF GPT2LMHeadModel.generate at batch 16 (>= 1.5x),
             and KV cache vs use_cache=False (>= 8x, on a shorter grid: --nocache-grid).
  train      training step tokens/s vs GPT2LMHeadModel (>= 1.2x) and achieved FLOP/s as a
             share of the measured fp32 sgemm peak (aim >= 50%).
  extract    scripts/extract_codes.py's path vs a bare encode loop, f16 256 px (>= 0.85x).
  scaling    sampling time and peak memory at 64, 256 and 1024 image tokens, with linear fits.
  precision  bf16 autocast vs fp32 on this CPU: the matmul peak and the demo's prior and
             tokenizer training steps (the speed-up behind demo.py --precision auto).
  all        the six above.
  gpu        accelerator run: bf16 + torch.compile training MFU, sampling latency/throughput
             at batch 1 and 64, tokenizer throughput; imports only torch and this tree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# `python scripts/bench.py` puts scripts/ on sys.path; the packages live one level up, and the
# accelerator machine runs this from the source tree without installing the package.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from benchmarks.common import (  # noqa: E402
    EquivalenceError,
    Row,
    Settings,
    format_table,
    set_threads,
)
from benchmarks.gpu import SECTIONS as GPU_SECTIONS  # noqa: E402

CPU_BENCHES = ("tokenizer", "sampling", "train", "extract", "scaling", "precision")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see --help."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("which", choices=(*CPU_BENCHES, "all", "gpu"), help="the benchmark to run (see below)")
    add("--threads", type=int, default=2, help="torch.set_num_threads for both sides of every "
        "ratio (default: 2, the CPU machines' core count)")  # fmt: skip
    add("--runs", type=int, default=5, help="timed runs per side; the median is reported "
        "(default: 5, the protocol's minimum)")  # fmt: skip
    add("--warmup", type=int, default=1, help="untimed warm-up calls per side (default: 1)")
    add("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    add("--smoke", action="store_true", help="tiny models everywhere: checks that every path "
        "runs (in seconds on CPU, also for `gpu`); the figures mean nothing")  # fmt: skip
    add("--seed", type=int, default=0, help="seed of weights, inputs and sampling (default: 0)")
    add("--nocache-grid", type=int, default=8, help="grid side for the KV cache vs no-cache "
        "ratio; the uncached sampler is quadratic, so the default 8 (64 tokens) keeps it to "
        "about a minute on 2 cores; 16 is the full 256 tokens (default: 8)")  # fmt: skip
    add("--extract-images", type=int, default=8, help="images for the extraction benchmark; "
        "the f16 256 px encoder costs about a second per image on 2 cores (default: 8)")  # fmt: skip
    add("--device", default=None, help="device for `gpu` (default: cuda; cpu with --smoke); "
        "the CPU benchmarks always run on cpu")  # fmt: skip
    add("--no-compile", action="store_true", help="`gpu`: skip torch.compile (eager bf16)")
    names = ",".join(GPU_SECTIONS)
    add("--gpu-sections", default=names, help="`gpu`: comma-separated measurements after the "
        f"matmul peak, in order (default: {names})")  # fmt: skip
    add("--levers", action="store_true", help="`tokenizer`: also time prototypes of speed "
        "levers (channels_last, in-place swish/add) against our unchanged model")  # fmt: skip
    add("--compile-levers", action="store_true", help="with --levers: also torch.compile "
        "(several minutes of compilation on 2 cores)")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("threads", "runs", "nocache_grid", "extract_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    sections = args.gpu_sections.split(",")
    if not set(sections) <= set(GPU_SECTIONS):
        parser.error(f"--gpu-sections={args.gpu_sections!r}: use names of {names}")
    args.gpu_sections = tuple(sections)
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    """The benchmark Settings of the parsed flags; `gpu` defaults to cuda (cpu with --smoke)."""
    device = "cpu"
    if args.which == "gpu":
        device = args.device or ("cpu" if args.smoke else "cuda")
    return Settings(
        threads=args.threads, runs=args.runs, warmup=args.warmup, smoke=args.smoke,
        seed=args.seed, nocache_grid=args.nocache_grid, extract_images=args.extract_images,
        device=device, levers=args.levers, compile_levers=args.compile_levers,
    )  # fmt: skip


def run_cpu_bench(name: str, settings: Settings) -> list[Row]:
    """Import one benchmark lazily (each pulls in its own reference library) and run it."""
    if name == "tokenizer":
        from benchmarks.tokenizer import bench_tokenizer as bench
    elif name == "sampling":
        from benchmarks.sampling import bench_sampling as bench
    elif name == "train":
        from benchmarks.training import bench_training as bench
    elif name == "extract":
        from benchmarks.extract import bench_extract as bench
    elif name == "precision":
        from benchmarks.cpu_precision import bench_cpu_precision as bench
    else:
        from benchmarks.sampling import bench_scaling as bench
    return bench(settings)


def git_commit() -> str | None:
    """Short hash of the checked-out commit, None outside a git tree."""
    done = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout.strip() or None


def metadata(args: argparse.Namespace, settings: Settings) -> dict:
    """The exact command, commit, torch version and settings of this run."""
    return {
        "command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "torch": torch.__version__,
        "settings": settings.__dict__,
    }


def run_cpu(args: argparse.Namespace, settings: Settings) -> tuple[dict, int]:
    """Run the chosen CPU benchmarks; an equivalence failure is recorded, the rest still run."""
    names = CPU_BENCHES if args.which == "all" else (args.which,)
    rows: list[Row] = []
    failures: list[str] = []
    for name in names:
        try:
            new = run_cpu_bench(name, settings)
        except EquivalenceError as error:
            new = [Row(name, "equivalence", note=str(error)[:300], passed=False)]
        failures += [f"{name}: {row.metric} {row.extra}" for row in new if row.passed is False]
        rows.extend(new)
        print("\n".join(format_table(new).splitlines()[2:]), flush=True)
    print()
    print(format_table(rows))
    for failure in failures:
        print(f"EQUIVALENCE FAILURE {failure}", file=sys.stderr)
    result = {**metadata(args, settings), "rows": [row.to_dict() for row in rows]}
    result["equivalence_failures"] = failures
    return result, 1 if failures else 0


def main(args: argparse.Namespace) -> int:
    """Run the benchmarks; returns the exit status (1 on an equivalence failure or a failed
    `gpu` section)."""
    settings = settings_from(args)
    set_threads(settings.threads)
    torch.manual_seed(settings.seed)
    if args.which == "gpu":
        from benchmarks.gpu import run_gpu

        meta = metadata(args, settings)

        def write_partial(partial: dict) -> None:
            done = [name for name in args.gpu_sections if name in partial]
            print(f"bench gpu: done {['matmul_peak', *done]}", file=sys.stderr, flush=True)
            if args.json is not None:  # "complete" turns true only in the final write
                write_json(args.json, {**meta, **partial, "complete": False})

        write_partial({})  # replaces a previous run's file before anything can fail
        result = {
            **meta,
            **run_gpu(settings, not args.no_compile, write_partial, args.gpu_sections),
        }
        result["complete"] = True
        print(json.dumps(result, indent=2))
        failed = [name for name in args.gpu_sections if "error" in result.get(name, {})]
        status = 1 if failed else 0
    else:
        result, status = run_cpu(args, settings)
    if args.json is not None:
        write_json(args.json, result)
    return status


def write_json(path: Path, result: dict) -> None:
    """Write atomically: a run killed mid-write leaves the previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
