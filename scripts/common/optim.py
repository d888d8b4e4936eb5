"""Optimizer parameter groups."""

from __future__ import annotations

import torch
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


def adamw(
    model: nn.Module, learning_rate: float, weight_decay: float, betas, eps: float
) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel (one pass over all tensors; on 2 CPU cores
    the tiny tokenizer's optimizer step fell from 6.6 ms to 1.1 ms, about 5% of a training step).
    torch's default on CPU is a Python loop over tensors."""
    groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, learning_rate, betas=betas, eps=eps, fused=True)
