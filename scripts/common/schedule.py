"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

The rate is a pure function of the optimizer step and the total step count, both of which are
in every checkpoint, so a resumed run continues on exactly the same curve without pickling a
scheduler object. (A `torch.optim.lr_scheduler` prepared by accelerate would also step once per
process, which changes the curve with the number of processes.)
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier in [min_ratio, 1] for optimizer step `step` (0-based).

    Linear warmup from 1/warmup_steps to 1 over `warmup_steps`, then a half cosine from 1 down
    to `min_ratio` at `total_steps` (Loshchilov & Hutter 2017, SGDR without restarts).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    """Set every parameter group's `lr` (groups keep their own weight decay)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
