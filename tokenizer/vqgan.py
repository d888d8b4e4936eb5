"""VQGAN image tokenizer (Esser et al. 2021): encoder -> quant_conv -> quantizer ->
post_quant_conv -> decoder, with taming-compatible parameter names and a config dataclass.

Images are (B, 3, H, W) floats in [-1, 1]; codes are int64 (B, H/f, W/f) in [0, codebook_size).
A plain VQ-VAE (van den Oord et al. 2017) is the "cpu-tiny-classic" preset (or any preset with
`l2_normalize=False, restart_dead_codes=False`) trained with the GAN and perceptual weights at 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from codegrid.io import (
    check_field_names,
    load_model_folder,
    load_state_dict_strict,
    save_model_folder,
    state_dict_sha256,
)
from tokenizer.code_search import search_codes
from tokenizer.modules import NORMS, Decoder, Encoder, PatchEncoder
from tokenizer.quantize import FSQ, RESTART_SOURCES, VectorQuantizer

QUANTIZERS = ("vq", "fsq")
ENCODERS = ("conv", "patch")
_VQ_ONLY_FLAGS = {"l2_normalize": False, "ema": False, "restart_dead_codes": False}


def _invalid(field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"VQGANConfig.{field}={value!r} is invalid; allowed: {allowed}")


def _is_int(value: object, minimum: int) -> bool:
    # bool is an int subclass, and a float such as 1024.0 passes the range checks but fails
    # later inside nn.Embedding or a conv with an error that names no field.
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_int_tuple(values: tuple, minimum: int) -> bool:
    return all(_is_int(value, minimum) for value in values)


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture and quantizer settings. Field names follow taming's `ddconfig` (`ch`,
    `ch_mult`, `z_channels`, ...; taming's `out_ch` is `out_channels`, `n_embed` is
    `codebook_size`, `embed_dim` is `codebook_dim`). `double_z` is always False for VQ models.

    quant_conv maps z_channels -> codebook_dim, so a low-dim codebook (LlamaGen's 8) needs no
    extra projection. For quantizer="fsq", codebook_dim == len(fsq_levels) and
    codebook_size == prod(fsq_levels).

    Quantizer fields (see tokenizer.quantize.VectorQuantizer): beta weighs the commitment term;
    ema/ema_decay switch the codebook to EMA updates; restart_dead_codes replaces a code unused
    for restart_threshold training forwards (each micro-batch under gradient accumulation
    counts); entropy_weight > 0 adds the entropy penalty at softmax temperature
    entropy_temperature. `encoder`: "conv" is taming's encoder, whose codes see the whole
    image; "patch" (`tokenizer.modules.PatchEncoder`) makes each code a function of its own
    f x f patch, with a width of 4 * ch * ch_mult[-1] and num_res_blocks + 1 MLP blocks
    (attn_resolutions, mid_attention and norm then shape the decoder only). The defaults are
    the "cpu-tiny" preset but for its encoder, restarts and mid-block attention.

    `code_search_candidates` R > 1 (vq only) makes `encode` choose each code among its R
    latent-nearest codes by the error of the decoded image (`tokenizer.code_search`), swapping
    only where the error around it falls by more than `code_search_threshold`; 1 is the
    nearest code. Training is unchanged; only encoding (code extraction, evaluation) searches.
    """

    resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 16
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    mid_attention: bool = True
    norm: str = "group"
    encoder: str = "conv"
    z_channels: int = 32
    dropout: float = 0.0
    quantizer: str = "vq"
    codebook_size: int = 1024
    codebook_dim: int = 8
    l2_normalize: bool = True
    beta: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99
    restart_dead_codes: bool = True
    restart_threshold: int = 20
    restart_from: str = "random"
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    fsq_levels: tuple[int, ...] = ()
    code_search_candidates: int = 1
    code_search_threshold: float = 0.3

    def __post_init__(self) -> None:
        for name in ("ch_mult", "attn_resolutions", "fsq_levels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate_architecture()
        self._validate_quantizer()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map side at each level for the configured `resolution`."""
        return tuple(self.resolution // 2**level for level in range(len(self.ch_mult)))

    def _validate_architecture(self) -> None:
        for name in ("in_channels", "out_channels", "ch", "z_channels", "num_res_blocks"):
            if not _is_int(getattr(self, name), 1):
                raise _invalid(name, getattr(self, name), "an integer >= 1")
        if not self.ch_mult or not _is_int_tuple(self.ch_mult, 1):
            raise _invalid("ch_mult", self.ch_mult, "a non-empty tuple of integers >= 1")
        factor = self.downsample_factor
        if not _is_int(self.resolution, factor) or self.resolution % factor:
            allowed = f"a positive integer multiple of the downsample factor {factor}"
            raise _invalid("resolution", self.resolution, f"{allowed} (2 ** (len(ch_mult) - 1))")
        levels = self.level_resolutions()
        unknown = [r for r in self.attn_resolutions if r not in levels]
        if unknown or not _is_int_tuple(self.attn_resolutions, 1):
            raise _invalid("attn_resolutions", self.attn_resolutions, f"values from {levels}")
        if not 0.0 <= self.dropout < 1.0:
            raise _invalid("dropout", self.dropout, "0 <= dropout < 1")
        if self.norm not in NORMS:
            raise _invalid("norm", self.norm, f"one of {NORMS}")
        if self.encoder not in ENCODERS:
            raise _invalid("encoder", self.encoder, f"one of {ENCODERS}")

    def _validate_quantizer(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise _invalid("quantizer", self.quantizer, f"one of {QUANTIZERS}")
        if self.quantizer == "fsq":
            self._validate_fsq()
        elif self.fsq_levels:
            raise _invalid("fsq_levels", self.fsq_levels, "() unless quantizer='fsq'")
        if not _is_int(self.codebook_size, 2):
            raise _invalid("codebook_size", self.codebook_size, "an integer >= 2")
        if not _is_int(self.codebook_dim, 1):
            raise _invalid("codebook_dim", self.codebook_dim, "an integer >= 1")
        checks = {
            "beta": (self.beta >= 0, ">= 0"),
            "ema_decay": (0 < self.ema_decay < 1, "0 < ema_decay < 1"),
            "restart_threshold": (_is_int(self.restart_threshold, 1), "an integer >= 1"),
            "restart_from": (self.restart_from in RESTART_SOURCES, f"one of {RESTART_SOURCES}"),
            "entropy_weight": (self.entropy_weight >= 0, ">= 0"),
            "entropy_temperature": (self.entropy_temperature > 0, "> 0"),
            "code_search_candidates": (
                _is_int(self.code_search_candidates, 1)
                and self.code_search_candidates <= self.codebook_size,
                f"an integer from 1 to codebook_size={self.codebook_size}",
            ),
            "code_search_threshold": (self.code_search_threshold >= 0, ">= 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise _invalid(name, getattr(self, name), allowed)

    def _validate_fsq(self) -> None:
        if not self.fsq_levels or not _is_int_tuple(self.fsq_levels, 2):
            raise _invalid("fsq_levels", self.fsq_levels, "a non-empty tuple of integers >= 2")
        size, dim = math.prod(self.fsq_levels), len(self.fsq_levels)
        if self.codebook_size != size:
            raise _invalid("codebook_size", self.codebook_size, f"prod(fsq_levels) = {size}")
        if self.codebook_dim != dim:
            raise _invalid("codebook_dim", self.codebook_dim, f"len(fsq_levels) = {dim}")
        for name in (*_VQ_ONLY_FLAGS, "entropy_weight"):
            if getattr(self, name):
                raise _invalid(name, getattr(self, name), "False/0 with quantizer='fsq'")
        if self.code_search_candidates != 1:
            allowed = "1 with quantizer='fsq' (FSQ rounds each digit; it ranks no codebook)"
            raise _invalid("code_search_candidates", self.code_search_candidates, allowed)

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> VQGANConfig:
        """A preset from PRESETS with fields replaced by `overrides` (validated).

        Switching to quantizer="fsq" fills codebook_size and codebook_dim from fsq_levels and
        turns the VQ-only options off unless they are given explicitly.

        Raises:
            ValueError: an unknown preset, an override that is no VQGANConfig field (the
                message lists the valid ones), or an invalid value."""
        if name not in PRESETS:
            raise ValueError(f"unknown VQGAN preset {name!r}; allowed: {sorted(PRESETS)}")
        check_field_names(cls, overrides, f"VQGANConfig.from_preset({name!r})")
        base = PRESETS[name]
        if overrides.get("quantizer", base.quantizer) == "fsq":
            levels = tuple(overrides.get("fsq_levels", base.fsq_levels))  # type: ignore[arg-type]
            derived = {"codebook_size": math.prod(levels), "codebook_dim": len(levels)}
            derived.update({**_VQ_ONLY_FLAGS, "entropy_weight": 0.0})
            overrides = {**derived, **overrides} if levels else overrides
        return dataclasses.replace(base, **overrides)


_TAMING_F16 = VQGANConfig(
    resolution=256,
    ch=128,
    ch_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    attn_resolutions=(16,),
    z_channels=256,
    codebook_size=1024,
    codebook_dim=256,
    l2_normalize=False,
    restart_dead_codes=False,
)

# Presets. "cpu-tiny" is the Shapes demo (32 px -> 8x8 codes, 1024 l2-normalised 8-dim codes,
# the per-patch encoder, dead codes restarted at the worst-represented patches; 0.30M
# parameters). The patch encoder gives every code its own 4x4 patch and nothing else: plain
# background gets one code per colour instead of hundreds, the codes' perplexity fell from
# about 800 to 9, and a prior on its codes drew 60.5% of seen test prompts all right against
# 22-32% for taming's encoder in earlier demo runs. Random restarts then land mostly on plain
# background, whose code exists already, and leave codes dead (usage 78%); restarts at the
# largest errors kept 97% in use and sharpened small objects (docs/experiments.md, "The patch
# encoder"). 1024 codes, not 256: 256 blotch the colours of 8 objects x 3 backgrounds. The
# widths (ch 16, ch_mult (1, 2, 2)) were picked with taming's encoder by interleaved CPU runs:
# against ch=32 and ch_mult (1, 2, 4) they reached the highest PSNR per second.
# "cpu-tiny-classic" is the same network with taming's quantizer (codebook_dim = z_channels,
# no l2, no restart): with GAN and perceptual weights 0 it is a plain VQ-VAE. The taming and
# LlamaGen entries mirror the published 256 px models so converted checkpoints load one to one;
# LlamaGen hard-codes attention at the lowest level, which at 256 px is attn_resolutions=(16,).
# The cpu-tiny decoders have no mid-block attention: with it, a large object on one side left
# strays at the far border in 8% of the reconstructions of large objects (not clean to the judge);
# without it, at equal steps, all 212 large objects of 400 renders came back clean.
_CPU_TINY = VQGANConfig(encoder="patch", mid_attention=False)
PRESETS: dict[str, VQGANConfig] = {
    "cpu-tiny": dataclasses.replace(_CPU_TINY, restart_from="error"),
    "cpu-tiny-classic": dataclasses.replace(
        _CPU_TINY, codebook_dim=32, l2_normalize=False, restart_dead_codes=False
    ),
    "cpu-tiny-fsq": dataclasses.replace(
        _CPU_TINY,
        quantizer="fsq",
        fsq_levels=(8, 6, 5),  # Mentzer et al. 2023, Table 1 recommendation for ~2^8 codes
        codebook_size=240,
        codebook_dim=3,
        l2_normalize=False,
        restart_dead_codes=False,
    ),
    "taming-f16-1024": _TAMING_F16,
    "taming-f16-16384": dataclasses.replace(_TAMING_F16, codebook_size=16384),
    "taming-f8-16384": dataclasses.replace(  # LDM / OpenImages vq-f8
        _TAMING_F16,
        ch_mult=(1, 2, 2, 4),
        attn_resolutions=(32,),
        z_channels=4,
        codebook_size=16384,
        codebook_dim=4,
    ),
    "llamagen-vq16": dataclasses.replace(
        _TAMING_F16, codebook_size=16384, codebook_dim=8, l2_normalize=True
    ),
}


@dataclass
class VQGANOutput:
    """reconstruction (B, 3, H, W) unclamped (about [-1, 1]); quantizer_loss scalar fp32;
    codes (B, h, w) int64; stats: detached scalar tensors (perplexity, batch_usage, ...)."""

    reconstruction: torch.Tensor
    quantizer_loss: torch.Tensor
    codes: torch.Tensor
    stats: dict[str, torch.Tensor]


def build_quantizer(config: VQGANConfig) -> VectorQuantizer | FSQ:
    """The quantizer module selected by `config.quantizer`."""
    if config.quantizer == "fsq":
        return FSQ(config.fsq_levels)
    return VectorQuantizer(
        config.codebook_size,
        config.codebook_dim,
        beta=config.beta,
        l2_normalize=config.l2_normalize,
        ema=config.ema,
        ema_decay=config.ema_decay,
        restart_dead_codes=config.restart_dead_codes,
        restart_threshold=config.restart_threshold,
        restart_from=config.restart_from,
        entropy_weight=config.entropy_weight,
        entropy_temperature=config.entropy_temperature,
    )


class VQGAN(nn.Module):
    """Image tokenizer: images (B, C, H, W) in [-1, 1] <-> codes (B, H/f, W/f).

    Satisfies `tokenizer.protocol.ImageTokenizer`. The state_dict keys are taming's
    (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`, `quantize.embedding.weight`),
    plus `quantize.{cluster_size,embed_sum}` with EMA and `quantize.steps_since_used` with
    dead-code restart, which taming checkpoints do not use.
    """

    can_decode = True

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        shared = {
            "ch": config.ch,
            "ch_mult": config.ch_mult,
            "num_res_blocks": config.num_res_blocks,
            "attn_resolutions": config.attn_resolutions,
            "resolution": config.resolution,
            "z_channels": config.z_channels,
            "dropout": config.dropout,
            "mid_attention": config.mid_attention,
            "norm": config.norm,
        }
        if config.encoder == "patch":
            self.encoder = PatchEncoder(
                in_channels=config.in_channels,
                factor=config.downsample_factor,
                hidden=4 * config.ch * config.ch_mult[-1],
                num_blocks=config.num_res_blocks + 1,
                z_channels=config.z_channels,
            )
        else:
            self.encoder = Encoder(in_channels=config.in_channels, **shared)
        self.decoder = Decoder(out_channels=config.out_channels, **shared)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.quantize = build_quantizer(config)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """Code grid (h, w) for images of (height, width); both must divide by the factor."""
        factor = self.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise ValueError(
                    f"image {name}={value} is not a positive multiple of the VQGAN downsample "
                    f"factor {factor}; resize or crop images to a multiple of {factor}"
                )
        return height // factor, width // factor

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"images must be (B, {self.config.in_channels}, H, W); got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [-1, 1]; got dtype {images.dtype}")
        self.latent_shape(images.shape[2], images.shape[3])

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 3 or codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(
                f"codes must be an integer tensor (B, h, w); got {codes.dtype} {tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}); got min {codes.min().item()} "
                f"max {codes.max().item()} (were they made with another tokenizer?)"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, H/f, W/f) int64. No state changes.

        The nearest codes, or with `config.code_search_candidates` R > 1 the codes chosen
        among the R nearest by the decoded error (`tokenizer.code_search`; about 4R decodes)."""
        self._check_images(images)
        latents = self.quant_conv(self.encoder(images))  # (B, codebook_dim, h, w)
        count = self.config.code_search_candidates
        if count == 1:
            return self.quantize.encode_indices(latents)
        candidates = self.quantize.nearest_indices(latents, count)  # (B, h, w, R)
        return search_codes(self.decode, images, candidates, self.config.code_search_threshold)

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, codebook_dim, h, w) -> images (B, C, h*f, w*f), unclamped."""
        quantized = quantized.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(quantized))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) in [0, codebook_size) -> images (B, C, h*f, w*f) clamped to [-1, 1].

        Works on codes from `encode` and from the prior's `generate`."""
        self._check_codes(codes)
        images = self.decode_latents(self.quantize.lookup(codes.long()))
        return images.clamp(-1.0, 1.0)

    def forward(self, images: torch.Tensor) -> VQGANOutput:
        """Images (B, C, H, W) in [-1, 1] -> VQGANOutput. In training mode the quantizer also
        updates its EMA / dead-code state; in every mode it accumulates codebook usage."""
        self._check_images(images)
        quantized = self.quantize(self.quant_conv(self.encoder(images)))
        reconstruction = self.decode_latents(quantized.quantized)
        return VQGANOutput(reconstruction, quantized.loss, quantized.indices, quantized.stats)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where taming's adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def codebook_usage(self, all_reduce: bool = False) -> dict[str, float]:
        """{"usage": 0..1, "perplexity", "count"} over forwards since the last reset."""
        return self.quantize.codebook_usage(all_reduce=all_reduce)

    def reset_codebook_usage(self) -> None:
        """Zero the usage histogram that `codebook_usage` reports (e.g. before an evaluation);
        training state (EMA, dead-code counters) is kept."""
        self.quantize.reset_codebook_usage()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` + `model.safetensors` atomically (codegrid.io)."""
        return save_model_folder(directory, self.config, self.state_dict(), type(self).__name__)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device | None = None
    ) -> VQGAN:
        """Load a folder written by `save_pretrained`, checking every key; returns eval mode."""
        folder = Path(directory)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"VQGAN folder {folder} does not exist; pass a directory written by "
                f"VQGAN.save_pretrained (config.json + model.safetensors)"
            )
        config, state_dict = load_model_folder(folder, VQGANConfig)
        model = cls(config)
        load_state_dict_strict(model, state_dict, source=str(folder))
        return model.to(device).eval() if device is not None else model.eval()

    def identity(self) -> dict[str, object]:
        """JSON-able fingerprint: sha256 of the canonical config JSON (the code search's fields
        only when it searches, since they change no code otherwise) and of the state_dict
        (key, dtype, shape and raw bytes of every tensor in sorted key order), codebook size,
        downsample factor and the code grid at the configured resolution."""
        config = dataclasses.asdict(self.config)
        if config["code_search_candidates"] == 1:
            # The nearest code, as before the search existed: codes extracted then stay valid.
            del config["code_search_candidates"], config["code_search_threshold"]
        config_json = json.dumps(config, sort_keys=True)
        resolution = self.config.resolution
        return {
            "class": type(self).__name__,
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
            "weights_sha256": state_dict_sha256(self),
            "codebook_size": self.codebook_size,
            "downsample_factor": self.downsample_factor,
            "resolution": resolution,
            "latent_shape": list(self.latent_shape(resolution, resolution)),
        }
