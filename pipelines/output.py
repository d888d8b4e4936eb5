"""The pipeline's return type and the conversion of decoded images to the requested output type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class ImagePipelineOutput:
    """What `TextToImagePipeline.__call__` returns.

    Attributes:
        images: `output_type="pil"`: a list of B RGB `PIL.Image`s;
            `"np"`: a float32 array (B, H, W, 3) in [0, 1];
            `"pt"`: a float32 CPU tensor (B, 3, H, W) in [0, 1].
            Row order is prompt-major: the images of prompt 0 first, then those of prompt 1, ...
        codes: the sampled image codes, a CPU LongTensor (B, h, w) in [0, codebook_size).
    """

    images: Any
    codes: torch.Tensor


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map decoder output (B, 3, H, W) in [-1, 1] to float32 CPU (B, 3, H, W) in [0, 1]."""
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float (B, 3, H, W) in [0, 1] -> B RGB PIL images (rounded to uint8)."""
    pixels = (images * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(row), mode="RGB") for row in pixels]


def postprocess(images: torch.Tensor, output_type: str) -> Any:
    """Convert decoder output (B, 3, H, W) in [-1, 1] to `output_type` ("pil", "np" or "pt")."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} is not supported; use one of {OUTPUT_TYPES}")
    unit = to_unit_range(images)  # (B, 3, H, W) in [0, 1]
    if output_type == "pt":
        return unit
    if output_type == "np":
        return unit.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return to_pil(unit)


def make_grid(images: list[Image.Image], columns: int, padding: int = 2) -> Image.Image:
    """Tile equally sized PIL images row by row into one image with `padding` white pixels between."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if columns < 1:
        raise ValueError(f"columns={columns} must be >= 1")
    width, height = images[0].size
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new(
        "RGB",
        (columns * width + (columns + 1) * padding, rows * height + (rows + 1) * padding),
        color=(255, 255, 255),
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(
            image, (padding + column * (width + padding), padding + row * (height + padding))
        )
    return grid
