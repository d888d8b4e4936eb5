"""Unit tests of scripts/common: faults, schedule, sampler, checkpoints, EMA, guards, budget,
run folder, optimizer groups and image grids (no training job runs here)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import multiprocessing
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator, debug_launcher
from common import budget as budget_module
from common import faults
from common.budget import StepBudget
from common.checkpoint import (
    CorruptCheckpointError,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from common.curves import Panel, plot_curves, read_series
from common.ema import EMA
from common.guards import NonFiniteGuard, NonFiniteLossError, StateSnapshot, locally_nonfinite
from common.images import codes_to_images, tensor_grid
from common.loop import Context, TrainState, finish_step
from common.optim import param_groups
from common.run_folder import RunFolder
from common.sampler import StepSampler
from common.schedule import warmup_cosine
from PIL import Image
from torch import nn
from training_helpers import reset_process_state

from codegrid.io import config_from_dict


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    reset_process_state()
    yield
    reset_process_state()


# ---------------------------------------------------------------- faults
def test_fault_spec_parsing():
    parsed = faults.parse_faults("mid-step:3, nan-loss:2-4@1,before-rename,nan-loss:5-")
    assert parsed["mid-step"] == faults.Fault("mid-step", 3, 3, None)
    assert parsed["nan-loss"] == faults.Fault("nan-loss", 5, math.inf, None)  # last entry wins
    assert parsed["before-rename"] == faults.Fault("before-rename", 1, 1, None)
    assert faults.parse_faults("nan-loss:2-4@1")["nan-loss"].rank == 1
    with pytest.raises(ValueError, match=r"unknown point 'mid-stepp'.*'mid-step'"):
        faults.parse_faults("mid-stepp:1")
    with pytest.raises(ValueError, match="malformed"):
        faults.parse_faults("mid-step:x")


def test_fault_fires_on_the_configured_hits_only(monkeypatch):
    monkeypatch.setenv(faults.ENV, "nan-loss:2-3")
    assert [faults.fires("nan-loss") for _ in range(5)] == [False, True, True, False, False]
    assert not faults.fires("mid-step")
    monkeypatch.setenv(faults.ENV, "nan-loss:1-@1")  # rank 1 only; this process is rank 0
    assert not faults.fires("nan-loss")


def _kill_at_second_hit():
    faults.reset_hits()
    faults.kill_point("mid-file")
    print("survived the first hit", flush=True)
    faults.kill_point("mid-file")
    raise SystemExit(3)  # not reached


def test_kill_point_sends_sigkill(monkeypatch):
    monkeypatch.setenv(faults.ENV, "mid-file:2")
    process = multiprocessing.get_context("fork").Process(target=_kill_at_second_hit)
    process.start()
    process.join(timeout=60)
    assert process.exitcode == -9


# ---------------------------------------------------------------- schedule
def test_warmup_then_cosine_to_the_floor():
    values = [
        warmup_cosine(step, total_steps=20, warmup_steps=4, min_ratio=0.1) for step in range(21)
    ]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0) and values[20] == pytest.approx(0.1)
    assert values[12] == pytest.approx(0.55)  # halfway through the cosine
    assert all(a >= b for a, b in itertools.pairwise(values[4:]))
    assert warmup_cosine(50, total_steps=20, warmup_steps=4) == pytest.approx(0.1)


# ---------------------------------------------------------------- sampler
@pytest.mark.parametrize("accumulation", [1, 2])
def test_ranks_read_disjoint_slices_of_the_single_process_batch(accumulation):
    single = StepSampler(11, 4 * accumulation, seed=3)
    ranks = [
        StepSampler(11, 2, accumulation=accumulation, world_size=2, rank=r, seed=3)
        for r in range(2)
    ]
    for step in range(7):  # crosses several epochs
        expected = single.indices(step)[0]
        got = [ranks[r].indices(step, m)[0] for m in range(accumulation) for r in range(2)]
        assert sorted(np.concatenate(got).tolist()) == sorted(expected.tolist())
        assert len(set(np.concatenate(got).tolist())) == 4 * accumulation  # no repeats


def test_sampler_covers_each_epoch_once_and_is_a_pure_function_of_the_step():
    sampler = StepSampler(12, 4, seed=0)
    first_epoch = np.concatenate([sampler.indices(step)[0] for step in range(3)])
    assert sorted(first_epoch.tolist()) == list(range(12))
    second_epoch = np.concatenate([sampler.indices(step)[0] for step in range(3, 6)])
    assert sorted(second_epoch.tolist()) == list(range(12))
    assert not np.array_equal(first_epoch, second_epoch)  # reshuffled per epoch
    fresh = StepSampler(12, 4, seed=0)  # a resumed run: jump straight to step 4
    assert np.array_equal(fresh.indices(4)[0], sampler.indices(4)[0])
    assert fresh.indices(4)[1] == 1 and fresh.epoch_of(4) == 1
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        StepSampler(12, 8, world_size=2)


# ---------------------------------------------------------------- checkpoints
def _saved(tmp_path, steps, keep_last=3):
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(float(step))
        save_checkpoint(
            accelerator,
            tmp_path,
            step,
            {"step": step},
            {"ema.w": torch.full((2,), step)},
            keep_last=keep_last,
        )
    return accelerator, model


def test_checkpoints_are_complete_pruned_and_verified(tmp_path):
    _saved(tmp_path, [1, 2, 3, 4], keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert not (tmp_path / "ckpt.tmp").exists()
    state = verify_checkpoint(tmp_path / "step-00000004")
    assert state == {"step": 4}
    manifest = json.loads((tmp_path / "step-00000004" / "manifest.json").read_text())
    assert {
        "model.safetensors",
        "optimizer.bin",
        "trainer_state.json",
        "extra_state.safetensors",
        "random_states_0.pkl",
    } <= set(manifest["files"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda f: (f / "optimizer.bin").write_bytes(b"x"),
            "optimizer.bin is truncated or altered",
        ),
        (lambda f: (f / "extra_state.safetensors").unlink(), "extra_state.safetensors is missing"),
        (lambda f: (f / "manifest.json").write_text("{"), "manifest.json is missing or unreadable"),
    ],
)
def test_a_damaged_checkpoint_names_the_file_and_resume_falls_back(
    tmp_path, caplog, damage, message
):
    accelerator, model = _saved(tmp_path, [1, 2])
    damage(tmp_path / "step-00000002")
    with pytest.raises(CorruptCheckpointError, match=message):
        verify_checkpoint(tmp_path / "step-00000002")
    (tmp_path / "ckpt.tmp").mkdir()  # an unfinished write from a killed run
    logger = logging.getLogger("test-fallback")
    with caplog.at_level(logging.WARNING, logger="test-fallback"):
        folder, state, tensors = load_latest_checkpoint(accelerator, tmp_path, logger)
    assert folder.name == "step-00000001" and state == {"step": 1}
    assert (
        torch.equal(tensors["ema.w"], torch.ones(2)) and float(model.weight[0, 0].detach()) == 1.0
    )
    assert message in caplog.text and "falling back" in caplog.text
    assert not (tmp_path / "ckpt.tmp").exists()


def test_bit_flip_is_caught_by_the_hash(tmp_path):
    _saved(tmp_path, [1])
    path = tmp_path / "step-00000001" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors is corrupt: its sha256"):
        verify_checkpoint(path.parent)


def test_no_complete_checkpoint_is_an_error_and_none_is_a_fresh_start(tmp_path):
    accelerator, _ = _saved(tmp_path / "a", [1])
    (tmp_path / "a" / "step-00000001" / "manifest.json").unlink()
    logger = logging.getLogger("test-none")
    with pytest.raises(CorruptCheckpointError, match=r"no checkpoint under .* is complete"):
        load_latest_checkpoint(accelerator, tmp_path / "a", logger)
    assert load_latest_checkpoint(accelerator, tmp_path / "empty", logger) is None


# ---------------------------------------------------------------- EMA
def test_ema_average_swap_and_round_trip():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 1/10) = 0.1 -> 0.9 of the way
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9))
    with ema.swapped(model):
        assert torch.allclose(model.weight, torch.full((1, 2), 0.9))
    assert torch.equal(model.weight, torch.ones(1, 2))
    other = EMA(model, decay=0.5)
    other.load_state_tensors(ema.state_tensors(), ema.num_updates)
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"]) and other.num_updates == 1
    with pytest.raises(ValueError, match="EMA state does not match"):
        other.load_state_tensors({"ema.bias": torch.zeros(1)}, 1)


# ---------------------------------------------------------------- guards
def test_nonfinite_detection_and_consecutive_limit():
    layer = nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    assert not locally_nonfinite([torch.tensor(1.0)], layer.parameters())
    assert locally_nonfinite([torch.tensor(float("inf"))], layer.parameters())
    layer.weight.grad[0, 0] = float("nan")
    assert locally_nonfinite([torch.tensor(1.0)], layer.parameters())
    guard = NonFiniteGuard(max_consecutive=2)
    guard.record(True, 5, "ckpt-a")
    guard.record(False, 6, "ckpt-a")  # a good step resets the run of failures
    guard.record(True, 7, "ckpt-a")
    with pytest.raises(NonFiniteLossError, match="Last good checkpoint: ckpt-b"):
        guard.record(True, 8, "ckpt-b")
    assert guard.state_dict() == {"nonfinite_consecutive": 2, "nonfinite_total": 3}


def test_snapshot_restores_parameters_and_buffers():
    quantizer, norm = nn.Embedding(4, 2), nn.BatchNorm1d(2)
    before = (
        quantizer.weight.detach().clone(),
        norm.running_mean.clone(),
        norm.weight.detach().clone(),
    )
    snapshot = StateSnapshot(full=[quantizer], buffers_only=[norm])
    snapshot.capture()
    with torch.no_grad():
        quantizer.weight.add_(1.0)
        norm.weight.add_(1.0)
    norm(torch.randn(8, 2))  # updates running statistics
    snapshot.restore()
    assert torch.equal(quantizer.weight, before[0]) and torch.equal(norm.running_mean, before[1])
    assert torch.equal(norm.weight, before[2] + 1.0)  # parameters of buffers_only modules untouched


# ---------------------------------------------------------------- budget
def test_budget_fixes_the_step_count_after_the_measurement_window(monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock["now"])
    accelerator = Accelerator(cpu=True)
    budget = StepBudget(
        minutes=1.0, max_steps=None, measure_steps=4, skip_steps=3, safety=1.0, reserve_seconds=0.0
    )
    assert budget.total_steps is None and budget.current_total(77) == 77
    fixed = []
    for step in range(1, 9):
        clock["now"] += 5.0 if step <= 3 else 2.0  # slow warm-up steps, then 2 s per step
        fixed.append(budget.observe(step, accelerator))
    assert fixed == [False] * 6 + [True, False]
    # only steps 4-7 are timed (2 s each): 7 steps took 15 + 8 = 23 s of 60, 37 s left -> 18 more
    assert budget.seconds_per_step == pytest.approx(2.0) and budget.total_steps == 7 + 18
    capped = StepBudget(
        minutes=1.0,
        max_steps=12,
        measure_steps=1,
        measure_seconds=0.0,
        skip_steps=1,
        safety=1.0,
        reserve_seconds=0.0,
    )
    for step in range(1, 3):
        clock["now"] += 2.0
        capped.observe(step, accelerator)
    assert capped.total_steps == 12
    assert StepBudget(minutes=None, max_steps=9).total_steps == 9
    with pytest.raises(ValueError, match="skip_steps=0"):
        StepBudget(minutes=1.0, max_steps=None, skip_steps=0)


def test_budget_window_lasts_its_minimum_seconds(monkeypatch):
    """A short step window is stretched to measure_seconds, so one stall weighs less."""
    clock = {"now": 100.0}
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock["now"])
    budget = StepBudget(
        10.0,
        None,
        measure_steps=2,
        measure_seconds=12.0,
        skip_steps=1,
        safety=1.0,
        reserve_seconds=0.0,
    )
    fixed = []
    for step in range(1, 12):
        clock["now"] += 5.0 if step == 2 else 1.0  # a 4 s stall in the window's first step
        fixed.append(budget.observe(step, Accelerator(cpu=True)))
    # the window opens after step 1 and closes after step 9, when 5 + 7 = 12 s have passed:
    # 1.5 s per step over 8 steps, where the 2-step window would have measured 3 s
    assert fixed.index(True) == 8 and budget.seconds_per_step == pytest.approx(1.5)
    # 13 s of 600 used, 587 left at 1.5 s per step
    assert budget.total_steps == 9 + math.floor(587 / 1.5)
    short = StepBudget(1.0, None, measure_steps=1, skip_steps=1)
    assert short.measure_seconds == pytest.approx(3.0)  # at most 5% of the budget
    with pytest.raises(ValueError, match="measure_seconds=-1"):
        StepBudget(1.0, None, measure_seconds=-1)


def _run_to_the_end(budget: StepBudget, clock: dict, seconds_at, accelerator) -> list[int]:
    """Step until the budget's count is reached, step k taking `seconds_at(k)`; the counts
    after each change."""
    step, counts = 0, []
    while step < budget.current_total(10**6):
        step += 1
        clock["now"] += seconds_at(step)
        if budget.observe(step, accelerator):
            counts.append(budget.total_steps)
    return counts


@pytest.mark.parametrize("replans", [0, 3])
def test_budget_replans_keep_a_run_that_slows_down_within_its_budget(monkeypatch, replans):
    """The window sees 1 s per step, the run then takes 2 s: the window's count alone takes
    115 s of its 60; re-planned from the pace since the last plan, the run ends in time."""
    clock = {"now": 100.0}
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock["now"])
    timing = dict(measure_steps=4, measure_seconds=0.0, skip_steps=1, reserve_seconds=0.0)
    budget = StepBudget(1.0, None, safety=1.0, replans=replans, **timing)
    counts = _run_to_the_end(
        budget, clock, lambda step: 1.0 if step <= 5 else 2.0, Accelerator(cpu=True)
    )
    elapsed = clock["now"] - 100.0
    assert counts[0] == 5 + 55  # fixed after 5 steps (5 s), 55 s left at 1 s per step
    if replans == 0:
        assert counts == [60] and elapsed == pytest.approx(5 + 55 * 2.0)
        return
    # the first re-plan (step 19, 14 steps at 2 s) leaves 27 s for 13 more steps; the two left
    # (steps 23 and 28, spread over the new count) find the same pace and keep it
    assert counts == [60, 19 + 13] and budget.replanned_from == 60
    assert 55.0 <= elapsed <= 60.0  # within the budget, and little of it left unused


@pytest.mark.parametrize(
    ("min_steps", "limit_minutes", "later", "counts", "elapsed"),
    [
        # 2 s per step in the window (fixed at step 5: 50 s left, 25 steps), then 1 s: the
        # re-plan at step 11 (16 s spent) raises the count to 11 + 44
        (None, None, 1.0, [30, 55], 60.0),
        # 1 s in the window (60 steps), then 3 s: at step 19 (47 s spent) 13 s buy 4 steps,
        # below the floor of 40, which the 1.5-minute limit allows only to 19 + 14
        (40, 1.5, 3.0, [60, 33], 89.0),
    ],
)
def test_budget_replans_raise_the_count_and_keep_the_floor_and_limit(
    monkeypatch, min_steps, limit_minutes, later, counts, elapsed
):
    clock = {"now": 100.0}
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock["now"])
    timing = dict(measure_steps=4, measure_seconds=0.0, skip_steps=1, reserve_seconds=0.0)
    budget = StepBudget(1.0, None, safety=1.0, min_steps=min_steps, limit_minutes=limit_minutes,
                        **timing)  # fmt: skip
    window = 2.0 if later < 2.0 else 1.0

    def seconds_at(step):
        return window if step <= 5 else later

    assert _run_to_the_end(budget, clock, seconds_at, Accelerator(cpu=True)) == counts
    assert clock["now"] - 100.0 == pytest.approx(elapsed)


def test_a_restored_budget_keeps_its_count_and_replans_must_be_non_negative(monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock["now"])
    restored = StepBudget(1.0, None, measure_steps=4, skip_steps=1, replans=3)
    restored.restore(40)  # a resumed run keeps its checkpoint's count, however slow it is now
    step, accelerator = 12, Accelerator(cpu=True)
    while step < restored.current_total(10**6):
        step += 1
        clock["now"] += 5.0
        assert not restored.observe(step, accelerator)
    assert restored.total_steps == 40 and step == 40
    with pytest.raises(ValueError, match="replans=-1"):
        StepBudget(1.0, None, replans=-1)


def _skewed_clock_rank(out: str) -> None:
    """One rank of the test below: rank 1's clock runs at a quarter of rank 0's speed."""
    import types

    accelerator = Accelerator(cpu=True)
    rank, clock = accelerator.process_index, {"now": 100.0}
    budget_module.time = types.SimpleNamespace(monotonic=lambda: clock["now"])
    budget = StepBudget(1.0, None, measure_steps=2, measure_seconds=3.0, skip_steps=1, safety=1.0)
    step = 0
    while budget.total_steps is None and step < 50:
        step += 1
        clock["now"] += 1.0 if rank == 0 else 0.25
        budget.observe(step, accelerator)
        torch.distributed.barrier()  # a training step's collective, in step on every rank
    fixed = {"fixed_at": step, "total": budget.total_steps}
    while step < budget.total_steps:  # then rank 0 slows down: its re-plans are broadcast
        step += 1
        clock["now"] += 3.0 if rank == 0 else 0.5
        budget.observe(step, accelerator)
        torch.distributed.barrier()
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump({**fixed, "steps": step, "replanned_from": budget.replanned_from}, handle)


def test_budget_ranks_close_the_window_together_by_rank_0s_clock(tmp_path, monkeypatch):
    """With rank-local clocks rank 0 would fix its total 9 steps before rank 1 and broadcast it
    against rank 1's training collective (here a barrier: that version deadlocks this test);
    rank 0's verdict is broadcast instead."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    debug_launcher(_skewed_clock_rank, args=(str(tmp_path),), num_processes=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # rank 0: the window opens at step 1 (t = 101) and closes at step 4 (t = 104, 3 s later);
    # 56 s are left, 3 s of them reserved for the end, at 1 s per step
    assert ranks[0] == ranks[1]
    assert ranks[0]["fixed_at"] == 4 and ranks[0]["total"] == 4 + math.floor(56 - 3)
    # rank 0's re-plans (at 3 s per step) shortened the run on both ranks alike
    assert ranks[0]["replanned_from"] is not None and ranks[0]["steps"] < ranks[0]["total"]


