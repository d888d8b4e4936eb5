"""Convert a diffusers `VQModel` (a saved folder or a live instance) into our `VQGAN`.

diffusers' VQModel is taming's network with other names (diffusers scripts/convert_amused.py and
convert_vq_diffusion_to_diffusers.py give the renaming):

    encoder.down_blocks.{i}.resnets.{j}      -> encoder.down.{i}.block.{j}  (conv_shortcut -> nin_shortcut)
    encoder.down_blocks.{i}.attentions.{j}   -> encoder.down.{i}.attn.{j}
    encoder.down_blocks.{i}.downsamplers.0   -> encoder.down.{i}.downsample
    decoder.up_blocks.{k}.*                  -> decoder.up.{L-1-k}.*  (reversed), upsamplers.0 -> upsample
    {encoder,decoder}.mid_block.resnets.{0,1} / attentions.0 -> mid.block_1 / block_2 / attn_1
    attention group_norm, to_q, to_k, to_v, to_out.0 -> norm, q, k, v, proj_out (linear -> 1x1 conv)
    conv_norm_out -> norm_out

`mid_block_add_attention=False` (aMUSEd's layout) becomes `mid_attention=False`.

Refused with a clear error: MoVQ (`norm_type="spatial"`, Kandinsky), activations other than SiLU,
GroupNorm group counts that differ from ours, and attention levels that differ between encoder and
decoder.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from codegrid.io import read_json_object
from tokenizer.convert_common import (
    check_supported,
    load_pickled_checkpoint,
    load_renamed,
    rename_keys,
    required,
)
from tokenizer.modules import NORM_GROUPS
from tokenizer.vqgan import VQGAN, VQGANConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names written by diffusers < 0.14 (its deprecated attention block)
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_MID = {"resnets.0": "block_1", "resnets.1": "block_2", "attentions.0": "attn_1"}


def read_diffusers_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state_dict) of a folder written by `VQModel.save_pretrained`."""
    path = Path(folder)
    if (path / "model_index.json").is_file():
        raise ValueError(
            f"SRC={str(path)!r} is a pipeline folder; pass its VQ subfolder "
            f"(e.g. {path / 'vqvae'} or {path / 'movq'})"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"SRC={str(path)!r} has no config.json; pass a folder written "
            "by diffusers VQModel.save_pretrained"
        )
    config = read_json_object(config_file)
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise FileNotFoundError(
            f"SRC={str(path)!r} has none of {WEIGHT_FILES} (sharded or "
            "variant weights: re-save with VQModel.save_pretrained)"
        )
    if weights[0].suffix == ".safetensors":
        return config, load_file(str(weights[0]))
    return config, load_pickled_checkpoint(weights[0])


def _attention_levels(block_types: list[str], source: str, field: str) -> list[bool]:
    levels = []
    for block_type in block_types:
        if block_type not in (
            f"{kind}{name}"
            for kind in ("", "Attn")
            for name in ("DownEncoderBlock2D", "UpDecoderBlock2D")
        ):
            raise ValueError(f"{source}: {field} entry {block_type!r} is not supported")
        levels.append(block_type.startswith("Attn"))
    return levels


def _check_supported_options(values: Mapping[str, Any], source: str) -> None:
    check_supported(
        source,
        "norm_type",
        values.get("norm_type", "group"),
        "group",
        "MoVQ's spatially conditioned norm (Kandinsky) has no counterpart in our "
        "VQGAN; use the model through tokenizer.adapters.DiffusersVQAdapter instead",
    )
    check_supported(
        source,
        "act_fn",
        values.get("act_fn", "silu"),
        "silu",
        "our blocks use SiLU (swish) as taming does",
    )
    groups = int(values.get("norm_num_groups", 32))
    for channels in required(values, "block_out_channels", source):
        if math.gcd(NORM_GROUPS, channels) != groups:
            raise ValueError(
                f"{source}: norm_num_groups={groups} with {channels} channels differs from our "
                f"GroupNorm({math.gcd(NORM_GROUPS, channels)}); use tokenizer.adapters."
                "DiffusersVQAdapter for this model"
            )


