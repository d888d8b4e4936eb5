"""Exponential moving average of model weights (Polyak averaging; as in LlamaGen / diffusers).

The shadow copy lives in fp32 beside the model. It is saved as safetensors tensors plus a JSON
counter (never pickled), and swapped into the model for evaluation and export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

PREFIX = "ema."


class EMA:
    """shadow = decay * shadow + (1 - decay) * weight, after each optimizer step.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) over the n updates made so
    far (the schedule of tf.train.ExponentialMovingAverage's num_updates), so early averages are
    not dominated by the random initialisation. Buffers (e.g. codebook statistics) are not
    averaged: the model's own buffers are used with the averaged parameters.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay!r} is invalid; allowed: 0 < decay < 1")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {
            name: parameter.detach().float().clone()
            for name, parameter in model.named_parameters()
            if parameter.is_floating_point()
        }

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        named = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(named))
        if missing:
            raise ValueError(f"EMA: model lacks parameters {missing[:5]}; wrong model?")
        return [self.shadow[name] for name in self.shadow], [named[name] for name in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards the model's current parameters."""
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadow, current = self._pairs(model)
        torch._foreach_lerp_(shadow, [p.detach().float() for p in current], 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (cast to each parameter's dtype)."""
        for shadow, parameter in zip(*self._pairs(model)):
            parameter.copy_(shadow.to(parameter.dtype))

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily run `model` with the averaged weights (e.g. for validation)."""
        backup = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    parameter.copy_(backup[name])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Shadow weights keyed `ema.<parameter name>` (for safetensors)."""
        return {PREFIX + name: tensor for name, tensor in self.shadow.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        """Restore from `state_tensors()` output; every key must match (error names them)."""
        loaded = {
            key[len(PREFIX) :]: value for key, value in tensors.items() if key.startswith(PREFIX)
        }
        if set(loaded) != set(self.shadow):
            missing, unexpected = set(self.shadow) - set(loaded), set(loaded) - set(self.shadow)
            raise ValueError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for name, value in loaded.items():
            self.shadow[name].copy_(value)
        self.num_updates = int(num_updates)
