"""Convert a LlamaGen VQ tokenizer (Sun et al. 2024, `tokenizer/tokenizer_image/vq_model.py`)
into our `VQGAN`.

Input: the `.pt` file that LlamaGen's `vq_train.py` writes (`{"model", "optimizer", ..., "args"}`)
or a released file such as `vq_ds16_c2i.pt` (`{"model"}`). LlamaGen's network is taming's with other
module names, attention only at the lowest resolution, and a quantizer that l2-normalises both z
and the codebook (kept: the config sets `l2_normalize=True`). Key map (verified in the research
notes, section 2.3):

    encoder.conv_blocks.{i}.res.{j}         -> encoder.down.{i}.block.{j}
    encoder.conv_blocks.{i}.{attn,downsample} -> encoder.down.{i}.{attn,downsample}
    decoder.conv_blocks.{k}.res.{j}         -> decoder.up.{L-1-k}.block.{j}   (reversed order)
    decoder.conv_blocks.{k}.{attn,upsample} -> decoder.up.{L-1-k}.{attn,upsample}
    {encoder,decoder}.mid.{0,1,2}           -> {encoder,decoder}.mid.{block_1,attn_1,block_2}
    quantize.codebook_used                  -> dropped (a usage statistic)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from tokenizer.convert_common import (
    load_pickled_checkpoint,
    load_renamed,
    rename_keys,
    required,
)
from tokenizer.vqgan import PRESETS, VQGAN, VQGANConfig

# LlamaGen's names for its two tokenizers (vq_model.py `VQ_models`): only ch_mult differs.
LLAMAGEN_CH_MULT = {"VQ-16": (1, 1, 2, 2, 4), "VQ-8": (1, 2, 2, 4)}
_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}
_SAME = ("conv_in.", "norm_out.", "conv_out.")


def _level_keys(state_dict: Mapping[str, torch.Tensor], part: str) -> dict[int, set[str]]:
    """{level: names of its sub-modules} for `{part}.conv_blocks.{level}.{name}.{...}`."""
    levels: dict[int, set[str]] = {}
    pattern = re.compile(rf"^{part}\.conv_blocks\.(\d+)\.(\w+)\.")
    for key in state_dict:
        match = pattern.match(key)
        if match:
            levels.setdefault(int(match.group(1)), set()).add(match.group(2))
    return levels


def infer_llamagen_config(
    state_dict: Mapping[str, torch.Tensor],
    resolution: int = 256,
    source: str = "LlamaGen state_dict",
) -> VQGANConfig:
    """Read the architecture off the weight shapes (LlamaGen files carry no config).

    `resolution` only places attention (at the lowest level, as LlamaGen hard-codes) and is the
    size recorded in the config; the network itself is fully convolutional.

    Raises:
        ValueError: naming `source` and the first missing key of a LlamaGen VQ state_dict.
    """
    conv_in = required(state_dict, "encoder.conv_in.weight", source)  # (ch, in_channels, 3, 3)
    quant_conv = required(state_dict, "quant_conv.weight", source)  # (codebook_dim, z_ch, 1, 1)
    codebook = required(state_dict, "quantize.embedding.weight", source)  # (K, codebook_dim)
    out_channels = required(state_dict, "decoder.conv_out.weight", source).shape[0]
    ch, levels = conv_in.shape[0], _level_keys(state_dict, "encoder")
    num_res_blocks = len(
        {
            k
            for k in state_dict
            if k.startswith("encoder.conv_blocks.0.res.") and k.endswith(".conv1.weight")
        }
    )
    first_convs = [f"encoder.conv_blocks.{level}.res.0.conv1.weight" for level in sorted(levels)]
    ch_mult = tuple(required(state_dict, key, source).shape[0] // ch for key in first_convs)
    sides = [resolution // 2**level for level in range(len(ch_mult))]
    return VQGANConfig(
        resolution=resolution,
        in_channels=conv_in.shape[1],
        out_channels=out_channels,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(sides[level] for level in sorted(levels) if "attn" in levels[level]),
        z_channels=quant_conv.shape[1],
        codebook_size=codebook.shape[0],
        codebook_dim=codebook.shape[1],
        l2_normalize=True,
        restart_dead_codes=False,
    )


def llamagen_key_mapper(num_levels: int):
    """A function mapping one LlamaGen key to ours (None when no rule applies)."""
    block = re.compile(
        r"^(encoder|decoder)\.conv_blocks\.(\d+)\.(res|attn|downsample|upsample)\.(.*)$"
    )
    mid = re.compile(r"^(encoder|decoder)\.mid\.([012])\.(.*)$")

    def map_key(key: str) -> str | None:
        if match := block.match(key):
            part, level, kind, rest = match.groups()
            if part == "encoder":
                return f"encoder.down.{level}.{'block' if kind == 'res' else kind}.{rest}"
            # LlamaGen's decoder lists levels in application order, taming's from the top.
            up = num_levels - 1 - int(level)
            return f"decoder.up.{up}.{'block' if kind == 'res' else kind}.{rest}"
        if match := mid.match(key):
            part, index, rest = match.groups()
            return f"{part}.mid.{_MID[index]}.{rest}"
        if key.startswith(tuple(f"{p}.{s}" for p in ("encoder", "decoder") for s in _SAME)):
            return key
        if (
            key.startswith(("quant_conv.", "post_quant_conv."))
            or key == "quantize.embedding.weight"
        ):
            return key
        return None

    return map_key


def resolve_llamagen_config(
    config: VQGANConfig | str | None,
    state_dict: Mapping[str, torch.Tensor],
    resolution: int,
    source: str = "LlamaGen state_dict",
) -> VQGANConfig:
    """Inferred config, checked against a LlamaGen model name ("VQ-16", "VQ-8"), one of our
    PRESETS, or an explicit VQGANConfig when one is given."""
    inferred = infer_llamagen_config(state_dict, resolution, source)
    if config is None:
        return inferred
    if isinstance(config, str):
        if config in LLAMAGEN_CH_MULT:
            expected = dataclasses.replace(inferred, ch_mult=LLAMAGEN_CH_MULT[config])
        elif config in PRESETS:
            expected = PRESETS[config]
        else:
            raise ValueError(
                f"config={config!r} is not one of {sorted(LLAMAGEN_CH_MULT)} or "
                f"our presets {sorted(PRESETS)}"
            )
        if expected != inferred:
            diff = {
                f.name: (getattr(expected, f.name), getattr(inferred, f.name))
                for f in dataclasses.fields(VQGANConfig)
                if getattr(expected, f.name) != getattr(inferred, f.name)
            }
            raise ValueError(
                f"config={config!r} does not match the checkpoint: "
                f"{{field: (preset, checkpoint)}} = {diff}"
            )
        return expected
    return config


def convert_llamagen(
    pt_path: str | os.PathLike,
    config: VQGANConfig | str | None = None,
    *,
    resolution: int = 256,
    checkpoint_key: str = "model",
) -> VQGAN:
    """Load a LlamaGen VQ `.pt` as our `VQGAN` (eval mode, fp32, l2-normalised codebook lookup).

    Args:
        pt_path: LlamaGen checkpoint, read with weights_only=True (`args` is stubbed).
        config: None to infer from the weights; "VQ-16"/"VQ-8" or a preset name to check the
            inferred architecture against; or a VQGANConfig to use as is.
        resolution: image side the tokenizer was trained at (256 for the released models).
        checkpoint_key: "model", or "ema" for the EMA weights of a training checkpoint.
    """
    source = f"LlamaGen checkpoint {pt_path}"
    checkpoint = load_pickled_checkpoint(Path(pt_path))
    state_dict = checkpoint.get(checkpoint_key)
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{source}: no {checkpoint_key!r} entry (top-level keys "
            f"{sorted(checkpoint)}); pass checkpoint_key='model' or 'ema'"
        )
    config = resolve_llamagen_config(config, state_dict, resolution, source)
    renamed = rename_keys(
        state_dict,
        llamagen_key_mapper(len(config.ch_mult)),
        source,
        drop=lambda key: key == "quantize.codebook_used",
    )
    return load_renamed(config, renamed, source)