def diffusers_config(values: Mapping[str, Any], source: str = "config") -> VQGANConfig:
    """Our `VQGANConfig` for a diffusers VQModel config dict (see the module docstring)."""
    if values.get("_class_name", "VQModel") != "VQModel":
        raise ValueError(f"{source}: _class_name={values['_class_name']!r}, expected 'VQModel'")
    _check_supported_options(values, source)
    widths = [int(c) for c in required(values, "block_out_channels", source)]
    if any(width % widths[0] for width in widths):
        raise ValueError(f"{source}: block_out_channels={widths} are not multiples of the first")
    down, up = (
        _attention_levels(required(values, field, source), source, field)
        for field in ("down_block_types", "up_block_types")
    )
    up = up[::-1]
    if down != up or len(down) != len(widths):
        raise ValueError(
            f"{source}: attention levels differ between down_block_types and "
            "up_block_types (reversed); our VQGAN places them alike"
        )
    size = values.get("sample_size", 32)
    resolution = int(size[0] if isinstance(size, list | tuple) else size)
    latent = int(required(values, "latent_channels", source))
    return VQGANConfig(
        resolution=resolution,
        in_channels=int(values.get("in_channels", 3)),
        out_channels=int(values.get("out_channels", 3)),
        ch=widths[0],
        ch_mult=tuple(width // widths[0] for width in widths),
        num_res_blocks=int(required(values, "layers_per_block", source)),
        attn_resolutions=tuple(resolution // 2**i for i, attn in enumerate(down) if attn),
        mid_attention=bool(values.get("mid_block_add_attention", True)),
        z_channels=latent,
        codebook_size=int(required(values, "num_vq_embeddings", source)),
        codebook_dim=int(values.get("vq_embed_dim") or latent),
        l2_normalize=False,
        restart_dead_codes=False,
    )


def diffusers_key_mapper(num_levels: int):
    """A function mapping one diffusers VQModel key to ours (None when no rule applies)."""
    level = re.compile(
        r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$"
    )
    mid = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets\.[01]|attentions\.0)\.(.*)$")

    def inner(rest: str, is_attention: bool) -> str | None:
        if not is_attention:
            return rest.replace("conv_shortcut.", "nin_shortcut.")
        module, _, tail = rest.rpartition(".")
        return f"{_ATTN[module]}.{tail}" if module in _ATTN else None

    def map_key(key: str) -> str | None:
        if match := level.match(key):
            prefix, index, kind, sub, rest = match.groups()
            if prefix == "decoder.up":
                index = str(num_levels - 1 - int(index))  # diffusers lists decoder levels bottom-up
            if kind in ("downsamplers", "upsamplers"):
                return f"{prefix}.{index}.{kind[:-2]}.{rest}" if sub == "0" else None
            mapped = inner(rest, kind == "attentions")
            name = "block" if kind == "resnets" else "attn"
            return f"{prefix}.{index}.{name}.{sub}.{mapped}" if mapped else None
        if match := mid.match(key):
            part, module, rest = match.groups()
            mapped = inner(rest, module.startswith("attentions"))
            return f"{part}.mid.{_MID[module]}.{mapped}" if mapped else None
        for part in ("encoder", "decoder"):
            for name in ("conv_in", "conv_out", "conv_norm_out"):
                if key.startswith(f"{part}.{name}."):
                    return key.replace("conv_norm_out", "norm_out")
        if (
            key.startswith(("quant_conv.", "post_quant_conv."))
            or key == "quantize.embedding.weight"
        ):
            return key
        return None

    return map_key


def convert_diffusers(folder_or_model: str | os.PathLike | torch.nn.Module) -> VQGAN:
    """Load a diffusers `VQModel` (saved folder or instance) as our `VQGAN` (eval mode).

    Raises:
        ValueError: MoVQ or another unsupported option (see the module docstring), or any key
            without a counterpart.
    """
    if isinstance(folder_or_model, torch.nn.Module):
        source = f"diffusers {type(folder_or_model).__name__} instance"
        values, state_dict = dict(folder_or_model.config), folder_or_model.state_dict()
        values.setdefault("_class_name", type(folder_or_model).__name__)
    else:
        source = f"diffusers VQModel folder {folder_or_model}"
        values, state_dict = read_diffusers_folder(folder_or_model)
    config = diffusers_config(values, source)
    renamed = rename_keys(state_dict, diffusers_key_mapper(len(config.ch_mult)), source)
    return load_renamed(config, renamed, source)
