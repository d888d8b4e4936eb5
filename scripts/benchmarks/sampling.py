"""Benchmark 2 (sampling) and 5 (scaling) of issue 7.

Sampling: 8 captions with classifier-free guidance (16 rows in one batch inside `generate`),
32 text tokens, BOI and 256 image codes. The Hugging Face reference does the same work with
GPT2LMHeadModel.generate at batch 16 from a 33-token prompt (text + BOI), with its KV cache,
`do_sample=True, top_k=0, min_new_tokens=256, max_new_tokens=256`: both sides feed 288
positions per row and sample 256 tokens per row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import Row, Settings, linear_fit, time_one, time_pair
from benchmarks.priors import (
    build_gpt2,
    build_prior,
    decode_flops_per_token,
    hf_vocab,
    prior_config,
    random_text,
)
from prior import generate

GUIDANCE_SCALE = 4.0


def make_sampler(model, settings: Settings, batch: int, use_cache: bool = True):
    """A zero-argument closure sampling `batch` images with CFG; the generator is reseeded on
    every call so each run does identical work."""
    config = model.config
    text = random_text(config, batch, settings.seed, settings.device)
    null = torch.zeros(config.text_length, dtype=torch.long, device=settings.device)

    def run() -> torch.Tensor:
        generator = torch.Generator(device=settings.device).manual_seed(settings.seed)
        return generate(
            model,
            text,
            null_text_ids=null,
            guidance_scale=GUIDANCE_SCALE,
            generator=generator,
            use_cache=use_cache,
        )

    return run


def make_hf_sampler(model, config, rows: int, seed: int):
    """GPT-2 `generate` over `rows` prompts of text_length + 1 tokens, num_image_tokens new."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, hf_vocab(config), (rows, config.text_length + 1), generator=generator)
    mask = torch.ones_like(prompt)
    new = config.num_image_tokens

    def run() -> torch.Tensor:
        torch.manual_seed(seed)
        out = model.generate(
            prompt,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            min_new_tokens=new,
            max_new_tokens=new,
            pad_token_id=0,
        )
        if out.shape[1] != prompt.shape[1] + new:
            raise RuntimeError(f"HF generate returned {out.shape[1] - prompt.shape[1]} tokens")
        return out

    return run


def check_cache_equivalence(settings: Settings, grid: int) -> Row:
    """Codes sampled with the static KV cache equal those of the full recompute (same seed)."""
    model = build_prior(prior_config(settings, grid), settings.seed, settings.device).eval()
    with torch.inference_mode():
        cached = make_sampler(model, settings, 8)()
        plain = make_sampler(model, settings, 8, use_cache=False)()
    same = torch.equal(cached, plain)
    row = Row("sampling", "KV cache codes == no-cache codes", note=f"{grid}x{grid} grid, CFG")
    row.extra = {"equal": same, "mismatches": int((cached != plain).sum())}
    row.passed = same
    return row


def bench_sampling(settings: Settings) -> list[Row]:
    """Ours vs HF generate (throughput) and cached vs uncached (speed-up)."""
    config = prior_config(settings, 16)
    ours = build_prior(config, settings.seed, settings.device).eval()
    theirs = build_gpt2(config, settings.seed, settings.device).eval()
    batch, rows = 8, 16
    ours_s, theirs_s, raw = time_pair(
        make_sampler(ours, settings, batch),
        make_hf_sampler(theirs, config, rows, settings.seed),
        settings,
    )
    images = config.num_image_tokens * batch
    vocab = f"vocab: ours text {config.text_vocab_size} + codebook {config.codebook_size}; HF {hf_vocab(config)}"
    result = [
        Row("sampling", "vs HF GPT2 generate (KV cache), batch 8 CFG = 16 rows, 256 tokens",
            images / ours_s, images / theirs_s, "image tokens/s", theirs_s / ours_s, 1.5,
            note=vocab, extra={"seconds": raw, "hf_attn": theirs.config._attn_implementation}),
    ]  # fmt: skip
    del theirs
    grid = settings.nocache_grid
    small = build_prior(prior_config(settings, grid), settings.seed, settings.device).eval()
    cached_s, plain_s, raw = time_pair(
        make_sampler(small, settings, batch), make_sampler(small, settings, batch, False), settings
    )
    result.append(
        Row("sampling", f"KV cache vs use_cache=False, {grid}x{grid} grid ({grid * grid} tokens)",
            cached_s, plain_s, "s", plain_s / cached_s, 8.0,
            note="shorter grid than 256 tokens: no-cache cost grows ~quadratically",
            extra={"seconds": raw})
    )  # fmt: skip
    result.append(check_cache_equivalence(settings, min(grid, 4)))
    return result


