"""A static key/value cache for one call of `prior.generate`.

The cache is allocated per call and passed to the model as an argument; it is never stored on
the module, so sampling stays a pure function and one `Prior` can serve several threads at once
(issue 8, item 8). Buffers are preallocated for the whole sequence and written in place, so a
decode step neither concatenates nor reallocates (the gpt-fast / LlamaGen `setup_caches` idea).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values for `batch_size` rows and `max_length` positions.

    Attributes:
        keys: (num_layers, B, H, max_length, head_dim); only positions already written are valid.
        values: same shape as `keys`.
    """

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        max_length: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> KVCache:
        """Allocate uninitialised buffers; positions are only read after they are written."""
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        return cls(
            keys=torch.empty(shape, device=device, dtype=dtype),
            values=torch.empty(shape, device=device, dtype=dtype),
        )

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, H, max_length, head_dim) key and value buffers of layer `index` (views)."""
        return self.keys[index], self.values[index]
