"""Adapters: external VQ models that do not map onto our VQGAN, wrapped to satisfy the
`ImageTokenizer` protocol so that code extraction and prior training run on their codes.

    from transformers import ChameleonVQVAE
    tokenizer = ChameleonAdapter(ChameleonVQVAE.from_pretrained(...))
    codes = tokenizer.encode(images)        # images (B, 3, H, W) in [-1, 1] -> (B, h, w) int64

- `ChameleonAdapter` (transformers ChameleonVQVAE): encode only; HF ships no decoder, so `decode`
  raises NotImplementedError and `can_decode` is False.
- `Emu3Adapter` (transformers Emu3VQVAE): images are treated as one frame.
- `DiffusersVQAdapter` (a live diffusers VQModel, MoVQ and aMUSEd included).

The wrapped models return codes in their own shapes (a flat `(B*h*w,)` argmin from Chameleon and
diffusers, a list of per-image `(h, w)` tensors from Emu3); every adapter returns `(B, h, w)`.
Pixels are mapped from our [-1, 1] to the model's own normalisation with `image_mean` /
`image_std` given on a [0, 1] scale, as HF image processors state them.

Adapters wrap a live model and are not serialisable: `save_pretrained` raises. Convert the model
with scripts/convert_tokenizer.py when it maps onto our VQGAN, or save it with its own library.
`identity()` hashes the wrapped model's config and weights, so extracted codes record it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codegrid.io import load_state_dict_strict, read_json_object, state_dict_sha256
from tokenizer.convert_common import read_safetensors_folder, select_prefix

NOT_SERIALISABLE = (
    "adapters wrap a live model and cannot be saved in our format; convert it with "
    "scripts/convert_tokenizer.py (taming, llamagen, diffusers, janus) or save the wrapped model "
    "with its own library and wrap it again after loading"
)
# Config entries that name software versions or paths, not the model.
_VOLATILE_CONFIG_KEYS = (
    "_name_or_path",
    "transformers_version",
    "_diffusers_version",
    "_commit_hash",
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # HF OPENAI_CLIP_MEAN, Emu3's processor default
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_VQ_PREFIX = "model.vqmodel."  # where a full Chameleon / Emu3 checkpoint keeps the VQ


def flat_codes_to_grid(codes: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Flat argmin output `(B*h*w,)` (row-major over b, h, w) -> `(B, h, w)` int64."""
    if codes.numel() != batch * height * width:
        raise ValueError(
            f"got {codes.numel()} codes for a (B={batch}, h={height}, w={width}) grid; the model "
            f"returned codes for another grid than its latents"
        )
    return codes.reshape(batch, height, width).long()  # (B*h*w,) -> (B, h, w)


