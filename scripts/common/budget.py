"""A wall-clock budget turned into a fixed number of optimizer steps.

After a measurement window (default 30 steps, after `skip_steps` warm-up steps, which pay for
lazy initialisation and first-call kernel setup) the mean step time fixes the total step count so
that the run, including its periodic evaluation and checkpoints as far as the window saw them,
ends within the budget. With a 10-step window and a 0.92 safety factor, 2-core runs ended 8-10%
early (a stage of 233 s took 211 s). Timing from the second step still ended the demo's
tokenizer stage 13% early (202 of 233 s): its first 10 steps ran at 0.24 s, the rest at 0.14 s,
and the window averaged 0.172 s; skipping 10 steps measures the steady state. The count is
decided on the main process and broadcast, so every rank stops at the same step; it is stored in
checkpoints, so a resumed run keeps the checkpoint's count and LR schedule.

The window also lasts at least `measure_seconds` (10 s, at most 5% of the budget): a 30-step
window of the demo's bf16 prior lasted 3 s, and a stall of about 0.8 s in it set 0.100 s per
step against the 0.072 s the run then kept, so the stage stopped after 3.5 of its 4.7 minutes.

After the window the count is re-planned `replans` times (3) from the pace since the last plan
(periodic validation and checkpoints included), the re-plans left spread evenly over the steps
left after each one: on a shared AMD EPYC the demo's prior measured 0.091 s per step in its
window and then ran at 0.10-0.15, so its 4.4-minute stage took 5.4 minutes and the demo 600 s.
The LR schedule follows the new count from the next step, so the LR steps down (or up) a little
at a re-plan that changes it. Only a run that measured its own window re-plans: a run resumed
from a checkpoint that holds a count keeps that count, with no further time control, so a
killed-and-resumed run ends where the checkpointed plan said, not where an uninterrupted run
would have re-planned to.
"""

from __future__ import annotations

import math
import time

import torch
from accelerate import Accelerator