@pytest.mark.parametrize(
    ("min_steps", "limit_minutes", "total"),
    [
        (None, None, 7 + 18),  # the budget's own count
        (20, None, 7 + 18),  # already above the floor
        (30, 2.0, 30),  # raised to the floor: it fits in the limit
        (90, 1.5, 7 + 33),  # only as far as the limit: 90 - 23 = 67 s left, 2 s per step
        (90, 1.0, 7 + 18),  # no limit beyond the budget: no stretching
    ],
)
def test_budget_floor_raises_the_count_within_the_limit(
    monkeypatch, min_steps, limit_minutes, total
):
    clock = {"now": 100.0}
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock["now"])
    timing = dict(measure_steps=4, skip_steps=3, safety=1.0, reserve_seconds=0.0)
    budget = StepBudget(1.0, None, min_steps=min_steps, limit_minutes=limit_minutes, **timing)
    for step in range(1, 8):
        clock["now"] += 5.0 if step <= 3 else 2.0  # as above: 23 s for 7 steps, then 2 s each
        budget.observe(step, Accelerator(cpu=True))
    assert budget.total_steps == total
    with pytest.raises(ValueError, match=r"limit_minutes=0\.5 is below the budget of 1\.0 minutes"):
        StepBudget(minutes=1.0, max_steps=None, limit_minutes=0.5)


