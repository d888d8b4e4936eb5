"""Evaluate a trained image tokenizer on a validation set and write the metrics as JSON.

    python scripts/evaluate_tokenizer.py --tokenizer runs/vqgan/export --data shapes \\
        --num-images 512 --out runs/vqgan/eval.json

Every image goes through encode -> decode. Reported over the whole set:
- PSNR (dB, per image on [0, 1] pixels, then averaged; capped at 100 dB, reached by identical
  images) and SSIM (Gaussian 11x11 window, per image, averaged; torchmetrics);
- LPIPS-VGG (Zhang et al. 2018) when torchvision's VGG16 ImageNet weights are in the torch hub
  cache; otherwise a clear message and null. `--lpips random` runs it on a random trunk: that
  only checks the code path, the number is not perceptual;
- rFID (Heusel et al. 2017) through torchmetrics with torch-fidelity's FID InceptionV3, when
  its weights are in the torch hub cache or given by `--fid-weights`; otherwise a clear message
  and null;
- codebook usage (the share of codes used at least once) and perplexity (exp of the entropy of
  the code histogram; the codebook size when every code is equally frequent);
- with `--judge N`: the Shapes judge on the reconstructions of N fresh renders (colour, shape,
  size, position, background, clean, all correct). No prior can draw better than its tokenizer
  decodes, so `all_correct` here is the ceiling of the pipeline's alignment.

Nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID InceptionV3
PSNR_CAP_DB = 100.0
MSE_FLOOR = 10 ** (-PSNR_CAP_DB / 10)  # PSNR on [0, 1] pixels is -10 log10(mse)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see --help."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--tokenizer", required=True, type=Path, help="tokenizer folder written by "
        "VQGAN.save_pretrained (config.json + model.safetensors)")  # fmt: skip
    add("--data", default="shapes", help="'shapes' (generated), an image folder, .tar shards, "
        "a save_to_disk folder or a cached Hub dataset name (default: shapes)")  # fmt: skip
    add("--split", default="validation", help="split to evaluate (default: validation)")
    add("--num-images", type=int, default=256, help="images to evaluate: Shapes generates "
        "this many; other data uses the first N valid images (default: 256)")  # fmt: skip
    add("--resolution", type=int, default=None, help="image side in pixels (default: the "
        "tokenizer's configured resolution)")  # fmt: skip
    add("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    add("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    add("--lpips", choices=("auto", "random", "off"), default="auto", help="'auto': LPIPS-VGG "
        "if the VGG16 weights are cached, else null with a message; 'random': a random VGG "
        "trunk (code-path check only, not perceptual); 'off': skip (default: auto)")  # fmt: skip
    add("--fid", choices=("auto", "off"), default="auto", help="'auto': rFID if the Inception "
        "weights are available (cache or --fid-weights), else null with a message; 'off': "
        "skip (default: auto)")  # fmt: skip
    add("--fid-weights", type=Path, default=None, help=f"path to torch-fidelity's {INCEPTION_FILE}"
        " (default: look in the torch hub cache)")  # fmt: skip
    add("--device", default="cpu", help="torch device (default: cpu)")
    add("--seed", type=int, default=0, help="seed of generated Shapes data (default: 0)")
    add("--judge", type=int, default=0, help="also judge the reconstructions of this many fresh "
        "Shapes renders at the tokenizer's resolution (default: 0, off)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.judge < 0:
        parser.error(f"--judge must be >= 0, got {args.judge}")
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.fid_weights is not None and not args.fid_weights.is_file():
        parser.error(f"--fid-weights {args.fid_weights} does not exist; pass the path to "
                     f"{INCEPTION_FILE} or leave the flag out")  # fmt: skip
    return args


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (B, 3, H, W) -> uint8 in [0, 255], as FID extractors expect."""
    return (to_unit(images) * 255).round().to(torch.uint8)


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) tensors in [-1, 1], on [0, 1] pixels -> (B,).

    The mean squared error is floored at MSE_FLOOR, so identical images give PSNR_CAP_DB
    (100 dB) instead of infinity, which JSON cannot hold."""
    mse = (to_unit(images) - to_unit(reconstructions)).pow(2).flatten(1).mean(1)  # (B,)
    return -10 * torch.log10(mse.clamp(min=MSE_FLOOR))


def ssim(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (torchmetrics, Gaussian 11x11, sigma 1.5) on [0, 1] pixels -> (B,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        to_unit(reconstructions), to_unit(images), data_range=1.0, reduction="none"
    )


class CodeHistogram:
    """Counts of every code over the evaluation set: usage and perplexity."""

    def __init__(self, codebook_size: int) -> None:
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> None:
        """Add the codes of a batch, any shape, ints in [0, codebook_size)."""
        self.counts += torch.bincount(codes.flatten().cpu(), minlength=self.counts.numel())

    def usage(self) -> float:
        """The share of codes used at least once, in [0, 1]."""
        return float((self.counts > 0).float().mean())

    def perplexity(self) -> float:
        """exp(entropy) of the code frequencies, in [1, codebook_size]."""
        probabilities = self.counts.double() / self.counts.sum().clamp(min=1)
        nonzero = probabilities[probabilities > 0]
        return float(torch.exp(-(nonzero * nonzero.log()).sum()))


def inception_weights(explicit: Path | None) -> Path | None:
    """The FID Inception weights file: --fid-weights, else the torch hub cache, else None."""
    if explicit is not None:
        return explicit
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def build_fid(feature: nn.Module | None = None, weights: Path | None = None):
    """torchmetrics FID on uint8 images: a custom feature module (tests), or the FID InceptionV3
    loaded from `weights` (never downloaded)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature is not None:
        return FrechetInceptionDistance(feature=feature)
    if weights is None:
        raise ValueError("build_fid needs a feature module or the Inception weights path")
    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))


