"""A tiny prior and random batches, shared by the prior and sampling tests."""

from __future__ import annotations

import torch
from torch import nn

from prior import Prior, PriorConfig
from prior.layers import Projection

TINY = dict(
    text_vocab_size=40,
    text_length=6,
    codebook_size=24,
    image_grid=(3, 4),
    d_model=32,
    num_layers=2,
    num_heads=2,
)


def make_prior(**overrides) -> Prior:
    """A tiny prior with random (not zero) heads, so its logits are informative and its sampling
    distributions peaked."""
    model = Prior(PriorConfig(**{**TINY, **overrides}))
    for module in model.modules():
        if isinstance(module, Projection | nn.Embedding):
            nn.init.normal_(module.weight, std=0.3)
    if model.code_features is not None:  # code features are data, not weights: random here
        generator = torch.Generator().manual_seed(7)
        model.code_features.features.uniform_(-1, 1, generator=generator)
    return model.eval()


def random_batch(config: PriorConfig, batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(
        0, config.text_vocab_size, (batch, config.text_length), generator=generator
    )
    codes = torch.randint(0, config.codebook_size, (batch, *config.image_grid), generator=generator)
    return text, codes
