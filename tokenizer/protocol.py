"""The interface every image tokenizer offers to the pipelines and the prior's training jobs."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ImageTokenizer(Protocol):
    """Maps images (B, 3, H, W) floats in [-1, 1] to integer codes (B, h, w) and back.

    `isinstance(obj, ImageTokenizer)` checks that the members exist, not their signatures.
    """

    codebook_size: int
    """Number of distinct codes; codes lie in [0, codebook_size)."""
    downsample_factor: int
    """Pixels per code along each side: h = H / downsample_factor."""
    can_decode: bool
    """False for encode-only tokenizers (then `decode` raises NotImplementedError)."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """Code grid (h, w) for images of (height, width); ValueError if not divisible."""
        ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float in [-1, 1] -> codes (B, h, w) int64."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) int64 -> images (B, 3, H, W) float in [-1, 1]."""
        ...

    def identity(self) -> dict:
        """JSON-able fingerprint (class, config and weight hashes, codebook size, grid) that
        extracted codes carry, so a prior is never trained or sampled with another tokenizer."""
        ...