class StepBudget:
    """Decides `total_steps` from `--max-steps` and/or `--time-budget-minutes`.

    The budget counts from `started` (a `time.monotonic()` value; default: now), so the job's
    data preparation and model setup are inside it.

    Without a budget the total is `max_steps` from the start. With one, the total is unknown
    (None) until `observe` has timed `measure_steps` steps, and `measure_seconds`, after the
    first `skip_steps`;
    `max_steps` then caps it. `min_steps` raises a total that the budget would leave below it,
    but only as far as `limit_minutes` (>= `minutes`) allows: a stage that needs a number of
    steps to be useful gets them on a slow machine, within a hard cap. `replans` times after that
    the total is re-planned from the pace since the last plan, with the same floor, limit and
    cap.
    """

    def __init__(
        self,
        minutes: float | None,
        max_steps: int | None,
        measure_steps: int = 30,
        measure_seconds: float = 10.0,
        skip_steps: int = 10,
        safety: float = 0.97,
        reserve_seconds: float = 5.0,
        started: float | None = None,
        min_steps: int | None = None,
        limit_minutes: float | None = None,
        replans: int = 3,
    ) -> None:
        self.seconds = None if minutes is None else 60.0 * minutes
        self.max_steps, self.min_steps = max_steps, min_steps
        self.limit = self.seconds if limit_minutes is None else 60.0 * limit_minutes
        if self.seconds is not None and self.limit < self.seconds:
            raise ValueError(
                f"limit_minutes={limit_minutes} is below the budget of {minutes} minutes; pass a "
                "limit >= the budget (or none)"
            )
        self.measure_steps, self.safety, self.reserve = measure_steps, safety, reserve_seconds
        if measure_seconds < 0:
            raise ValueError(f"measure_seconds={measure_seconds} must be >= 0 (0: steps only)")
        self.measure_seconds = (
            0.0 if self.seconds is None else min(measure_seconds, 0.05 * self.seconds)
        )
        if skip_steps < 1:
            raise ValueError(
                f"skip_steps={skip_steps} must be >= 1 (the first step pays for lazy "
                "initialisation and is never timed)"
            )
        self.skip_steps = skip_steps
        self.started = time.monotonic() if started is None else started
        self.total_steps: int | None = max_steps if minutes is None else None
        self._window_start: tuple[int, float] | None = None
        self.seconds_per_step: float | None = None
        if replans < 0:
            raise ValueError(f"replans={replans} must be >= 0 (0: the window's count is final)")
        self._replans_left = replans
        self._replan_at: list[int] = []  # steps at which the count is re-planned
        self._planned: tuple[int, float] | None = None  # (step, time) of the last plan
        self.replanned_from: int | None = None  # the count before the last re-plan

    def restore(self, total_steps: int | None) -> None:
        """Adopt the total of a resumed checkpoint (if it had been fixed)."""
        if total_steps is not None:
            self.total_steps = int(total_steps)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def observe(self, step: int, accelerator: Accelerator) -> bool:
        """Call after each completed step (`step` steps done). Returns True when this call fixed
        the total or a re-plan changed it. Every rank must call at every step: past
        `measure_steps` the ranks broadcast rank 0's verdict on the window each step until it
        closes, then the total, and at each re-plan step rank 0's new total."""
        if self.total_steps is not None:
            return self._replan(step, accelerator)
        now = time.monotonic()
        if self._window_start is None:
            if step >= self.skip_steps:  # the warm-up steps are not timed
                self._window_start = (step, now)
            return False
        first_step, first_time = self._window_start
        if step - first_step < self.measure_steps:
            return False
        if not self._window_closed(now - first_time, accelerator):
            return False
        self.seconds_per_step = (now - first_time) / (step - first_step)
        self.total_steps = self._broadcast_count(step, accelerator)
        self._schedule_replans(step, now)
        return True

    def _schedule_replans(self, step: int, now: float) -> None:
        """Spread the re-plans left evenly over the steps from `step` to the total. Both follow
        from broadcast values, so every rank gets the same re-plan steps."""
        gap = (self.total_steps - step) / (self._replans_left + 1)
        steps = {step + round(gap * k) for k in range(1, self._replans_left + 1)}
        self._replan_at = sorted(at for at in steps if step < at < self.total_steps)
        self._planned = (step, now)

    def _replan(self, step: int, accelerator: Accelerator) -> bool:
        """At a re-plan step: the count from the pace since the last plan (a run that slowed
        down for good is not averaged with its faster start). Returns True when it changed. The
        re-plan steps follow from the broadcast count, so every rank is here at the same steps."""
        if not self._replan_at or step != self._replan_at[0]:
            return False
        self._replans_left -= 1
        (last_step, last_time), now = self._planned, time.monotonic()
        self.seconds_per_step = (now - last_time) / (step - last_step)
        total = self._broadcast_count(step, accelerator)
        changed = total != self.total_steps
        if changed:
            self.replanned_from, self.total_steps = self.total_steps, total
        self._schedule_replans(step, now)
        return changed

    def _broadcast_count(self, step: int, accelerator: Accelerator) -> int:
        """The count at the measured pace (raised to `min_steps` within the limit, capped by
        `max_steps`, never below `step`), rank 0's value on every rank."""
        total = self._steps_within(self.seconds, step)
        if self.min_steps is not None and total < self.min_steps:
            total = max(total, min(self.min_steps, self._steps_within(self.limit, step)))
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        value = torch.tensor([float(max(total, step))], device=accelerator.device)
        if accelerator.num_processes > 1:
            torch.distributed.broadcast(value, src=0)
        return int(value.item())

    def _window_closed(self, seconds: float, accelerator: Accelerator) -> bool:
        """Whether the window has lasted `measure_seconds`, by the main process's clock: every
        rank is at the same step here (the step count is the same everywhere), and rank 0's
        answer is broadcast, so all ranks close the window, and broadcast the total, together."""
        closed = torch.tensor([float(seconds >= self.measure_seconds)], device=accelerator.device)
        if accelerator.num_processes > 1:
            torch.distributed.broadcast(closed, src=0)
        return bool(closed.item())

    def _steps_within(self, seconds: float, step: int) -> int:
        """The step count that ends within `seconds` of the start at the measured pace, keeping
        back time for the final validation, checkpoint and export (at most 5% of it)."""
        remaining = seconds - self.elapsed() - min(self.reserve, 0.05 * seconds)
        return step + max(0, math.floor(self.safety * remaining / self.seconds_per_step))

    def current_total(self, fallback: int) -> int:
        """The total for the LR schedule; `fallback` while still measuring."""
        return self.total_steps if self.total_steps is not None else fallback