def _memory_probe(settings: Settings, grid: int) -> dict:
    """Peak memory of one sampling call in a fresh process (CPU) or the CUDA allocator."""
    if settings.device != "cpu":
        from benchmarks.common import peak_memory

        model = build_prior(prior_config(settings, grid), settings.seed, settings.device).eval()
        sampler = make_sampler(model, settings, 8)
        sampler()
        with peak_memory(settings.device) as peak:
            sampler()
        return peak
    # glibc keeps freed blocks in its heap unless big blocks are mmapped; a fixed threshold
    # makes the resident set follow live memory, so the sampled RSS peak is meaningful.
    scripts = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(scripts), str(scripts.parent), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=path)
    args = json.dumps({"threads": settings.threads, "smoke": settings.smoke, "seed": settings.seed})
    command = [sys.executable, "-m", "benchmarks.sampling", args, str(grid)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for grid {grid} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_scaling(settings: Settings) -> list[Row]:
    """Time and peak memory of sampling 8 CFG images at 64, 256 and 1024 image tokens."""
    grids = (2, 4, 8) if settings.smoke else (8, 16, 32)
    result, tokens, seconds, memory = [], [], [], []
    for grid in grids:
        config = prior_config(settings, grid)
        model = build_prior(config, settings.seed, settings.device).eval()
        median, raw = time_one(make_sampler(model, settings, 8), settings)
        peak = _memory_probe(settings, grid)
        context = config.text_length + 1 + (config.num_image_tokens - 1) / 2
        total, attention = decode_flops_per_token(config, context)
        tokens.append(grid * grid)
        seconds.append(median)
        memory.append(peak["peak"])
        per_token_ms = 1e3 * median / (grid * grid)
        result.append(
            Row("scaling", f"{grid * grid} image tokens: time per token", per_token_ms, None,
                "ms/token", note=f"peak {peak['peak'] / 2**20:.0f} MiB ({peak['method']}); "
                f"attention {100 * attention / total:.1f}% of FLOPs/token (avg context {context:.0f})",
                extra={"seconds": raw, "peak_bytes": peak["peak"], "attention_share": attention / total})
        )  # fmt: skip
    result.extend(_scaling_fits(settings, tokens, seconds, memory))
    return result


def _scaling_fits(settings: Settings, tokens, seconds, memory) -> list[Row]:
    """Linear fits: per-token time vs tokens (measured and FLOP model) and memory vs tokens."""
    config = prior_config(settings, 16)
    per_token = [s / n for s, n in zip(seconds, tokens)]
    slope, intercept = linear_fit(tokens, per_token)
    flops = [
        decode_flops_per_token(config, config.text_length + 1 + (n - 1) / 2)[0] for n in tokens
    ]
    flop_slope, flop_intercept = linear_fit(tokens, flops)
    measured = slope / intercept  # relative growth of the per-token cost per extra token
    theory = flop_slope / flop_intercept
    mem_slope, _ = linear_fit(tokens, memory)
    kv_bytes = 2 * config.num_layers * 16 * config.d_model * 4  # K and V, 16 rows, fp32
    return [
        Row("scaling", "per-token time slope (linear fit)", 1e6 * slope, None, "us/token per token",
            note=f"relative {100 * measured * 1000:.2f}% per 1000 tokens; FLOP model "
            f"{100 * theory * 1000:.2f}% per 1000 tokens (attention over a growing cache)"),
        Row("scaling", "peak memory slope (linear fit)", mem_slope / 2**10, kv_bytes / 2**10,
            "KiB/token", note="reference = KV cache bytes per position (16 rows, fp32)"),
    ]  # fmt: skip


if __name__ == "__main__":
    # Memory probe: `python -m benchmarks.sampling '{"threads": 2, ...}' GRID` prints one
    # JSON line (run by `_memory_probe` with scripts/ and the repo root on PYTHONPATH).
    from benchmarks.common import peak_memory, set_threads

    options = json.loads(sys.argv[1])
    probe_settings = Settings(**options)
    set_threads(probe_settings.threads)
    grid_size = int(sys.argv[2])
    probe_model = build_prior(prior_config(probe_settings, grid_size), probe_settings.seed).eval()
    probe = make_sampler(probe_model, probe_settings, 8)
    with torch.inference_mode():
        probe()
        with peak_memory("cpu") as measured_peak:
            probe()
    print(json.dumps(measured_peak))