# ---------------------------------------------------------------- run folder, optim, images
def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    args = argparse.Namespace(output_dir=tmp_path, report_to="none", value=[1, 2])
    accelerator = Accelerator(cpu=True)
    run = RunFolder(accelerator, args, "test")
    for step in range(1, 5):
        run.log_metrics(step, {"loss": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a line cut off by a kill
    run.truncate_metrics(after_step=2)
    run.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}]
    assert json.loads((tmp_path / "args.json").read_text())["value"] == [1, 2]


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias


def test_grids_tile_images_and_colour_codes():
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 4).view(5, 3, 4, 4)
    grid = tensor_grid(images, columns=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype == np.uint8
    assert (grid[0] == 255).all() and grid[1, 1, 0] == 0  # white padding, first pixel is -1
    coloured = codes_to_images(torch.tensor([[[0, 1], [1, 0]]]), codebook_size=2, scale=2)
    assert coloured.shape == (1, 3, 4, 4)
    assert torch.equal(coloured[0, :, 0, 0], coloured[0, :, 2, 2])  # same code, same colour


def _fp16_pairs_on_cpu(init_scale: float, growth_interval: int):
    """An fp16 Accelerator with a GradScaler installed by hand before prepare() (accelerate
    builds none on CPU; a GPU's fp16 setup has one) and two prepared (Linear(1, 1) at w=0, SGD
    lr 1) pairs."""
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler(
        "cpu", init_scale=init_scale, growth_interval=growth_interval
    )
    pairs = []
    for _ in range(2):
        model = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(model.weight)
        pairs.append(accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0)))
    return accelerator, pairs


