"""FID and KID of a pipeline's samples against real images with captions (`--reference-dir`
of scripts/evaluate_pipeline.py), through torchmetrics; no weights are ever downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID InceptionV3
REFERENCE_SEED_OFFSET = 4


def inception_weights(path: Path | None) -> Path | None:
    """The given weights file, or torch-fidelity's cached one, or None if neither exists."""
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights {path} does not exist")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def fid_kid(real: torch.Tensor, fake: torch.Tensor, feature, weights: Path | None = None) -> dict:
    """FID and KID between uint8 image batches (N, 3, H, W); `feature` is 2048 (InceptionV3,
    which then needs `weights`) or an nn.Module with `num_features` (tests, custom networks)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    options = {} if weights is None else {"feature_extractor_weights_path": str(weights)}
    subset = min(50, real.shape[0], fake.shape[0])
    fid = FrechetInceptionDistance(feature=feature, **options)
    kid = KernelInceptionDistance(feature=feature, subset_size=subset, **options)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def reference_metrics(pipeline, args, feature=2048, setting: dict | None = None) -> dict:
    """Sample one image per reference caption with the evaluation's sampling `setting` (None:
    the pipeline's saved defaults) and compare with the reference images."""
    from pipelines.data.images import load_image_caption_dataset
    from pipelines.data.sources import available_splits

    if not args.reference_dir.is_dir():
        raise FileNotFoundError(f"--reference-dir {args.reference_dir} is not a folder")
    weights = inception_weights(args.inception_weights)
    if feature == 2048 and weights is None:
        message = (
            f"FID/KID skipped: InceptionV3 weights ({INCEPTION_FILE}) are not on this machine and "
            "are never downloaded here; pass --inception-weights FILE"
        )
        print(message)
        return {"fid": None, "kid": None, "message": message}
    split = args.reference_split
    if split is None:
        split = "validation" if "validation" in available_splits(args.reference_dir) else "train"
    dataset = load_image_caption_dataset(
        args.reference_dir, split=split, resolution=pipeline.config.resolution
    )
    count = min(len(dataset), args.num_prompts)
    items = [dataset[index] for index in range(count)]
    real = torch.stack([((item["image"] + 1) * 127.5).round() for item in items]).to(torch.uint8)
    generator = torch.Generator(pipeline.device).manual_seed(
        args.seed * 1000 + REFERENCE_SEED_OFFSET
    )
    fake = pipeline(
        [item["caption"] for item in items],
        generator=generator,
        output_type="pt",
        max_batch_size=args.batch_size,
        show_progress=False,
        **(setting or {}),
    ).images
    fake = (fake * 255).round().to(torch.uint8)  # (N, 3, H, W)
    return {"num_images": count, "split": split, **fid_kid(real, fake, feature, weights)}
