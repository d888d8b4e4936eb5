"""Convert a published image tokenizer into our VQGAN folder (config.json + model.safetensors).

    python scripts/convert_tokenizer.py --from taming last.ckpt --config model.yaml --out vqgan-f16-16384
    python scripts/convert_tokenizer.py --from llamagen vq_ds16_c2i.pt --config VQ-16 --out llamagen-vq16
    python scripts/convert_tokenizer.py --from diffusers amused-256/vqvae --out amused-vq
    python scripts/convert_tokenizer.py --from janus Janus-Pro-1B --out janus-vq

The conversion is strict (an unmapped key is an error naming it), pickled checkpoints are read
with torch.load(weights_only=True), and nothing is downloaded. After writing, the folder is
reloaded with VQGAN.from_pretrained and its weights are compared with the converted model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tokenizer import VQGAN
from tokenizer.convert import SOURCES, convert_tokenizer

SOURCE_HELP = {
    "taming": "Lightning .ckpt (state_dict; loss.* dropped; first_stage_model.* taken from "
    "transformer checkpoints) plus its YAML via --config",
    "llamagen": "LlamaGen VQ .pt with a 'model' entry (architecture read off the weights)",
    "diffusers": "folder written by diffusers VQModel.save_pretrained (e.g. a pipeline's vqvae/)",
    "janus": "folder of a transformers JanusVQVAE or of a full Janus model (model.vqmodel.*)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="sources: " + "; ".join(f"{name}: {text}" for name, text in SOURCE_HELP.items()),
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=SOURCES,
        help="format of SRC (see the list below)",
    )
    parser.add_argument("src", metavar="SRC", help="local checkpoint file or model folder")
    parser.add_argument(
        "--config",
        default=None,
        help="taming: the model YAML (default: ../configs/*.yaml beside the "
        "checkpoint); llamagen: optional 'VQ-16', 'VQ-8' or one of our preset "
        "names to check the architecture against; not used for diffusers/janus",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder for config.json + model.safetensors"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="llamagen only: training image side, recorded in the config and "
        "used to place attention (default 256)",
    )
    parser.add_argument(
        "--checkpoint-key",
        default=None,
        help="llamagen only: 'model' (default) or 'ema' for training checkpoints",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists (otherwise an existing folder is an error)",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    """Convert, save, reload and verify; returns the saved model's identity()."""
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")
    options = {
        key: value
        for key, value in (("resolution", args.resolution), ("checkpoint_key", args.checkpoint_key))
        if value is not None
    }
    model = convert_tokenizer(args.source, args.src, args.config, **options)
    model.save_pretrained(args.out)
    reloaded = VQGAN.from_pretrained(args.out)
    for key, tensor in model.state_dict().items():
        if not torch.equal(tensor, reloaded.state_dict()[key]):
            raise RuntimeError(
                f"{args.out}: reloaded tensor {key!r} differs from the converted one"
            )
    identity = reloaded.identity()
    print(
        json.dumps(
            {"out": str(args.out), "config": reloaded.config.__dict__, **identity},
            indent=2,
            default=list,
        )
    )
    return identity


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        sys.exit(f"error: {error}")
