"""Prototypes of tokenizer speed levers, measured against our unchanged VQGAN (`--levers`).

Nothing here changes `tokenizer/`: each lever is applied to a copy of the benchmark model so
its effect can be measured, and each copy must equal the unchanged model within 1e-4 before
it is timed. The levers that help are recommended as a diff to `tokenizer/modules.py`.

- channels_last: weights and input in NHWC, oneDNN's native layout, so no conv reorders.
- compile: `torch.compile` (inductor; fuses GroupNorm + swish, prepacks conv weights).
"""

from __future__ import annotations

import copy

import torch

from benchmarks.common import Row, Settings, time_pair
from tokenizer import VQGAN


def lever_variants(model: VQGAN, compile_model: bool) -> dict:
    """name -> (model, input memory format) for every lever and combination measured."""
    last = torch.channels_last
    variants = {"channels_last": (copy.deepcopy(model).to(memory_format=last), last)}
    if compile_model:
        compiled = copy.deepcopy(model)
        compiled.encoder = torch.compile(compiled.encoder)
        compiled.decoder = torch.compile(compiled.decoder)
        variants["compile"] = (compiled, torch.contiguous_format)
    return variants


def bench_levers(
    model: VQGAN, images: torch.Tensor, settings: Settings, compile_model: bool
) -> list[Row]:
    """Time of each lever / time of the unchanged model, after an equivalence check."""
    rows = []
    with torch.inference_mode():
        expected = model.decode(model.encode(images))
    for name, (variant, memory_format) in lever_variants(model, compile_model).items():
        batch = images.contiguous(memory_format=memory_format)
        with torch.inference_mode():
            difference = float((variant.decode(variant.encode(batch)) - expected).abs().max())
        lever_s, base_s, raw = time_pair(
            lambda v=variant, b=batch: v.decode(v.encode(b)),
            lambda: model.decode(model.encode(images)),
            settings,
        )
        rows.append(
            Row(
                "tokenizer-lever",
                f"{name}: time lever/unchanged ours",
                lever_s,
                base_s,
                "s",
                lever_s / base_s,
                note=f"max abs diff vs unchanged {difference:.1e}",
                extra={"seconds": raw, "max_abs_diff": difference},
                passed=difference <= 1e-4,
            )
        )
    return rows
