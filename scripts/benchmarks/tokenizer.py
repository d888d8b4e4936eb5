"""Benchmark 1 of issue 7: our VQGAN against the taming-transformers modules, same weights.

The reference is built from `taming.modules.diffusionmodules.model.{Encoder, Decoder}` and
`taming.modules.vqvae.quantize.VectorQuantizer2` (taming-transformers-rom1504); `taming.models`
is not imported because it needs a removed Lightning API. Our state_dict maps one to one onto
the reference (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`,
`quantize.embedding.weight`); the mapping is checked key by key and shape by shape.

Timed unit: encode + decode of one batch (images -> codes -> images), both under
`torch.inference_mode()`.
"""

from __future__ import annotations

import contextlib
import copy
import io

import torch
from torch import nn

from benchmarks.common import EquivalenceError, Row, Settings, time_pair
from tokenizer import VQGAN, VQGANConfig

TOLERANCE = 1e-4
# Buffers of our quantizer that taming has no counterpart for (usage counters, EMA, restart).
OURS_ONLY = ("quantize.usage_counts", "quantize.cluster_size", "quantize.embed_sum",
             "quantize.steps_since_used")  # fmt: skip


class TamingVQ(nn.Module):
    """taming's VQModel data path from its modules, with taming's attribute names."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        ddconfig = dict(
            double_z=False,
            z_channels=config.z_channels,
            resolution=config.resolution,
            in_channels=config.in_channels,
            out_ch=config.out_channels,
            ch=config.ch,
            ch_mult=list(config.ch_mult),
            num_res_blocks=config.num_res_blocks,
            attn_resolutions=list(config.attn_resolutions),
            dropout=config.dropout,
        )
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.quantize = VectorQuantizer2(config.codebook_size, config.codebook_dim, beta=0.25)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pre-quantization latents (B, D, h, w)."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> codes (B, h, w)."""
        z = self.latents(images)
        _, _, (_, _, indices) = self.quantize(z)
        return indices.view(z.shape[0], z.shape[2], z.shape[3])  # (B, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, 3, H, W) clamped to [-1, 1] like ours."""
        batch, height, width = codes.shape
        shape = (batch, height, width, self.quantize.e_dim)
        quantized = self.quantize.get_codebook_entry(codes.flatten(), shape)  # (B, D, h, w)
        return self.decoder(self.post_quant_conv(quantized)).clamp(-1.0, 1.0)


def tokenizer_config(settings: Settings) -> VQGANConfig:
    """taming's f16 architecture at 256 px with 1024 codes (tiny in smoke mode)."""
    if settings.smoke:
        return VQGANConfig.from_preset(
            "taming-f16-1024", resolution=32, ch=32, ch_mult=(1, 2), attn_resolutions=(16,),
            z_channels=32, codebook_dim=32, codebook_size=64, num_res_blocks=1,
        )  # fmt: skip
    return VQGANConfig.from_preset("taming-f16-1024")


