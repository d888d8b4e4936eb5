"""Non-finite step guards: skip a step whose loss or gradients are NaN/Inf, on every rank.

A step is skipped when ANY rank sees a non-finite value (the flag is summed over ranks), so all
ranks skip together and their weights never diverge. Buffers that the forward pass updates in
place (codebook EMA statistics, dead-code counters) are restored from a snapshot, so a skipped
step leaves the model exactly as it was. After `max_consecutive` skips in a row the job stops
with an error that names the last good checkpoint; weights are never written while non-finite.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import Accelerator
from torch import nn


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row."""


def locally_nonfinite(losses: Iterable[torch.Tensor], parameters: Iterable[nn.Parameter]) -> bool:
    """True if any loss or any parameter gradient on this rank holds NaN or Inf."""
    values = [loss.detach().float().reshape(1) for loss in losses]
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        # One fused reduction instead of a sync per tensor.
        values.append(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).sum()[None])
    return not bool(torch.isfinite(torch.cat(values)).all())


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is True on at least one rank (an all-reduce of the flag)."""
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return accelerator.reduce(value, reduction="sum").item() > 0


def reduce_step(
    accelerator: Accelerator, nonfinite: bool, terms: dict[str, torch.Tensor | float]
) -> tuple[bool, dict[str, float]]:
    """One all-reduce for the step: (skip on every rank?, each term averaged over ranks).

    The skip flag is summed, so one rank's NaN makes all ranks skip together.
    """
    names = list(terms)
    values = [torch.as_tensor(terms[name], dtype=torch.float32).reshape(()).cpu() for name in names]
    packed = torch.stack([torch.tensor(1.0 if nonfinite else 0.0), *values]).to(accelerator.device)
    packed = accelerator.reduce(packed, reduction="sum")
    means = (packed[1:] / accelerator.num_processes).tolist()
    return packed[0].item() > 0, dict(zip(names, means))


def assert_finite_weights(model: nn.Module, what: str) -> None:
    """Raise ValueError naming the first non-finite floating tensor of `model`."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to write {what}: tensor {name!r} holds NaN or Inf")


class StateSnapshot:
    """Copies of the tensors a forward pass rewrites in place, restored when a step is skipped.

    `full` modules have all their parameters and buffers copied (a quantizer whose codebook
    is updated by EMA or dead-code restarts); `buffers_only` modules only their buffers
    (BatchNorm running statistics). Keep both small: this runs every step.
    """

    def __init__(self, full: Iterable[nn.Module] = (), buffers_only: Iterable[nn.Module] = ()):
        self.full, self.buffers_only = list(full), list(buffers_only)
        self.saved: list[list[torch.Tensor]] = []

    def _tensors(self) -> list[list[torch.Tensor]]:
        groups = [[*module.parameters(), *module.buffers()] for module in self.full]
        return groups + [list(module.buffers()) for module in self.buffers_only]

    def capture(self) -> None:
        self.saved = [[tensor.detach().clone() for tensor in group] for group in self._tensors()]

    @torch.no_grad()
    def restore(self) -> None:
        for group, saved in zip(self._tensors(), self.saved):
            for tensor, copy in zip(group, saved):
                tensor.copy_(copy)


class NonFiniteGuard:
    """Counts skipped steps; raises after `max_consecutive` in a row (0 disables the stop)."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def record(self, skipped: bool, step: int, last_checkpoint: str | None) -> None:
        """Record the outcome of `step`; raise NonFiniteLossError when the limit is reached."""
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} non-finite steps in a row (last at step {step}, "
                f"--max-nonfinite-steps {self.max_consecutive}); no weights were written since. "
                f"Last good checkpoint: {last_checkpoint or '(none written yet)'}. Lower the "
                "learning rate or use --mixed-precision no, then resume from it with --resume"
            )

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_consecutive": self.consecutive, "nonfinite_total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state.get("nonfinite_consecutive", 0))
        self.total = int(state.get("nonfinite_total", 0))
