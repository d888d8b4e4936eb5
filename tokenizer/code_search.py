"""Code search: choose each code by the decoded error, not only by the latent distance.

The nearest code to an encoder output is the best code in latent space, which is not always the
code whose decoded pixels are nearest the image: on Shapes, 20% of the uses of the demo
tokenizer's object-edge codes were codes mostly used for another colour, and their decodes put
blotches of a neighbouring hue (purple in pink, red in orange) inside clean objects. Choosing
among the few nearest codes by the error of the decoded image is analysis-by-synthesis, as
code-excited linear prediction searches its codebook for speech (Schroeder & Atal 1985).

Changing one code changes the decoded pixels around it, so the search works on four
interleaved sub-grids of code positions (even/odd row x even/odd column), one after the other;
positions of one sub-grid are two apart, and each is judged by the squared error of the 3 x 3
codes around it. A code is swapped only when that error falls by more than `threshold`, so
codes that decode almost alike (plain background) keep their nearest code and the codes stay
as regular as the encoder made them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def window_error(reconstruction: torch.Tensor, images: torch.Tensor, factor: int) -> torch.Tensor:
    """Squared error summed over channels and the 3 x 3 code window around each code.

    reconstruction, images: (B, C, H, W) in [-1, 1]; factor: pixels per code side.
    Returns (B, H/factor, W/factor) fp32; windows at the border are cut off by the image."""
    error = (reconstruction.float() - images.float()).pow(2).sum(1, keepdim=True)  # (B, 1, H, W)
    per_code = F.avg_pool2d(error, factor) * factor**2  # (B, 1, h, w)
    window = F.avg_pool2d(per_code, 3, stride=1, padding=1, count_include_pad=True) * 9
    return window.squeeze(1)  # (B, h, w)


def search_codes(
    decode: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    candidates: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Codes for `images` chosen among `candidates` by their decoded error.

    decode: codes (B, h, w) -> images (B, C, H, W) in [-1, 1]; images: (B, C, H, W) in [-1, 1];
    candidates: (B, h, w, R) int64, the R latent-nearest codes of each position, nearest first;
    threshold: the least fall of the window error (`window_error`, in squared [-1, 1] units)
    that swaps a code. Returns (B, h, w) int64; with R = 1 the nearest codes.

    At most 4R + 1 decodes of the batch (the nearest codes, 4 (R - 1) trials, 4 re-decodes);
    deterministic."""
    codes = candidates[..., 0].clone()  # (B, h, w)
    num_candidates = candidates.shape[-1]
    if num_candidates == 1:
        return codes
    height, width = codes.shape[1:]
    factor = images.shape[-1] // width
    rows = torch.arange(height, device=codes.device)[:, None] % 2  # (h, 1)
    cols = torch.arange(width, device=codes.device)[None, :] % 2  # (1, w)
    error = window_error(decode(codes), images, factor)  # (B, h, w)
    for sub_grid in range(4):
        chosen = rows * 2 + cols == sub_grid  # (h, w)
        # Only a window whose error exceeds the threshold can fall by more than it.
        active = (chosen & (error > threshold)).flatten(1).any(1)  # (B,)
        if not active.any():
            continue
        trial_images, current = images[active], codes[active]  # (A, C, H, W), (A, h, w)
        options, best = candidates[active], current  # (A, h, w, R), (A, h, w)
        best_error = error[active] - threshold  # (A, h, w)
        for rank in range(1, num_candidates):
            trial = torch.where(chosen, options[..., rank], current)  # (A, h, w)
            trial_error = window_error(decode(trial), trial_images, factor)  # (A, h, w)
            better = chosen & (trial_error < best_error)  # (A, h, w)
            best = torch.where(better, trial, best)
            best_error = torch.where(better, trial_error, best_error)
        codes[active] = best
        error[active] = window_error(decode(best), trial_images, factor)
    return codes
