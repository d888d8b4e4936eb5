"""In-training validation of both jobs, split over ranks and reduced: reconstruction PSNR and
codebook usage of the tokenizer, and nats per image token of the prior."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch import nn


def _shard(length: int, accelerator: Accelerator) -> list[int]:
    """This rank's items: every world-th index, so ranks see disjoint parts covering all."""
    return list(range(accelerator.process_index, length, accelerator.num_processes))


@torch.no_grad()
def reconstruction_metrics(
    vqgan: nn.Module, dataset: Any, accelerator: Accelerator, batch_size: int
) -> dict[str, float]:
    """PSNR in dB (mean over images, images in [-1, 1] compared on a [0, 1] scale) and the
    codebook usage (fraction of codes used, 0..1) and perplexity over the whole dataset.

    Every rank must call; `vqgan` is the unwrapped model in eval mode. Resets its usage window.
    """
    vqgan.reset_codebook_usage()
    indices = _shard(len(dataset), accelerator)
    totals = torch.zeros(2, device=accelerator.device)  # (sum of PSNR, image count)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        images = torch.stack([dataset[i]["image"] for i in chunk]).to(accelerator.device)
        with accelerator.autocast():
            reconstruction = vqgan(images).reconstruction.float().clamp(-1, 1)
        mse = ((reconstruction - images) / 2).pow(2).flatten(1).mean(1)  # (B,) in [0, 1]
        psnr = -10 * torch.log10(mse.clamp_min(1e-10))  # (B,)
        totals += torch.stack([psnr.sum(), psnr.new_tensor(float(len(chunk)))])
    totals = accelerator.reduce(totals, reduction="sum")
    usage = vqgan.codebook_usage(all_reduce=True)
    vqgan.reset_codebook_usage()
    return {
        "val_psnr": (totals[0] / totals[1]).item(),
        "val_usage": usage["usage"],
        "val_perplexity": usage["perplexity"],
    }


@torch.no_grad()
def image_token_loss(
    prior: nn.Module,
    text: torch.Tensor,
    codes: torch.Tensor,
    accelerator: Accelerator,
    batch_size: int,
) -> float:
    """Mean cross-entropy in nats per image token of text ids (N, T) and codes (N, h, w) under
    the unwrapped `prior` (eval mode). Every rank must call."""
    indices = torch.tensor(_shard(len(codes), accelerator), dtype=torch.long)
    totals = torch.zeros(2, device=accelerator.device)  # (summed nats, token count)
    for chunk in indices.split(batch_size):
        batch_text = text[chunk].to(accelerator.device)
        batch_codes = codes[chunk].to(accelerator.device)
        with accelerator.autocast():
            loss = prior(batch_text, batch_codes).image_loss.float()  # mean over the chunk
        tokens = float(batch_codes[0].numel() * len(chunk))
        totals += torch.stack([loss * tokens, loss.new_tensor(tokens)])
    totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item()