def _finish(accelerator, pairs, loss, max_grad_norm: float, ema=None, ctx=None) -> dict:
    ctx = ctx or Context(argparse.Namespace(max_grad_norm=max_grad_norm), accelerator, None, None,
                         NonFiniteGuard(3), ema, pairs[0][0])  # fmt: skip
    return finish_step(ctx, pairs, [loss.detach()], {"loss": loss.detach()}, step=0)


@pytest.mark.parametrize("max_grad_norm", [0.0, 100.0])
def test_finish_step_unscales_each_optimizer_once_under_fp16(max_grad_norm):
    """Two (model, optimizer) pairs under one fp16 GradScaler, as in the GAN phase: each model
    must move by its true gradient. Before the fix the second model moved by 5/2048 with
    clipping (its gradients divided by the scale twice) and by 2.5 without (divided by the
    scale the first pair's update had grown; growth_interval=1 makes it grow every step)."""
    accelerator, pairs = _fp16_pairs_on_cpu(init_scale=1024.0, growth_interval=1)
    # d(loss)/dw = 3 for the first model and 5 for the second.
    loss = pairs[0][0](torch.full((1, 1), 3.0)).sum() + pairs[1][0](torch.full((1, 1), 5.0)).sum()
    accelerator.backward(loss)
    assert _finish(accelerator, pairs, loss, max_grad_norm)["skipped"] == 0.0
    assert pairs[0][0].weight.item() == pytest.approx(-3.0)
    assert pairs[1][0].weight.item() == pytest.approx(-5.0)
    assert accelerator.scaler.get_scale() == 2048.0  # one update for both


