"""Optimizer parameter groups."""

from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the matrices of linear/conv layers only; none on norms,
    biases and embeddings (GPT-2 / nanoGPT practice). Shared (tied) parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if id(parameter) in seen or not parameter.requires_grad:
                continue
            seen.add(id(parameter))
            plain = isinstance(module, nn.Embedding) or parameter.ndim < 2
            (no_decay if plain else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
