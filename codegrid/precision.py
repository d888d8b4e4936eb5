"""When to compute an op in fp32 on CPU: shared by the attention of the prior and the tokenizer
and by the tokenizer's GroupNorm, whose bf16 CPU kernels were slower than their fp32 ones
(docs/experiments.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.bfloat16, torch.float16)


def cpu_low_precision(x: torch.Tensor) -> bool:
    """True for a CPU tensor in bf16 or fp16, or under CPU autocast (which would run the op in
    bf16). CUDA's autocast already keeps the norms in fp32, and bf16 is SDPA's fast path there."""
    return x.device.type == "cpu" and (x.dtype in LOW_PRECISION or torch.is_autocast_enabled("cpu"))


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA of query (B, H, L, Dh) over key and value (B, H, S, Dh) -> (B, H, L, Dh), computed
    in fp32 on CPU for low-precision inputs or under autocast, returned in the query's dtype.
    `attn_mask`: None or a bool (L, S) mask, True where a query may attend, as in torch's SDPA.

    On CPU, SDPA's bf16 backward was 6x slower than its fp32 one (0.40 s against 0.06 s over 10
    steps of the demo's prior on 2 cores with AMX), while the step's bf16 matmuls took a third
    of their fp32 time: the whole step took 0.099 s in bf16, 0.068 s with fp32 attention, 0.101
    s in fp32 (measured for this project). On GPUs bf16 is SDPA's fast path and stays.
    """
    if not cpu_low_precision(query):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal
        )
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), attn_mask=attn_mask, is_causal=is_causal
        )
    return out.to(query.dtype)