class ExternalTokenizerAdapter(nn.Module):
    """Shared protocol plumbing; subclasses implement `_encode_model` and `_decode_model`."""

    can_decode = True
    serialisable = False

    def __init__(
        self,
        model: nn.Module,
        *,
        codebook_size: int,
        downsample_factor: int,
        resolution: int,
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.codebook_size, self.downsample_factor = int(codebook_size), int(downsample_factor)
        self.resolution = int(resolution)
        self.latent_shape(self.resolution, self.resolution)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """Code grid (h, w) for images of (height, width); both must divide by the factor."""
        factor = self.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise ValueError(
                    f"image {name}={value} is not a positive multiple of the downsample factor "
                    f"{factor} of {type(self).__name__}; resize or crop to a multiple of {factor}"
                )
        return height // factor, width // factor

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Built from the Python floats in fp32 on the pixels' device at each call: no buffer to
        # leave behind when the wrapped model moves alone, or to round when the adapter goes bf16.
        mean = torch.tensor(self.image_mean, device=device).view(1, -1, 1, 1)  # (1, C, 1, 1)
        std = torch.tensor(self.image_std, device=device).view(1, -1, 1, 1)  # (1, C, 1, 1)
        return mean, std

    def to_model_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Our [-1, 1] images -> the model's normalisation ((x01 - mean) / std), model dtype."""
        if images.ndim != 4 or images.shape[1] != len(self.image_mean):
            raise ValueError(
                f"images must be (B, {len(self.image_mean)}, H, W); got {tuple(images.shape)}"
            )
        self.latent_shape(images.shape[2], images.shape[3])
        mean, std = self._normalisation(images.device)
        pixels = ((images.float() + 1) / 2 - mean) / std
        return pixels.to(self._model_dtype())

    def from_model_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's normalised output (B, C, H, W) -> our [-1, 1] (clamped), fp32."""
        mean, std = self._normalisation(pixels.device)
        return ((pixels.float() * std + mean) * 2 - 1).clamp(-1.0, 1.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) int64."""
        height, width = self.latent_shape(images.shape[-2], images.shape[-1])
        codes = self._encode_model(self.to_model_pixels(images), height, width)
        return codes.long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) in [0, codebook_size) -> images (B, 3, h*f, w*f) in [-1, 1]."""
        if codes.ndim != 3 or codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(
                f"codes must be an integer tensor (B, h, w); got {codes.dtype} {tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}); got min {codes.min().item()} "
                f"max {codes.max().item()} (were they made with another tokenizer?)"
            )
        return self.from_model_pixels(self._decode_model(codes.long()))

    def _encode_model(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    def _decode_model(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def wrapped_config(self) -> dict[str, Any]:
        """The wrapped model's config as a dict, without version/path entries."""
        config = self.model.config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return {k: v for k, v in values.items() if k not in _VOLATILE_CONFIG_KEYS}

    def identity(self) -> dict[str, object]:
        """JSON-able fingerprint: sha256 of the wrapped config (plus our pixel normalisation)
        and of the weights, codebook size, downsample factor and the grid at `resolution`."""
        config = {"wrapped": self.wrapped_config(), "mean": self.image_mean, "std": self.image_std}
        config_json = json.dumps(config, sort_keys=True, default=str)
        return {
            "class": type(self).__name__,
            "wrapped_class": type(self.model).__name__,
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
            "weights_sha256": state_dict_sha256(self.model),
            "codebook_size": self.codebook_size,
            "downsample_factor": self.downsample_factor,
            "resolution": self.resolution,
            "latent_shape": list(self.latent_shape(self.resolution, self.resolution)),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Always raises: see NOT_SERIALISABLE."""
        raise NotImplementedError(
            f"{type(self).__name__}.save_pretrained({str(directory)!r}): {NOT_SERIALISABLE}"
        )


class ChameleonAdapter(ExternalTokenizerAdapter):
    """transformers `ChameleonVQVAE`: encode only (HF converts no decoder weights)."""

    can_decode = False

    def __init__(self, model: nn.Module, resolution: int | None = None) -> None:
        config = model.config
        super().__init__(
            model,
            codebook_size=config.num_embeddings,
            downsample_factor=2 ** (len(config.channel_multiplier) - 1),
            resolution=resolution or config.resolution,
        )  # Chameleon's processor maps pixels to [-1, 1] (mean 1, std 1 after x/128)

    def _encode_model(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        flat = self.model.encode(pixels).image_tokens  # (B*h*w,)
        return flat_codes_to_grid(flat, pixels.shape[0], height, width)

    def _decode_model(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "ChameleonVQVAE is encode-only in transformers (its conversion drops the decoder), so "
            "these codes cannot be turned back into images; use them to train a prior and decode "
            "with a tokenizer that has a decoder, or check `can_decode` first"
        )

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, **kwargs: Any) -> ChameleonAdapter:
        """From a ChameleonVQVAE folder, a full Chameleon folder (model.vqmodel.*) or a Hub id."""
        from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

        model = load_hf_vq(source, ChameleonVQVAE, ChameleonVQVAEConfig, "chameleon")
        return cls(model, **kwargs)


class Emu3Adapter(ExternalTokenizerAdapter):
    """transformers `Emu3VQVAE` used on single images (one frame repeated over time, as HF's
    `encode` does). `image_mean`/`image_std` default to Emu3's processor (CLIP statistics)."""

    def __init__(
        self,
        model: nn.Module,
        resolution: int = 512,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
    ) -> None:
        config = model.config
        super().__init__(
            model,
            codebook_size=config.codebook_size,
            downsample_factor=2 ** (len(config.channel_multiplier) - 1),
            resolution=resolution,
            image_mean=image_mean,
            image_std=image_std,
        )

    def _encode_model(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        sizes = torch.tensor(
            [list(pixels.shape[-2:])] * pixels.shape[0], device=pixels.device
        )  # (B, 2)
        grids = self.model.encode(pixels, image_sizes=sizes).image_tokens  # B tensors (h, w)
        codes = torch.stack(list(grids))  # (B, h, w)
        if codes.shape[1:] != (height, width):
            raise ValueError(
                f"Emu3VQVAE returned {tuple(codes.shape)} codes, expected grid {(height, width)}"
            )
        return codes

    def _decode_model(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes)  # (B, h, w) -> (B, 3, h*f, w*f)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, **kwargs: Any) -> Emu3Adapter:
        """From an Emu3VQVAE folder, a full Emu3 folder (model.vqmodel.*) or a Hub id."""
        from transformers import Emu3VQVAE, Emu3VQVAEConfig

        model = load_hf_vq(source, Emu3VQVAE, Emu3VQVAEConfig, "emu3")
        return cls(model, **kwargs)


class DiffusersVQAdapter(ExternalTokenizerAdapter):
    """A live diffusers `VQModel` (including MoVQ and aMUSEd's lookup-from-codebook VQ).

    `image_mean`/`image_std` (0.5, 0.5) mean the model takes [-1, 1]; aMUSEd takes [0, 1]: pass
    `image_mean=(0, 0, 0), image_std=(1, 1, 1)`."""

    def __init__(
        self, model: nn.Module, resolution: int | None = None, **normalisation: Any
    ) -> None:
        config = model.config
        size = config.sample_size
        super().__init__(
            model,
            codebook_size=config.num_vq_embeddings,
            downsample_factor=2 ** (len(config.block_out_channels) - 1),
            resolution=resolution or int(size[0] if isinstance(size, list | tuple) else size),
            **normalisation,
        )

    def _encode_model(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        latents = self.model.encode(pixels).latents  # (B, D, h, w) before quantisation
        _, _, (_, _, flat) = self.model.quantize(latents)  # (B*h*w,): VQModel's indices are flat
        return flat_codes_to_grid(flat, pixels.shape[0], height, width)

    def _decode_model(self, codes: torch.Tensor) -> torch.Tensor:
        embed_dim = self.model.quantize.vq_embed_dim
        shape = (*codes.shape, embed_dim)  # (B, h, w, D)
        if self.model.config.lookup_from_codebook:  # decode() does the lookup itself
            flat = codes.reshape(-1)  # (B, h, w) -> (B*h*w,)
            return self.model.decode(flat, force_not_quantize=True, shape=shape).sample
        quantized = self.model.quantize.get_codebook_entry(codes.reshape(-1), shape)  # (B, D, h, w)
        return self.model.decode(quantized, force_not_quantize=True).sample

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> DiffusersVQAdapter:
        """From a local VQModel folder (never touches the network) or a Hub id (downloads)."""
        from diffusers import VQModel

        local = Path(source).exists()
        model = VQModel.from_pretrained(str(source), subfolder=subfolder, local_files_only=local)
        return cls(model, **kwargs)


def load_hf_vq(
    source: str | os.PathLike, model_cls: type, config_cls: type, composite: str
) -> nn.Module:
    """Load a transformers VQ model strictly from a local folder, or download a Hub id first.

    A full multimodal folder (config `model_type == composite`) stores the VQ as
    `model.vqmodel.*`; transformers' own `from_pretrained` would then silently keep a random
    init, so the weights are read and loaded here with every key and shape checked.

    Raises:
        FileNotFoundError: the folder has no config.json or no *.safetensors weights.
        ValueError: config.json is not a JSON object, a full folder has no `model.vqmodel.*`
            weights, or the weights do not match the config (naming the keys).
    """
    folder = Path(source)
    if not folder.exists():  # a Hub id: the only case that touches the network
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
        folder = Path(snapshot_download(str(source), allow_patterns=patterns))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"source={str(folder)!r} has no config.json; pass a folder written by "
            f"{model_cls.__name__}.save_pretrained or a full {composite} model folder"
        )
    values = read_json_object(config_file)
    if values.get("model_type") == composite:
        config = config_cls(**(values.get("vq_config") or {}))
        state_dict = select_prefix(read_safetensors_folder(folder, _VQ_PREFIX), _VQ_PREFIX)
        if state_dict is None:
            raise ValueError(
                f"source={str(folder)!r} is a full {composite} folder (model_type={composite!r}) "
                f"but no weight key starts with {_VQ_PREFIX!r}; pass the folder that holds the "
                "VQ weights, or a VQ-only folder"
            )
    else:
        config = config_cls.from_pretrained(folder, local_files_only=True)
        state_dict = read_safetensors_folder(folder)
    model = model_cls(config)
    load_state_dict_strict(model, state_dict, source=f"{model_cls.__name__} from {folder}")
    return model.eval()
