"""bf16 autocast against fp32 on this CPU: the matmul peak and the demo's two training steps.

On CPUs with native bf16 (AMX on Intel Sapphire Rapids and later; AVX512-BF16 on Intel Cooper
Lake, Sapphire Rapids and later and on AMD Zen 4; `amx_bf16` / `avx512_bf16` in /proc/cpuinfo)
bf16 matmuls ran about 2.2x (an AMD EPYC) to 4.9-5.6x (an AMX Xeon) faster than fp32 ones,
which is why `scripts/demo.py --precision auto` trains both stages under bf16 there. This
measures what that claim rests on, on the machine at hand:

- the matmul peak, bf16 against fp32 (4096^3; 512^3 with --smoke);
- one training step of the demo's prior (`cpu-tiny` with 1024 codes, 20 text tokens attending
  to themselves only, batch 16, the matte features' two groups with a random feature table, AdamW), fp32 against `torch.autocast("cpu", torch.bfloat16)`;
- one training step of the demo's tokenizer (`cpu-tiny` VQGAN at 32 px, batch 32, L2
  reconstruction plus the quantizer loss, Adam), the same two ways.

"ours" is the bf16 side, "reference" the fp32 side of the same model; the steps are ABBA
interleaved, the two matmul peaks measured one after the other (median of --runs each). The
ratio is the speed-up (fp32 time / bf16 time). There is no target: below 1 bf16 is slower.
Both sides of a step start from the same weights and data, and the note gives their losses.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from common.demo_settings import cpu_bf16_flags  # the check behind demo.py --precision auto

from benchmarks.common import Row, Settings, matmul_peak_flops, time_pair
from benchmarks.training import make_prior_step
from prior import Prior, PriorConfig
from tokenizer import VQGAN, VQGANConfig

MATTE_GROUPS = (16, 6)  # scripts/common/code_features.py: a 4x4 alpha, two colours
DEMO_PRIOR = {"codebook_size": 1024, "text_length": 20, "text_attention": "self"}  # the demo's


def prior_step(model: Prior, batch: int, seed: int, bf16: bool):
    """A closure running one AdamW step of `model` on fixed random text and codes (bench.py
    train's step, its forward under bf16 autocast when `bf16`)."""
    dtype = torch.bfloat16 if bf16 else None
    return make_prior_step(model, model.config, Settings(seed=seed), batch, autocast_dtype=dtype)


def tokenizer_step(model: VQGAN, batch: int, seed: int, bf16: bool):
    """A closure running one Adam step of `model` (L2 + quantizer loss) on fixed random images."""
    generator = torch.Generator().manual_seed(seed)
    side = model.config.resolution
    images = torch.rand(batch, 3, side, side, generator=generator) * 2 - 1  # (B, 3, H, W)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
            loss = F.mse_loss(out.reconstruction.float(), images) + out.quantizer_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    return step


def _step_row(name: str, model: torch.nn.Module, make_step, batch: int, settings: Settings) -> Row:
    """Time one model's step fp32 against bf16 autocast, each side on its own copy."""
    fp32, bf16 = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    losses = {}

    def recorded(step, key):
        def call():
            losses[key] = step()

        return call

    bf16_s, fp32_s, raw = time_pair(
        recorded(make_step(bf16, batch, settings.seed, True), "bf16"),
        recorded(make_step(fp32, batch, settings.seed, False), "fp32"),
        settings,
        inference=False,
    )
    return Row("precision", f"{name} training step, batch {batch}: bf16 autocast vs fp32",
               bf16_s, fp32_s, "s", fp32_s / bf16_s, None, note=f"last losses bf16 "
               f"{losses['bf16']:.4f}, fp32 {losses['fp32']:.4f}", extra={"seconds": raw})  # fmt: skip


def bench_cpu_precision(settings: Settings) -> list[Row]:
    """The matmul peak and the demo's two training steps, bf16 autocast against fp32."""
    size = 512 if settings.smoke else 4096
    bf16_peak = matmul_peak_flops(size, torch.bfloat16, settings)
    fp32_peak = matmul_peak_flops(size, torch.float32, settings)
    flags = cpu_bf16_flags()
    listed = f"{' and '.join(flags)} listed" if flags else "no native bf16 in /proc/cpuinfo"
    rows = [
        Row("precision", f"matmul peak {size}^3: bf16 vs fp32", bf16_peak / 1e9,
            fp32_peak / 1e9, "GFLOP/s", bf16_peak / fp32_peak, None, note=listed),
    ]  # fmt: skip
    torch.manual_seed(settings.seed)
    prior_overrides = {"num_layers": 1, "d_model": 64, "num_heads": 2} if settings.smoke else {}
    features = sum(MATTE_GROUPS)
    config = PriorConfig.from_preset(
        "cpu-tiny",
        **DEMO_PRIOR,
        code_feature_dim=features,
        code_feature_groups=MATTE_GROUPS,
        **prior_overrides,
    )
    prior = Prior(config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(settings.seed)
        prior.code_features.features.uniform_(-1, 1, generator=generator)  # data, not weights
    rows.append(_step_row("prior (cpu-tiny, matte)", prior, prior_step, 2 if settings.smoke else 16,
                          settings))  # fmt: skip
    tokenizer = VQGAN(VQGANConfig.from_preset("cpu-tiny", resolution=32))
    rows.append(_step_row("tokenizer (cpu-tiny, 32 px)", tokenizer, tokenizer_step,
                          2 if settings.smoke else 32, settings))  # fmt: skip
    return rows