def test_finish_step_skips_only_the_overflowing_optimizer_under_fp16():
    """An inf gradient in the first pair: the scaler skips that optimizer, steps the other
    with its true gradient, and halves the scale once (PyTorch's several-optimizer recipe)."""
    accelerator, pairs = _fp16_pairs_on_cpu(init_scale=1024.0, growth_interval=1000)
    loss = pairs[0][0](torch.full((1, 1), 3.0)).sum() + pairs[1][0](torch.full((1, 1), 5.0)).sum()
    accelerator.backward(loss)
    pairs[0][0].weight.grad.fill_(float("inf"))
    _finish(accelerator, pairs, loss, max_grad_norm=100.0)
    assert pairs[0][0].weight.item() == 0.0
    assert pairs[1][0].weight.item() == pytest.approx(-5.0)
    assert accelerator.scaler.get_scale() == 512.0


def test_fp16_overflow_is_counted_and_holds_the_weight_ema():
    """A GradScaler skip is reported as "overflow" (not as a non-finite skip), counted in the
    train state, and leaves the weight EMA alone; the next, finite step updates it."""
    accelerator, pairs = _fp16_pairs_on_cpu(init_scale=1024.0, growth_interval=1000)
    ema = EMA(pairs[0][0], decay=0.5)
    ctx = Context(argparse.Namespace(max_grad_norm=0.0), accelerator, None, None,
                  NonFiniteGuard(3), ema, pairs[0][0])  # fmt: skip
    outcomes = []
    for gradient in (float("inf"), 3.0):
        loss = pairs[0][0](torch.full((1, 1), 3.0)).sum() + pairs[1][0](torch.ones(1, 1)).sum()
        accelerator.backward(loss)
        pairs[0][0].weight.grad.fill_(gradient * accelerator.scaler.get_scale())
        metrics = _finish(accelerator, pairs, loss, 0.0, ctx=ctx)
        outcomes.append((metrics["overflow"], metrics["skipped"], ema.num_updates))
    assert outcomes == [(1.0, 0.0, 0), (0.0, 0.0, 1)]
    assert ctx.state.overflow_steps == 1 and ctx.guard.total == 0
    assert pairs[0][0].weight.item() == pytest.approx(-3.0)  # only the second step moved it


