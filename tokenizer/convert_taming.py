"""Convert a taming-transformers VQGAN (Esser et al. 2021) into our `VQGAN`.

Input: a Lightning `.ckpt` whose `state_dict` holds the `VQModel` (plus `loss.*` for LPIPS and the
discriminator, which are dropped), or a transformer checkpoint holding it as
`first_stage_model.*`; and the training YAML (`model.params.{embed_dim, n_embed, ddconfig}` or
`model.params.first_stage_config.params.*`). The YAML is read with `yaml.safe_load` and only its
numbers are used; its `target` strings are never imported.

Our parameter names are taming's, so the weights map one to one. Covered: the ImageNet/FFHQ
f16-1024 and f16-16384 models and the OpenImages/LDM f8 VQ models. The Gumbel f8-8192 model
(`GumbelVQ`) is refused: it picks codes by argmax over logits of a `quantize.proj` conv, which our
nearest-neighbour quantizer cannot express.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from tokenizer.convert_common import (
    check_supported,
    load_pickled_checkpoint,
    load_renamed,
    rename_keys,
    required,
    select_prefix,
)
from tokenizer.vqgan import VQGAN, VQGANConfig

# taming `VQModel` and the subclasses/copies with the same modules (LDM's autoencoder.VQModel).
SUPPORTED_TARGETS = ("VQModel", "VQModelInterface", "VQNoDiscModel")
OUR_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
FIRST_STAGE_PREFIX = "first_stage_model."


def read_yaml(config_yaml: str | os.PathLike) -> dict:
    """Parse a YAML file with `yaml.safe_load` (no object construction)."""
    path = Path(config_yaml)
    if not path.is_file():
        raise FileNotFoundError(f"--config={str(path)!r} does not exist; pass the model's YAML")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"--config={str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"--config={str(path)!r} does not hold a mapping")
    return values


def find_first_stage(values: Mapping, source: str) -> tuple[str, dict, bool]:
    """(target, params, nested) of the VQ model in a taming YAML; `nested` is True for a
    transformer config whose VQGAN is `model.params.first_stage_config`."""
    model = values.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("params"), Mapping):
        raise ValueError(f"{source}: expected a taming YAML with model.target and model.params")
    params = model["params"]
    stage = params.get("first_stage_config")
    if isinstance(stage, Mapping):
        return str(stage.get("target", "")), dict(stage.get("params") or {}), True
    return str(model.get("target", "")), dict(params), False


def taming_config(values: Mapping, source: str = "config") -> tuple[VQGANConfig, bool]:
    """Our `VQGANConfig` for a parsed taming YAML, and whether it is a transformer config.

    Raises:
        ValueError: a Gumbel or other unsupported model, `remap`, or `double_z: true`.
    """
    target, params, nested = find_first_stage(values, source)
    class_name = target.rsplit(".", 1)[-1]
    if class_name == "GumbelVQ":
        raise ValueError(
            f"{source}: target {target!r} (Gumbel quantizer, e.g. the f8-8192 OpenImages model) "
            "is not supported: it selects codes by argmax over `quantize.proj` logits, which our "
            "nearest-neighbour VQGAN quantizer cannot represent. Use a VQ model (f16-1024, "
            "f16-16384, f8-16384) instead."
        )
    if class_name not in SUPPORTED_TARGETS:
        raise ValueError(f"{source}: target {target!r} is not one of {SUPPORTED_TARGETS}")
    check_supported(source, "remap", params.get("remap"), None, "remapped code indices")
    dd = params.get("ddconfig")
    if not isinstance(dd, Mapping):
        raise ValueError(f"{source}: {target} params have no ddconfig")
    check_supported(
        source,
        "ddconfig.double_z",
        bool(dd.get("double_z", True)),
        False,
        "a VQ encoder outputs z_channels, not a mean and a variance",
    )
    check_supported(
        source,
        "ddconfig.resamp_with_conv",
        dd.get("resamp_with_conv", True),
        True,
        "our up/downsamplers are convolutions",
    )
    sizes = ("resolution", "in_channels", "out_ch", "ch", "num_res_blocks", "z_channels")
    dd_int = {name: int(required(dd, name, source, "ddconfig")) for name in sizes}
    resolution = dd_int["resolution"]
    ch_mult = tuple(int(m) for m in required(dd, "ch_mult", source, "ddconfig"))
    levels = {resolution // 2**level for level in range(len(ch_mult))}
    attn_resolutions = required(dd, "attn_resolutions", source, "ddconfig")
    config = VQGANConfig(
        resolution=resolution,
        in_channels=dd_int["in_channels"],
        out_channels=dd_int["out_ch"],
        ch=dd_int["ch"],
        ch_mult=ch_mult,
        num_res_blocks=dd_int["num_res_blocks"],
        # taming adds attention where a level's side is listed; other values never match.
        attn_resolutions=tuple(sorted(int(r) for r in attn_resolutions if r in levels)),
        z_channels=dd_int["z_channels"],
        dropout=float(dd.get("dropout", 0.0)),
        codebook_size=int(required(params, "n_embed", source, "params")),
        codebook_dim=int(required(params, "embed_dim", source, "params")),
        l2_normalize=False,
        restart_dead_codes=False,
    )
    return config, nested


def taming_state_dict(checkpoint: Mapping, nested: bool, source: str) -> dict[str, torch.Tensor]:
    """The VQModel's weights from a loaded checkpoint, `first_stage_model.` removed if present."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise ValueError(
            f"{source}: no state_dict of tensors found (top-level keys {sorted(checkpoint)[:10]})"
        )
    first_stage = select_prefix(state_dict, FIRST_STAGE_PREFIX)
    if nested and first_stage is None:
        raise ValueError(
            f"{source}: the YAML is a transformer config but no key starts with "
            f"{FIRST_STAGE_PREFIX!r}"
        )
    return first_stage if first_stage is not None else dict(state_dict)


