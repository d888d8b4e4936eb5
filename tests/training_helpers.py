"""Helpers shared by the training-job tests (test_train_*.py, test_reliability_training.py).

Runs are in-process (`train(parse_args([...]))`) where possible: a fresh interpreter costs
5-8 s of imports. Runs that must die (SIGKILL) or run as two ranks are forked from the test
process, which has already imported everything. A forked child uses one torch thread: OpenMP's
pool does not survive fork (a child using it can hang), and every run that is compared bit for
bit must use the same thread count, so the reference runs are forked the same way.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path

import torch
import torch._dynamo  # the first optimizer imports it (~5 s): do it once, before forking
from accelerate import debug_launcher
from accelerate.state import AcceleratorState, GradientState
from common import faults
from safetensors.torch import load_file, save_file

from tokenizer import VQGAN, VQGANConfig


def cli(*parts: object) -> list[str]:
    """An argv: strings are split on whitespace, lists are taken as they are, anything else
    (paths, numbers) is one item."""
    argv: list[str] = []
    for part in parts:
        if isinstance(part, str):
            argv += part.split()
        elif isinstance(part, list):
            argv += part
        else:
            argv.append(str(part))
    return argv


# 16 px Shapes, f4 -> 4x4 codes, an 8-channel VQGAN: tens of milliseconds per step.
TOKENIZER_ARGS = cli(
    "--resolution 16 --ch 8 --num-train-samples 48 --num-val-samples 8 --batch-size 8",
    "--warmup-steps 2 --log-every 1 --no-progress --report-to none --perceptual-weight 0",
    "--disc-layers 2 --disc-channels 8",
)
PRIOR_ARGS = cli(
    "--d-model 32 --num-layers 1 --num-heads 2 --batch-size 8 --warmup-steps 2 --log-every 1",
    "--no-progress --report-to none --num-val-samples 8 --num-sample-prompts 2",
)


SCORER_ARGS = cli(
    "--resolution 16 --channels 4,8 --pooled-grid 2 --embed-dim 8 --num-train-samples 48",
    "--num-val-samples 16 --batch-size 8 --warmup-steps 2 --log-every 1 --no-progress",
    "--report-to none",
)


def make_text_tokenizer(folder: Path) -> Path:
    """A SentencePiece tokenizer trained on Shapes captions, saved to folder/text_tokenizer."""
    from pipelines.data.shapes import make_shapes_dataset
    from prior import TextTokenizer

    captions = list(make_shapes_dataset("train", 200, resolution=16, seed=0)["caption"])
    tokenizer = TextTokenizer.train(captions, vocab_size=160, text_length=40, byte_fallback=False)
    return tokenizer.save_pretrained(folder / "text_tokenizer")


def reset_process_state() -> None:
    """Forget accelerate's singletons and fault hit counts between runs in one process."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    faults.reset_hits()


def _child(module, argv: list[str], fault: str | None) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.pop(faults.ENV, None)
        if fault:
            os.environ[faults.ENV] = fault
        reset_process_state()
        module.main(module.parse_args(argv))
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def run_forked(module, argv: list[str], fault: str | None = None) -> int | None:
    """Run job `module` (train_tokenizer or train_prior) on `argv` in a forked child with
    CODEGRID_FAULT=`fault`; returns its exit code (-9 when a fault point SIGKILLed it; None
    if it hung for 5 minutes and was killed)."""
    process = multiprocessing.get_context("fork").Process(target=_child, args=(module, argv, fault))
    process.start()
    process.join(timeout=300)
    if process.is_alive():  # hung: end it (by its own pid) rather than leave it behind
        process.kill()
        process.join()
        return None
    return process.exitcode


def _rank_entry(module, argv: list[str], out: str) -> None:
    torch.set_num_threads(1)
    reset_process_state()
    job = module.train(module.parse_args(argv))
    rank = job.ctx.accelerator.process_index
    model = job.ctx.accelerator.unwrap_model(job.model)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.safetensors"
    )


def run_two_ranks(module, argv: list[str], out: Path) -> list[dict[str, torch.Tensor]]:
    """Job `module` on `argv` as 2 ranks (gloo on CPU) through accelerate's debug_launcher;
    returns each rank's final model state_dict.

    OMP_NUM_THREADS=1 stops accelerate from resetting each rank to cpu_count/local_world_size
    threads (2 here: with 2 ranks on 2 cores that oversubscribes OpenMP and slows steps ~100x,
    and a forked child with an OpenMP pool can hang)."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        debug_launcher(_rank_entry, args=(module, argv, str(out)), num_processes=2)
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    reset_process_state()
    return [load_file(str(out / f"rank{rank}.safetensors")) for rank in range(2)]


def read_sample_log(output_dir: Path, rank: int) -> list[list[int]]:
    """The per-step sample indices a rank recorded with --record-sample-indices."""
    lines = (output_dir / f"samples-rank{rank}.txt").read_text().splitlines()
    return [[int(value) for value in line.split()] for line in lines]


def make_codes(folder: Path, num_train: int = 48, num_validation: int = 8) -> tuple[Path, Path]:
    """A tiny random VQGAN (16 px -> 4x4 codes, 64 codes) and Shapes codes extracted with it by
    scripts/extract_codes.py; returns (codes folder, VQGAN folder)."""
    import extract_codes

    torch.manual_seed(0)
    config = VQGANConfig.from_preset("cpu-tiny", resolution=16, ch=8, codebook_size=64)
    VQGAN(config).save_pretrained(folder / "vqgan")
    argv = cli(
        "--tokenizer",
        folder / "vqgan",
        "--data shapes --out",
        folder / "codes",
        "--num-samples",
        num_train,
        "--num-validation-samples",
        num_validation,
        "--batch-size 64",
    )
    reset_process_state()
    extract_codes.main(extract_codes.parse_args(argv))
    reset_process_state()
    return folder / "codes", folder / "vqgan"


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model.safetensors file."""
    return load_file(str(path))


def assert_same_weights(left: dict, right: dict, exact: bool = True, atol: float = 1e-5) -> None:
    """Same keys and, per tensor, bitwise equal (exact) or allclose(atol)."""
    assert sorted(left) == sorted(right)
    for key in left:
        if exact:
            assert torch.equal(left[key], right[key]), f"{key} differs"
        else:
            assert torch.allclose(left[key].float(), right[key].float(), atol=atol, rtol=0), (
                f"{key} differs by {(left[key].float() - right[key].float()).abs().max()}"
            )
