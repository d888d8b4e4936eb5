"""When to compute an op in fp32 on CPU: shared by the prior's attention and the tokenizer's
GroupNorm, whose bf16 CPU kernels were slower than their fp32 ones (docs/experiments.md)."""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def cpu_low_precision(x: torch.Tensor) -> bool:
    """True for a CPU tensor in bf16 or fp16, or under CPU autocast (which would run the op in
    bf16). CUDA's autocast already keeps the norms in fp32, and bf16 is SDPA's fast path there."""
    return x.device.type == "cpu" and (x.dtype in LOW_PRECISION or torch.is_autocast_enabled("cpu"))
