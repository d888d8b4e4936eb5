"""Fault injection for the reliability tests: kill the process or poison a loss at named points.

Set `CODEGRID_FAULT` to a comma-separated list of `name[:first[-last]][@rank]`:

    CODEGRID_FAULT=mid-step:3          SIGKILL on the 3rd training step this process runs
    CODEGRID_FAULT=before-rename       SIGKILL before the 1st checkpoint rename
    CODEGRID_FAULT=nan-loss:4-5        the loss of the 4th and 5th steps becomes NaN
    CODEGRID_FAULT=nan-loss:2-@1       NaN from the 2nd step on, on rank 1 only

Hits are counted per process from 1, so a resumed run counts again from its first step. Random
timing alone never lands inside a millisecond-long file write; named points do. Unset, every
call is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass

import torch

ENV = "CODEGRID_FAULT"
KILL_POINTS = ("mid-step", "mid-file", "after-temp-write", "before-rename", "after-rename")
POISON_POINTS = ("nan-loss",)
_hits: Counter[str] = Counter()


@dataclass(frozen=True)
class Fault:
    """Fire on hits first..last (1-based, inclusive) of point `name`, on `rank` (None: all)."""

    name: str
    first: int = 1
    last: float = 1
    rank: int | None = None


def parse_faults(spec: str) -> dict[str, Fault]:
    """Parse a `CODEGRID_FAULT` value; ValueError names a bad entry and the allowed points."""
    faults = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        body, _, rank = entry.partition("@")
        name, _, hits = body.partition(":")
        if name not in KILL_POINTS + POISON_POINTS:
            raise ValueError(
                f"{ENV} entry {entry!r}: unknown point {name!r}; allowed: "
                f"{list(KILL_POINTS + POISON_POINTS)}"
            )
        first_text, dash, last_text = hits.partition("-")
        try:
            first = int(first_text) if first_text else 1
            last = (int(last_text) if last_text else math.inf) if dash else first
            rank_value = int(rank) if rank else None
        except ValueError as error:
            raise ValueError(
                f"{ENV} entry {entry!r} is malformed; use name[:first[-last]][@rank]"
            ) from error
        faults[name] = Fault(name, first, last, rank_value)
    return faults


def fires(name: str) -> bool:
    """Count a hit of point `name` and say whether the configured fault fires on it."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    fault = parse_faults(spec).get(name)
    if fault is None:
        return False
    if fault.rank is not None and fault.rank != _current_rank():
        return False
    _hits[name] += 1
    return fault.first <= _hits[name] <= fault.last


def _current_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def kill_point(name: str) -> None:
    """SIGKILL this process if a fault is configured for this hit of `name` (no cleanup runs)."""
    if fires(name):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def reset_hits() -> None:
    """Forget hit counts (for tests that run several jobs in one process)."""
    _hits.clear()
