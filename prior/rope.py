"""2D rotary position embedding (RoPE) for `[text][BOI][image grid]` sequences.

A text token at index i sits at (i, i), which is plain 1D RoPE; BOI at (T, T); image cell (r, c)
at (T + 1 + r, T + 1 + c). Half of the rotary pairs turn with the first coordinate and half
with the second (2D RoPE as in LlamaGen), so attention scores between image cells depend on
their 2D offset. Every prefix position is a real rotation: LlamaGen's all-zero prefix rows
would turn prefix queries and keys into zero vectors (anchors-taming-llamagen.md 2.4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from prior.model import PriorConfig


def rope_table(config: PriorConfig) -> torch.Tensor:
    """(cos, sin) of the rotation angles, fp32 (text_length + 1 + h*w, head_dim / 2, 2).

    Rotary pair j is (2j, 2j + 1) of the head dimension; pairs j < head_dim / 4 turn with the
    row coordinate and the others with the column coordinate, at the same frequencies.
    """
    text_length, (height, width) = config.text_length, config.image_grid
    prefix = torch.arange(text_length + 1, dtype=torch.float64)  # text tokens and BOI
    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width) + text_length + 1
    cols = torch.arange(width, dtype=torch.float64).repeat(height) + text_length + 1
    quarter = config.head_dim // 4
    inv_freq = config.rope_theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    row_angles = torch.cat([prefix, rows])[:, None] * inv_freq  # (L, Dh/4)
    col_angles = torch.cat([prefix, cols])[:, None] * inv_freq  # (L, Dh/4)
    angles = torch.cat([row_angles, col_angles], dim=1)  # (L, Dh/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (L, Dh/2, 2)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of x (B, L, n, H, Dh) by rotations (L, Dh/2, 2), in fp32.

    Eager mode uses one complex multiply (the fastest on CPU); under torch.compile the same
    math runs in real arithmetic, since inductor has no complex kernels.
    """
    rotations = rotations[:, None, None]  # (L, 1, 1, Dh/2, 2)
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, n, H, Dh/2, 2)
    if torch.compiler.is_compiling():
        return rope_real(pairs, rotations).type_as(x)
    rotated = torch.view_as_complex(pairs) * torch.view_as_complex(rotations)  # (B, L, n, H, Dh/2)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)  # (B, L, n, H, Dh)


def rope_real(pairs: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """The complex multiply of `apply_rope` in reals: pairs (..., Dh/2, 2) -> (..., Dh)."""
    cos, sin = rotations.unbind(-1)  # (..., Dh/2) each
    first, second = pairs.unbind(-1)  # (..., Dh/2) each
    real, imaginary = first * cos - second * sin, second * cos + first * sin  # (..., Dh/2) each
    return torch.stack([real, imaginary], -1).flatten(-2)  # (..., Dh/2, 2) -> (..., Dh)
