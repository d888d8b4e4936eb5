"""Benchmark 3 of issue 7: one prior training step against GPT2LMHeadModel of the same dims.

A step is forward, loss, backward, AdamW step and zeroing the gradients, at batch 16 and
sequence 288 (32 text tokens + BOI + 255 codes as inputs, 256 code targets). GPT-2 sees 288
ids of its shared vocabulary and, as in HF, computes logits and loss at every position.
Achieved FLOP/s use the formula in `benchmarks.priors.training_flops`, against the measured
fp32 matmul peak of this machine.
"""

from __future__ import annotations

import torch

from benchmarks.common import Row, Settings, matmul_peak_flops, time_pair
from benchmarks.priors import (
    build_gpt2,
    build_prior,
    hf_vocab,
    prior_config,
    random_text,
    training_flops,
)

BATCH = 16


def make_prior_step(model, config, settings: Settings, batch: int, autocast_dtype=None):
    """A closure running one AdamW training step of our prior on fixed random data; with
    `autocast_dtype` the forward runs under `torch.autocast` of the model's device type."""
    text = random_text(config, batch, settings.seed, settings.device)
    generator = torch.Generator().manual_seed(settings.seed)
    grid = (batch, *config.image_grid)
    codes = torch.randint(0, config.codebook_size, grid, generator=generator).to(settings.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    device_type = torch.device(settings.device).type
    enabled = autocast_dtype is not None

    def step() -> float:
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=enabled):
            loss = model(text, codes).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    return step


def make_gpt2_step(model, config, settings: Settings, batch: int):
    """A closure running one AdamW training step of GPT-2 on the same token count."""
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (batch, config.sequence_length)
    ids = torch.randint(1, hf_vocab(config), shape, generator=generator).to(settings.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    return step


def bench_training(settings: Settings) -> list[Row]:
    """Tokens/s ours vs GPT-2, and our achieved FLOP/s as a share of the sgemm peak."""
    config = prior_config(settings, 4 if settings.smoke else 16)
    batch = 2 if settings.smoke else BATCH
    ours = build_prior(config, settings.seed, settings.device).train()
    theirs = build_gpt2(config, settings.seed, settings.device).train()
    ours_s, theirs_s, raw = time_pair(
        make_prior_step(ours, config, settings, batch),
        make_gpt2_step(theirs, config, settings, batch),
        settings,
        inference=False,
    )
    tokens = batch * config.sequence_length
    flops, formula = training_flops(config, batch)
    size = 512 if settings.smoke else 4096
    peak = matmul_peak_flops(size, torch.float32, settings)
    achieved = flops / ours_s
    parameters = (ours.num_parameters(), sum(p.numel() for p in theirs.parameters()))
    return [
        Row("train", f"training step tokens/s vs GPT2LMHeadModel, batch {batch} x seq "
            f"{config.sequence_length}", tokens / ours_s, tokens / theirs_s, "tokens/s",
            theirs_s / ours_s, 1.2, note=f"parameters ours {parameters[0]:,}, GPT-2 "
            f"{parameters[1]:,} (vocab {hf_vocab(config)}, full-vocab head)",
            extra={"seconds": raw}),
        Row("train", f"achieved FLOP/s vs measured fp32 sgemm peak ({size}^3)", achieved / 1e9,
            peak / 1e9, "GFLOP/s", achieved / peak, 0.5, note=formula),
    ]  # fmt: skip
