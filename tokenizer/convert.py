"""Converters from published image tokenizers into our `VQGAN` format.

    from tokenizer.convert import convert_taming, convert_llamagen, convert_diffusers, convert_janus
    model = convert_taming("last.ckpt", "model.yaml")   # -> VQGAN, eval mode, fp32
    model.save_pretrained("vqgan-f16-16384")            # config.json + model.safetensors

Every conversion is strict: each source key is mapped or explicitly dropped (taming's `loss.*`,
LlamaGen's `quantize.codebook_used`), and any other key is an error naming it. Pickled files are
read with `torch.load(weights_only=True)` only (see `tokenizer.convert_common`). Nothing here
touches the network: sources are local files and folders.

The command-line front end is `scripts/convert_tokenizer.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tokenizer.convert_common import load_pickled_checkpoint
from tokenizer.convert_diffusers import convert_diffusers
from tokenizer.convert_janus import convert_janus
from tokenizer.convert_llamagen import convert_llamagen
from tokenizer.convert_taming import convert_taming
from tokenizer.vqgan import VQGAN

SOURCES = ("taming", "llamagen", "diffusers", "janus")

__all__ = [
    "SOURCES",
    "convert_diffusers",
    "convert_janus",
    "convert_llamagen",
    "convert_taming",
    "convert_tokenizer",
    "load_pickled_checkpoint",
]


def _check_local(src: str | os.PathLike | torch.nn.Module) -> None:
    if isinstance(src, torch.nn.Module) or Path(src).exists():
        return
    hint = ""
    if isinstance(src, str) and src.count("/") == 1 and not src.startswith((".", "/")):
        hint = (
            f" It looks like a Hub id: converters never download; fetch the files first, e.g. "
            f"`huggingface-cli download {src} --local-dir ./{src.split('/')[1]}`."
        )
    raise FileNotFoundError(f"SRC={str(src)!r} does not exist.{hint}")


def convert_tokenizer(
    source: str,
    src: str | os.PathLike | torch.nn.Module,
    config: str | os.PathLike | None = None,
    **options: object,
) -> VQGAN:
    """Dispatch to the converter for `source` (one of SOURCES).

    Args:
        source: "taming" | "llamagen" | "diffusers" | "janus".
        src: checkpoint file (taming, llamagen) or folder / live model (diffusers, janus).
        config: taming: the model YAML (None: `../configs/*.yaml` beside the checkpoint);
            llamagen: None, "VQ-16", "VQ-8" or a preset name; others: must be None.
        options: llamagen only: `resolution`, `checkpoint_key`.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not supported; allowed: {SOURCES}")
    _check_local(src)
    if source in ("diffusers", "janus") and config is not None:
        raise ValueError(
            f"config={str(config)!r}: a {source} folder carries its own config.json; drop --config"
        )
    if options and source != "llamagen":
        raise ValueError(f"options {sorted(options)} apply to source='llamagen' only")
    if source == "taming":
        return convert_taming(src, config)
    if source == "llamagen":
        return convert_llamagen(src, None if config is None else str(config), **options)
    if source == "diffusers":
        return convert_diffusers(src)
    return convert_janus(src)
