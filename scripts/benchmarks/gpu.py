"""`bench.py gpu`: one prepared accelerator run, writing JSON after each measurement.

On one H200 the matmul peak and the training section took well under 2 minutes; eager sampling
and the tokenizer about 1 more; compiled sampling did not finish its first call in 85 s there
(`--gpu-sections` runs a subset; README "GPU").

Measures, on one CUDA device:
- the bf16 matmul peak (8192^3, median of runs) beside the card's dense bf16 spec;
- prior training with bf16 autocast and `torch.compile`: tokens/s and MFU against both;
- sampling latency and throughput at 256 image tokens with CFG, batch 1 and 64;
- tokenizer encode and decode throughput at 256 px (bf16 autocast).

The prior is the "B" preset (d_model 768, 12 layers, 12 heads, 16384 codes, 128 text tokens:
LlamaGen GPT-B scale, 134.8M parameters with its 16384-code head); the tokenizer is taming's
f16 architecture with 16384 codes. Only torch and this source tree are imported: no
transformers, datasets or diffusers. `--smoke` shrinks every model so the same code runs on
CPU in seconds.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable

import torch

from benchmarks.common import Settings, matmul_peak_flops, time_one, timed

SECTIONS = ("train", "sampling", "tokenizer")  # the measurements after the matmul peak

# Dense bf16 tensor-core peaks from the vendors' spec sheets (no sparsity), TFLOP/s.
SPEC_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def spec_peak(device: torch.device) -> float | None:
    """The spec-sheet dense bf16 FLOP/s of the card, when its name is known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in SPEC_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def _prior_config(settings: Settings):
    from prior import PriorConfig

    if settings.smoke:
        return PriorConfig.from_preset("cpu-tiny", image_grid=(4, 4), text_length=8)
    return PriorConfig.from_preset("B", dropout=0.0)


def bench_train(settings: Settings, batch: int, steps: int, compile_model: bool) -> dict:
    """bf16 autocast + optional torch.compile training steps; per-step median after warm-up."""
    from benchmarks.priors import build_prior, random_text, training_flops

    config = _prior_config(settings)
    model = build_prior(config, settings.seed, settings.device).train()
    text = random_text(config, batch, settings.seed, settings.device)
    shape = (batch, *config.image_grid)
    codes = torch.randint(0, config.codebook_size, shape, device=settings.device)
    fused = settings.device != "cpu"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    forward = torch.compile(model) if compile_model else model
    device_type = torch.device(settings.device).type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = forward(text, codes).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # compilation happens here
    compile_s = time.perf_counter() - start
    warm = Settings(**{**settings.__dict__, "runs": steps, "warmup": 2})
    seconds, raw = time_one(step, warm, inference=False)
    flops, formula = training_flops(config, batch)
    return {
        "parameters": model.num_parameters(),
        "batch": batch,
        "sequence_length": config.sequence_length,
        "tokens_per_s": batch * config.sequence_length / seconds,
        "step_s": seconds,
        "step_s_all": raw,
        "first_step_s": compile_s,
        "flops_per_step": flops,
        "flops_formula": formula,
        "achieved_flops": flops / seconds,
        "compiled": compile_model,
    }


def bench_sampling(settings: Settings, batches: tuple[int, ...], compile_step: bool) -> dict:
    """Latency (seconds per call) and image tokens/s of CFG sampling at each batch size."""
    from benchmarks.priors import build_prior, random_text
    from prior import generate

    config = _prior_config(settings)
    model = build_prior(config, settings.seed, settings.device).eval()
    null = torch.zeros(config.text_length, dtype=torch.long, device=settings.device)
    device_type = torch.device(settings.device).type
    result = {}
    for batch in batches:
        text = random_text(config, batch, settings.seed, settings.device)

        def run(text=text) -> torch.Tensor:
            generator = torch.Generator(device=settings.device).manual_seed(settings.seed)
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return generate(model, text, null_text_ids=null, guidance_scale=4.0,
                                generator=generator, compile_decode_step=compile_step)  # fmt: skip

        first_call_s = timed(run, settings.device)  # pays for compilation and CUDA warm-up
        seconds, raw = time_one(run, settings)
        result[f"batch_{batch}"] = {
            "first_call_s": first_call_s,
            "latency_s": seconds,
            "image_tokens_per_s": batch * config.num_image_tokens / seconds,
            "images_per_s": batch / seconds,
            "seconds_all": raw,
        }
    result.update(image_tokens=config.num_image_tokens, cfg=True, compiled_step=compile_step)
    return result


def bench_tokenizer(settings: Settings, batch: int) -> dict:
    """Encode and decode images/s at the tokenizer's resolution under bf16 autocast."""
    from tokenizer import VQGAN, VQGANConfig

    name = "cpu-tiny" if settings.smoke else "taming-f16-16384"
    torch.manual_seed(settings.seed)
    model = VQGAN(VQGANConfig.from_preset(name)).to(settings.device).eval()
    size = model.config.resolution
    images = torch.rand(batch, 3, size, size, device=settings.device) * 2 - 1
    codes = model.encode(images)
    device_type = torch.device(settings.device).type

    def encode() -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return model.encode(images)

    def decode() -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return model.decode(codes)

    encode_s, _ = time_one(encode, settings)
    decode_s, _ = time_one(decode, settings)
    return {"preset": name, "resolution": size, "batch": batch,
            "encode_images_per_s": batch / encode_s, "decode_images_per_s": batch / decode_s}  # fmt: skip


def run_gpu(
    settings: Settings,
    compile_model: bool = True,
    on_section: Callable[[dict], None] | None = None,
    sections: tuple[str, ...] = SECTIONS,
) -> dict:
    """The matmul peak, then each measurement of `sections` in order; a JSON-able dict.

    `on_section(result)` is called after each measurement with what is known so far, so that a
    run cut short by the accelerator's time limit still leaves its finished figures behind. A
    section that raises is recorded as {"error": ...} and the next one still runs: an
    accelerator lease is too short to lose every figure to one failure."""
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise ValueError(f"sections={sections!r}: unknown {unknown}; use names of {SECTIONS}")
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda but torch.cuda.is_available() is False; use --smoke --device cpu"
        )
    torch.backends.cuda.matmul.allow_tf32 = True
    report = on_section or (lambda result: None)
    size = 512 if settings.smoke else 8192
    peak = matmul_peak_flops(size, torch.bfloat16, settings, device)
    spec = spec_peak(device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "model": "prior preset 'B' (LlamaGen GPT-B scale)" if not settings.smoke else "cpu-tiny",
        "bf16_matmul_peak_measured_flops": peak,
        "bf16_matmul_size": size,
        "bf16_peak_spec_flops": spec,
    }
    report(result)
    for name in sections:
        try:
            if name == "train":
                batch = 2 if settings.smoke else 64
                train = bench_train(settings, batch, settings.runs + 5, compile_model)
                train["mfu_vs_measured_peak"] = train["achieved_flops"] / peak
                train["mfu_vs_spec_peak"] = None if spec is None else train["achieved_flops"] / spec
                result["train"] = train
            elif name == "sampling":
                batches = (1, 2) if settings.smoke else (1, 64)
                result["sampling"] = bench_sampling(settings, batches, compile_model)
            elif name == "tokenizer":
                result["tokenizer"] = bench_tokenizer(settings, 2 if settings.smoke else 32)
        except Exception as error:  # recorded in the JSON and on stderr, never hidden
            print(f"bench gpu: section {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
            result[name] = {"error": repr(error)}
        report(result)
    return result
