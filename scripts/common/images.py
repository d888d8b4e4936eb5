"""Small image helpers for the training jobs' PNG grids (reconstructions, samples, code maps)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tensor_grid(images: torch.Tensor, columns: int, padding: int = 2) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] -> uint8 array (rows*H', columns*W', 3), white padding."""
    count, _, height, width = images.shape
    rows = -(-count // columns)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    canvas = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, 3),
        255,
        dtype=np.uint8,
    )
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        canvas[top : top + height, left : left + width] = pixels[index].permute(1, 2, 0).numpy()
    return canvas


def codes_to_images(codes: torch.Tensor, codebook_size: int, scale: int = 4) -> torch.Tensor:
    """Code grids (N, h, w) -> images (N, 3, h*scale, w*scale) in [-1, 1]: each code id gets a
    fixed pseudo-random colour, so equal ids look equal (for priors without a decoder)."""
    generator = torch.Generator().manual_seed(0)
    palette = torch.rand(codebook_size, 3, generator=generator) * 2 - 1  # (K, 3)
    images = palette[codes.long().cpu()].permute(0, 3, 1, 2)  # (N, 3, h, w)
    return images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB uint8 array as PNG through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
