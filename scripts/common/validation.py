"""Argument checks shared by the jobs: each failure is a ValueError naming the flag, the value
and what is allowed (argparse's own errors exit instead, which tests and callers cannot catch)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any


def flag(name: str) -> str:
    """`batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{flag(name)}={value!r} is invalid; allowed: {allowed}")


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """Every named value must be > 0 (None is allowed: the option is unset)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise _fail(name, value, "a number > 0")


def require_non_negative(args: argparse.Namespace, *names: str) -> None:
    """Every named value must be >= 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise _fail(name, value, "a number >= 0")


def require_fraction(args: argparse.Namespace, *names: str, upper_open: bool = False) -> None:
    """Every named value must be in [0, 1] (or [0, 1) with `upper_open`)."""
    for name in names:
        value = getattr(args, name)
        if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
            raise _fail(name, value, "a number in [0, 1)" if upper_open else "a number in [0, 1]")


def require_choice(args: argparse.Namespace, name: str, allowed: Iterable[str]) -> None:
    """The value must be one of `allowed` (listed in the error)."""
    allowed = sorted(allowed)
    value = getattr(args, name)
    if value not in allowed:
        raise _fail(name, value, f"one of {allowed}")


def require_steps(args: argparse.Namespace) -> None:
    """A run needs --max-steps, --time-budget-minutes, or both."""
    if args.max_steps is None and args.time_budget_minutes is None:
        raise ValueError(
            "--max-steps and --time-budget-minutes are both unset; allowed: give one or both "
            "(e.g. --max-steps 2000 or --time-budget-minutes 5)"
        )
    stretch = {"min_steps": args.min_steps, "time_limit_minutes": args.time_limit_minutes}
    for name, value in stretch.items():
        if value is not None and args.time_budget_minutes is None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag}={value} needs --time-budget-minutes; allowed: a budget with it, or drop "
                f"{flag} (--max-steps alone fixes the step count)"
            )
    limit, budget = args.time_limit_minutes, args.time_budget_minutes
    if limit is not None and limit < budget:
        raise ValueError(
            f"--time-limit-minutes={limit} is below --time-budget-minutes={budget}; allowed: a "
            "limit >= the budget"
        )