def map_state_dict(state: dict, reference: nn.Module) -> dict:
    """Our state_dict without our quantizer's extra buffers; raises EquivalenceError unless
    its keys and shapes equal the reference's one to one."""
    state = {k: v for k, v in state.items() if k not in OURS_ONLY}
    theirs = reference.state_dict()
    missing, unexpected = sorted(set(theirs) - set(state)), sorted(set(state) - set(theirs))
    shapes = sorted(k for k in theirs.keys() & state.keys() if theirs[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise EquivalenceError(
            f"state_dict keys do not map one to one: missing in ours {missing[:5]}, "
            f"not in taming {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    return state


def load_reference(ours: VQGAN) -> TamingVQ:
    """The taming modules holding exactly our weights; raises if any key or shape differs."""
    with contextlib.redirect_stdout(io.StringIO()):  # taming prints the latent shape
        reference = TamingVQ(ours.config)
    reference.load_state_dict(map_state_dict(ours.state_dict(), reference), strict=True)
    return reference.eval()


def _tie_mismatches(reference: TamingVQ, latents: torch.Tensor, ours, theirs) -> tuple[int, int]:
    """(code mismatches, mismatches that are not distance ties within TOLERANCE)."""
    different = (ours != theirs).flatten()
    if not different.any():
        return 0, 0
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])[different]  # (M, D)
    codebook = reference.quantize.embedding.weight
    dist_ours = (flat - codebook[ours.flatten()[different]]).pow(2).sum(1)  # (M,)
    dist_theirs = (flat - codebook[theirs.flatten()[different]]).pow(2).sum(1)  # (M,)
    scale = dist_theirs.abs().clamp(min=1.0)
    real = int(((dist_ours - dist_theirs).abs() > TOLERANCE * scale).sum())
    return int(different.sum()), real


@torch.inference_mode()
def check_equivalence(ours: VQGAN, reference: TamingVQ, images: torch.Tensor) -> dict:
    """Max abs differences of latents and of decodes from identical codes, and code agreement;
    "passed" is False when any difference exceeds TOLERANCE. Codes may differ only where two codebook entries are equally distant within TOLERANCE
    (argmin ties under fp32 rounding); any other difference fails.
    """
    latents_ours = ours.quant_conv(ours.encoder(images))
    latents_theirs = reference.latents(images)
    codes_ours = ours.quantize.encode_indices(latents_ours)  # (B, h, w)
    _, _, (_, _, flat_codes) = reference.quantize(latents_theirs)
    codes_theirs = flat_codes.view(codes_ours.shape)  # (B, h, w)
    mismatches, real = _tie_mismatches(reference, latents_theirs, codes_ours, codes_theirs)
    decoded_ours, decoded_theirs = ours.decode(codes_theirs), reference.decode(codes_theirs)
    result = {
        "latent_max_abs_diff": float((latents_ours - latents_theirs).abs().max()),
        "decode_max_abs_diff": float((decoded_ours - decoded_theirs).abs().max()),
        "code_mismatches": mismatches,
        "code_mismatches_not_ties": real,
        "codes": codes_ours.numel(),
    }
    worst = max(result["latent_max_abs_diff"], result["decode_max_abs_diff"])
    result["passed"] = worst <= TOLERANCE and real == 0
    return result


def build_pair(settings: Settings) -> tuple[VQGAN, TamingVQ, torch.Tensor]:
    """Our model with seeded random weights, the reference with the same, and a batch of 4."""
    config = tokenizer_config(settings)
    torch.manual_seed(settings.seed)
    ours = VQGAN(config).eval()
    # taming's own init draws the codebook from U(+-1/K), far smaller than the latents; spread
    # it to the latents' scale so argmin has clear winners and the code check is meaningful.
    with torch.no_grad():
        ours.quantize.embedding.weight.normal_()
    reference = load_reference(ours)
    generator = torch.Generator().manual_seed(settings.seed)
    images = torch.rand(4, 3, config.resolution, config.resolution, generator=generator) * 2 - 1
    return ours, reference, images


def bench_tokenizer(settings: Settings) -> list[Row]:
    """Equivalence (exit status) and the time ratio ours/theirs for encode + decode."""
    ours, reference, images = build_pair(settings)
    # Our CPU inference layout: NHWC weights, oneDNN's native format, so convolutions skip
    # reorders (`model.to(memory_format=torch.channels_last)`); taming runs as shipped.
    fast = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    equivalence = check_equivalence(fast, reference, images)
    ours_s, theirs_s, raw = time_pair(
        lambda: fast.decode(fast.encode(images)),
        lambda: reference.decode(reference.encode(images)),
        settings,
    )
    size = ours.config.resolution
    rows = [
        Row("tokenizer", f"equivalence vs taming modules (tolerance {TOLERANCE})",
            equivalence["decode_max_abs_diff"], None, "max abs diff", extra=equivalence,
            passed=equivalence["passed"],
            note=f"latent diff {equivalence['latent_max_abs_diff']:.2e}; codes differing only "
            f"at distance ties: {equivalence['code_mismatches']}/{equivalence['codes']}"),
        Row("tokenizer", f"encode+decode f16 {size}px batch 4: time ours/taming", ours_s,
            theirs_s, "s", ours_s / theirs_s, 0.8, higher_is_better=False, extra={"seconds": raw},
            note="ours in channels_last"),
    ]  # fmt: skip
    if settings.levers:
        from benchmarks.tokenizer_levers import bench_levers

        rows += bench_levers(ours, images, settings, settings.compile_levers)
    return rows