def test_curves_plot_the_logged_keys_and_skip_the_rest(tmp_path):
    """Series come from every line that has the key (a killed write's tail is ignored); a panel
    whose keys were never logged is left out, and no data at all writes no file."""
    old_run = [json.dumps({"step": s, "loss": 9.0, "lr": 0.5}) for s in range(1, 80)]
    lines = [json.dumps({"step": s, "loss": 3.0 / s, "lr": 0.1}) for s in range(1, 41)]
    lines[4] = json.dumps({"step": 5, "loss": "nan", "lr": 0.1})  # non-finite: written as text
    lines += [json.dumps({"step": 40, "val_loss": 0.2, "g": -1.0}), "[1, 2]", '{"loss": 1}']
    lines += ['{"step": 41, "lo']
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(old_run + lines))  # a fresh run into a used folder
    series = read_series(metrics)
    assert series["loss"][0] == [s for s in range(1, 41) if s != 5]  # only the latest run
    assert series["val_loss"] == ([40], [0.2]) and series["lr"][1][0] == 0.1
    panels = [Panel("loss", ("loss", "val_loss", "g"), log_y=True), Panel("PSNR", ("val_psnr",)),
              Panel("lr", ("lr",), smooth=False)]  # fmt: skip
    out = plot_curves(metrics, tmp_path / "curves.png", panels)
    assert out == tmp_path / "curves.png" and not list(tmp_path.glob("*.tmp*"))
    with Image.open(out) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.shape == (320, 840, 3)  # two panels of 420 x 320: the PSNR one is left out
    assert (pixels.std(axis=(0, 1)) > 10).all()  # something was drawn on the white canvas
    assert plot_curves(metrics, tmp_path / "none.png", [Panel("PSNR", ("val_psnr",))]) is None
    assert not (tmp_path / "none.png").exists()