def build_lpips(mode: str, notes: list[str]) -> nn.Module | None:
    """LPIPS-VGG per --lpips; None (with a note) when off or the weights are missing."""
    if mode == "off":
        notes.append("LPIPS skipped (--lpips off)")
        return None
    from tokenizer.losses import build_perceptual_loss

    try:
        module = build_perceptual_loss("lpips", random_backbone=mode == "random")
    except FileNotFoundError as error:
        notes.append(f"LPIPS not computed: {error}")
        return None
    if mode == "random":
        notes.append("LPIPS on a RANDOM VGG trunk (--lpips random): a code-path check, not a "
                     "perceptual distance")  # fmt: skip
    return module


def build_fid_metric(args: argparse.Namespace, notes: list[str]):
    """rFID metric per --fid; None (with a note) when off or the weights are missing."""
    if args.fid == "off":
        notes.append("rFID skipped (--fid off)")
        return None
    weights = inception_weights(args.fid_weights)
    if weights is None:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        notes.append(
            f"rFID not computed: the FID Inception weights ({INCEPTION_FILE}) are not in {cache} "
            "and nothing is downloaded; copy the file there or pass --fid-weights PATH"
        )
        return None
    return build_fid(weights=weights)


@torch.inference_mode()
def evaluate(model, batches, lpips_module: nn.Module | None = None, fid_metric=None) -> dict:
    """Metrics of encode -> decode over `batches` (iterable of (B, 3, H, W) in [-1, 1]).

    Returns means of psnr, ssim and lpips (None without a module), rfid (None without a
    metric), codebook usage and perplexity, and the image count."""
    histogram = CodeHistogram(model.codebook_size)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    count = 0
    for images in batches:
        codes = model.encode(images)  # (B, h, w)
        reconstructions = model.decode(codes)  # (B, 3, H, W) in [-1, 1]
        histogram.update(codes)
        sums["psnr"] += float(psnr(images, reconstructions).sum())
        sums["ssim"] += float(ssim(images, reconstructions).sum())
        if lpips_module is not None:
            sums["lpips"] += float(lpips_module(images, reconstructions).sum())
        if fid_metric is not None:
            fid_metric.update(to_uint8(images).cpu(), real=True)
            fid_metric.update(to_uint8(reconstructions).cpu(), real=False)
        count += images.shape[0]
    if count == 0:
        raise ValueError("no images to evaluate; check --data and --num-images")
    return {
        "num_images": count,
        "psnr": sums["psnr"] / count,
        "ssim": sums["ssim"] / count,
        "lpips": None if lpips_module is None else sums["lpips"] / count,
        "rfid": None if fid_metric is None else float(fid_metric.compute()),
        "codebook_usage": histogram.usage(),
        "codebook_perplexity": histogram.perplexity(),
        "codebook_size": model.codebook_size,
    }


def judge_reconstructions(
    model, num_images: int, resolution: int, seed: int = 0, batch_size: int = 32, device="cpu"
) -> dict:
    """The Shapes judge on encode -> decode of `num_images` fresh single-object renders of
    training colour-shape pairs; `model` is any image tokenizer (encode/decode in [-1, 1]) on
    `device`. Returns judge_batch's accuracies (0..1) and count."""
    import numpy as np

    from pipelines.data.judge import judge_reconstructions as judge
    from pipelines.data.shapes import render, sample_attribute_batch

    rng = np.random.default_rng(seed)
    attributes = sample_attribute_batch(rng, num_images, "exclude")
    renders = np.stack([render(record, resolution, rng) for record in attributes])  # (N, R, R, 3)
    return judge(model, renders, attributes, batch_size, device)


def image_batches(args: argparse.Namespace, resolution: int):
    """Batches (B, 3, R, R) in [-1, 1] of the first --num-images valid images of the split."""
    from pipelines.data.images import load_image_caption_dataset

    dataset = load_image_caption_dataset(
        args.data, split=args.split, resolution=resolution, num_samples=args.num_images,
        seed=args.seed,
    )  # fmt: skip
    count = min(args.num_images, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(count))
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size)
    for batch in loader:
        yield batch["image"].to(args.device)


def main(args: argparse.Namespace) -> dict:
    """Evaluate, print the results and write them to --out; returns them."""
    from tokenizer import VQGAN

    model = VQGAN.from_pretrained(args.tokenizer, device=args.device)
    resolution = args.resolution or model.config.resolution
    model.latent_shape(resolution, resolution)  # ValueError naming the factor if it does not fit
    notes: list[str] = []
    lpips_module = build_lpips(args.lpips, notes)
    if lpips_module is not None:
        lpips_module = lpips_module.to(args.device)
    fid_metric = build_fid_metric(args, notes)
    for note in notes:
        print(f"[evaluate_tokenizer] {note}", file=sys.stderr)
    metrics = evaluate(model, image_batches(args, resolution), lpips_module, fid_metric)
    for name in ("rfid", "lpips"):
        if metrics[name] is not None and not math.isfinite(metrics[name]):
            notes.append(f"{name} came out {metrics[name]} (too few images?); reported as null")
            metrics[name] = None
    if args.judge:
        metrics["shapes_judge"] = judge_reconstructions(
            model, args.judge, resolution, args.seed, args.batch_size, args.device
        )
    result = {
        **metrics,
        "psnr_cap_db": PSNR_CAP_DB,
        "lpips_backbone": None if lpips_module is None else f"vgg16 ({args.lpips})",
        "tokenizer": str(args.tokenizer),
        "identity": model.identity(),
        "data": str(args.data),
        "split": args.split,
        "resolution": resolution,
        "notes": notes,
    }
    text = json.dumps(result, indent=2, allow_nan=False)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(parse_args())
