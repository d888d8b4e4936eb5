"""Convert a transformers `JanusVQVAE` (DeepSeek Janus; LlamaGen's VQ-16 in HF naming) into our
`VQGAN`.

Accepted: a `JanusVQVAE` instance; a folder written by `JanusVQVAE.save_pretrained`; or a full
Janus model folder, whose `config.json` has the `vq_config` and whose safetensors store the VQ as
`model.vqmodel.*` (the prefix is stripped; other sub-models are not read).

Differences handled here:
- `decoder.up.{k}` is in application order (lowest resolution first); ours is taming's order, so
  it becomes `decoder.up.{L-1-k}`. The encoder and the quantizer keep their names.
- Attention sits at the lowest level only, which is taming's `attn_resolutions=(num_patches,)` at
  `resolution = num_patches * 2 ** (L - 1)`.
- HF's encode compares z against the raw codebook, while its decode looks up l2-normalised rows
  (as LlamaGen does for both). We store l2-normalised rows and set `l2_normalize=True`, so encode
  and decode agree; for unit rows HF's argmin equals LlamaGen's normalised one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokenizer.convert_common import (
    check_supported,
    load_renamed,
    read_safetensors_folder,
    rename_keys,
    select_prefix,
)
from tokenizer.vqgan import VQGAN, VQGANConfig

COMPOSITE_PREFIX = "model.vqmodel."


def read_janus_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(VQ config dict, VQ state_dict without prefix) of a JanusVQVAE or full Janus folder."""
    path = Path(folder)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"SRC={str(path)!r} has no config.json; pass a folder written by "
            "JanusVQVAE.save_pretrained or a Janus model folder"
        )
    values = json.loads(config_file.read_text())
    if values.get("model_type") == "janus":
        vq_values = values.get("vq_config") or {}
        state_dict = select_prefix(
            read_safetensors_folder(path, COMPOSITE_PREFIX), COMPOSITE_PREFIX
        )
        if not state_dict:
            raise ValueError(f"SRC={str(path)!r}: no weights under {COMPOSITE_PREFIX!r}")
        return _with_defaults(vq_values), state_dict
    if values.get("model_type") != "janus_vqgan":
        raise ValueError(
            f"SRC={str(path)!r}: model_type={values.get('model_type')!r}, expected "
            "'janus_vqgan' (JanusVQVAE) or 'janus' (full model)"
        )
    return _with_defaults(values), read_safetensors_folder(path, "")


def _with_defaults(values: Mapping[str, Any]) -> dict:
    """Fill fields that a composite config leaves out with JanusVQVAEConfig's defaults."""
    from transformers import JanusVQVAEConfig  # lazy: transformers is needed only here

    known = {key: value for key, value in values.items() if key != "model_type"}
    return JanusVQVAEConfig(**known).to_dict()


def janus_config(values: Mapping[str, Any], source: str = "config") -> VQGANConfig:
    """Our `VQGANConfig` for a JanusVQVAEConfig dict."""
    check_supported(
        source,
        "double_latent",
        bool(values.get("double_latent", False)),
        False,
        "a VQ encoder outputs latent_channels, not a mean and a variance",
    )
    ch_mult = tuple(int(m) for m in values["channel_multiplier"])
    patches = int(values["num_patches"])
    return VQGANConfig(
        resolution=patches * 2 ** (len(ch_mult) - 1),
        in_channels=int(values["in_channels"]),
        out_channels=int(values["out_channels"]),
        ch=int(values["base_channels"]),
        ch_mult=ch_mult,
        num_res_blocks=int(values["num_res_blocks"]),
        attn_resolutions=(patches,),
        z_channels=int(values["latent_channels"]),
        dropout=float(values.get("dropout", 0.0)),
        codebook_size=int(values["num_embeddings"]),
        codebook_dim=int(values["embed_dim"]),
        l2_normalize=True,
        restart_dead_codes=False,
    )


def janus_key_mapper(num_levels: int):
    """A function mapping one JanusVQVAE key to ours (None when no rule applies)."""
    up = re.compile(r"^decoder\.up\.(\d+)\.(.*)$")
    same = re.compile(
        r"^(encoder\.(conv_in|down|mid|norm_out|conv_out)|decoder\.(conv_in|mid|norm_out|conv_out)"
        r"|quant_conv|post_quant_conv)\."
    )

    def map_key(key: str) -> str | None:
        if match := up.match(key):
            return f"decoder.up.{num_levels - 1 - int(match.group(1))}.{match.group(2)}"
        if same.match(key) or key == "quantize.embedding.weight":
            return key
        return None

    return map_key


def convert_janus(folder_or_model: str | os.PathLike | torch.nn.Module) -> VQGAN:
    """Load a transformers JanusVQVAE (instance, its folder, or a full Janus folder) as our
    `VQGAN` with l2-normalised codebook rows (eval mode).

    Raises:
        ValueError: `double_latent`, a wrong model_type, or any key without a counterpart.
    """
    if isinstance(folder_or_model, torch.nn.Module):
        source = f"{type(folder_or_model).__name__} instance"
        values, state_dict = folder_or_model.config.to_dict(), folder_or_model.state_dict()
    else:
        source = f"Janus folder {folder_or_model}"
        values, state_dict = read_janus_folder(folder_or_model)
    config = janus_config(values, source)
    state_dict = dict(state_dict)
    codebook = state_dict.get("quantize.embedding.weight")
    if codebook is not None:
        state_dict["quantize.embedding.weight"] = F.normalize(codebook.float(), dim=-1)  # (K, D)
    renamed = rename_keys(state_dict, janus_key_mapper(len(config.ch_mult)), source)
    return load_renamed(config, renamed, source)