def _taming_key(key: str) -> str | None:
    if key.startswith(OUR_PREFIXES) or key == "quantize.embedding.weight":
        return key
    return None


def find_sibling_yaml(ckpt_path: Path) -> Path:
    """taming's log layout `<run>/checkpoints/last.ckpt` + `<run>/configs/*.yaml`."""
    candidates = sorted((ckpt_path.parent.parent / "configs").glob("*.yaml"))
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"no --config given and {ckpt_path.parent.parent / 'configs'} does not hold exactly "
            f"one YAML (found {[c.name for c in candidates]}); pass the model's YAML with --config"
        )
    return candidates[0]


def convert_taming(
    ckpt_path: str | os.PathLike, config_yaml: str | os.PathLike | None = None
) -> VQGAN:
    """Load a taming VQGAN checkpoint + YAML as our `VQGAN` (eval mode, fp32).

    Args:
        ckpt_path: Lightning `.ckpt` (or `.pth` with `state_dict`), read with weights_only=True.
        config_yaml: the training YAML; None looks for `../configs/*.yaml` beside the checkpoint.

    Raises:
        ValueError: unsupported model, unsafe pickle, or any key without a counterpart.
    """
    ckpt_path = Path(ckpt_path)
    config_yaml = Path(config_yaml) if config_yaml is not None else find_sibling_yaml(ckpt_path)
    source = f"taming checkpoint {ckpt_path}"
    config, nested = taming_config(read_yaml(config_yaml), source=str(config_yaml))
    state_dict = taming_state_dict(load_pickled_checkpoint(ckpt_path), nested, source)
    if "quantize.proj.weight" in state_dict:
        raise ValueError(
            f"{source}: has quantize.proj (a Gumbel quantizer), which is not supported"
        )
    renamed = rename_keys(state_dict, _taming_key, source, drop=lambda key: key.startswith("loss."))
    return load_renamed(config, renamed, source)