def test_a_failed_curves_picture_is_a_warning_not_a_crash(tmp_path):
    args = argparse.Namespace(output_dir=tmp_path, report_to="none")
    run = RunFolder(Accelerator(cpu=True), args, "test")
    run.log_metrics(1, {"loss": 1.0})
    (tmp_path / "curves.png").mkdir()  # the picture cannot replace a folder
    run.write_curves([Panel("loss", ("loss",))])
    run.close()
    assert "curves.png not written: IsADirectoryError" in (tmp_path / "train.log").read_text()


def test_curves_without_matplotlib_are_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    args = argparse.Namespace(output_dir=tmp_path, report_to="none")
    run = RunFolder(Accelerator(cpu=True), args, "test")
    run.log_metrics(1, {"loss": 1.0})
    run.write_curves([Panel("loss", ("loss",))])
    run.close()
    assert "pip install 'matplotlib>=3.7'" in (tmp_path / "train.log").read_text()
    assert not (tmp_path / "curves.png").exists()


def test_train_state_keeps_the_overflow_count_and_reads_older_checkpoints():
    state = TrainState(step=7, overflow_steps=3, nonfinite={"total": 1})
    saved = json.loads(json.dumps(dataclasses.asdict(state)))  # trainer_state.json
    assert config_from_dict(TrainState, saved, source="test") == state
    older = {key: value for key, value in saved.items() if key != "overflow_steps"}
    assert config_from_dict(TrainState, older, source="test").overflow_steps == 0
