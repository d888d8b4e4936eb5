"""Evaluate a pipeline folder: Shapes judge accuracy, a guidance sweep, tokenizer PSNR, FID/KID.

    python scripts/evaluate_pipeline.py --pipeline outputs/demo/pipeline --num-prompts 200 \
        --held-out --sweep-guidance 1,1.5,2,3 --out outputs/demo/evaluation.json

Protocol (no figure is chosen on the prompts it reports):
- The sweep samples one image per prompt for `--num-validation-prompts` prompts of the Shapes
  *validation* split (seen colour-shape pairs only), with validation sampling seeds, and picks
  the scale with the highest all-attributes-correct rate (ties: the earlier scale in the list).
  The chosen scale becomes the pipeline's saved default (`pipeline_config.json`, rewritten
  atomically) unless `--no-save-default`.
- Reranking: with `--num-candidates K` > 1 (default: the pipeline's saved value) each image is
  the best of K candidates by the pipeline's rerank score. Each sweep point draws its K
  candidates once and judges the pick of every `--sweep-likelihood-weight`, so the weight is
  chosen on validation prompts too. Test rows then also report `first_candidate` (the first of
  the K, an unreranked sample at the same settings, though not the image a one-sample call with
  the same seed draws) and `any_candidate` (some candidate right: the ceiling of any reranker
  of these draws).
- Test figures use `--num-prompts` prompts of the Shapes *test* split with different sampling
  seeds: seen pairs, and with `--held-out` as many prompts whose colour-shape pair never
  appeared in training. They are reported at the evaluation scale and without CFG (scale 1).
- "all_correct" means colour, shape, size, position, background right and the image clean
  (`pipelines.data.judge`). Every figure is also split by the asked object size (`by_size`).
- `reconstruction` judges the image tokenizer's encode -> decode of the test renders behind the
  same test prompts: about what a prior that reproduced the encoder's codes exactly would reach
  (the practical ceiling of a prior trained on those codes).

Real data: `--reference-dir DIR` samples one image per reference caption and reports FID and KID
(torchmetrics) against the reference images when Inception weights are available
(`--inception-weights FILE`, or torch-fidelity's cached file); otherwise it says why it can't.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common.help import HelpFormatter
from common.reference import reference_metrics

from pipelines import TextToImagePipeline
from pipelines.data.judge import (
    at_judge_resolution,
    describe_by_size,
    judge_batch,
    judge_image,
    judge_reconstructions,
    summarize_verdicts,
)
from pipelines.data.shapes import make_shapes_dataset
from pipelines.output import postprocess
from pipelines.serialization import update_pipeline_config

SEED_OFFSETS = {"validation": 1, "test_seen": 2, "test_held_out": 3}  # reference: 4, its module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add = parser.add_argument
    chosen = "(default: the sweep's choice, else the pipeline's saved value)"
    # fmt: off
    add("--pipeline", type=Path, required=True, help="pipeline folder")
    add("--num-prompts", type=int, default=200, help="test prompts per group (seen, held-out)")
    add("--held-out", action="store_true", help="also test held-out colour-shape pairs")
    add("--sweep-guidance", default=None, help="comma list of guidance scales, e.g. 1,1.5,2,3")
    add("--sweep-temperature", default=None, help="comma list of temperatures, e.g. 1,0.8")
    add("--sweep-top-k", default=None, help="comma list of top-k values; 0 means no top-k")
    add("--num-candidates", type=int, default=None,
        help="candidates per image, reranked (default: the pipeline's saved value)")
    add("--sweep-likelihood-weight", default=None,
        help="comma list of rerank likelihood weights tried on each draw of the sweep")
    add("--num-validation-prompts", type=int, default=200,
        help="validation prompts the sweeps choose on (never the test prompts)")
    add("--no-save-default", action="store_true",
        help="don't write the sweep's choice into the pipeline's pipeline_config.json")
    add("--guidance-scale", type=float, default=None, help=f"guidance of the test {chosen}")
    add("--temperature", type=float, default=None, help=f"temperature of the test {chosen}")
    add("--top-k", type=int, default=None, help=f"top-k of the test, 0 = none {chosen}")
    add("--tokenizer-images", type=int, default=0,
        help="validation images for the tokenizer's PSNR and codebook usage (0: skip)")
    add("--reference-dir", type=Path, default=None,
        help="real images with captions: FID / KID of samples of their captions")
    add("--reference-split", default=None,
        help="split of --reference-dir (default: 'validation' if it has one, else 'train')")
    add("--inception-weights", type=Path, default=None,
        help="FID Inception weights (.pth) for --reference-dir; none are downloaded")
    add("--seed", type=int, default=0, help="seed of prompts and generators")
    add("--batch-size", type=int, default=100, help="images per sampling batch")
    add("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add("--out", type=Path, default=None, help="write the JSON report here")
    # fmt: on
    args = parser.parse_args(argv)
    for name in ("num_prompts", "num_validation_prompts", "batch_size", "num_candidates"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    try:
        args.sweep = sweep_grid(args)
        args.weights = None
        if args.sweep_likelihood_weight is not None:
            text = args.sweep_likelihood_weight
            args.weights = parse_list("--sweep-likelihood-weight", text, float, 0.0)
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_list(flag: str, text: str, kind: type, low: float) -> list:
    """'1,1.5,2' -> [1.0, 1.5, 2.0]; ValueError naming the flag for anything else."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"{flag} {text!r}: use comma-separated numbers") from error
    if not values or any(not math.isfinite(value) or value < low for value in values):
        raise ValueError(f"{flag} {text!r}: use one or more finite values >= {low}")
    return values


def sweep_grid(args: argparse.Namespace) -> list[dict] | None:
    """Every combination of the swept values (None: no sweep); unswept knobs keep the default."""
    flags = {
        "guidance_scale": ("--sweep-guidance", args.sweep_guidance, float, 0.0),
        "temperature": ("--sweep-temperature", args.sweep_temperature, float, 1e-3),
        "top_k": ("--sweep-top-k", args.sweep_top_k, int, 0),
    }
    grid: list[dict] = [{}]
    for knob, (flag, text, kind, low) in flags.items():
        if text is not None:
            values = [value or None for value in parse_list(flag, text, kind, low)]
            grid = [{**point, knob: value} for point in grid for value in values]
    return grid if grid != [{}] else None


def shapes_split(split: str, count: int, held_out: bool, seed: int, resolution: int = 32):
    """`count` Shapes rows (image, caption, attributes) of `split`; held-out pairs only or none.
    The records do not depend on `resolution`, only the renders do."""
    fraction = 1.0 if held_out else 0.0
    return make_shapes_dataset(
        split, count, resolution=resolution, seed=seed, held_out_fraction=fraction
    )


def records_of(dataset) -> list[dict]:
    """The rows of a Shapes dataset without their images: caption + attributes."""
    return [dict(row) for row in dataset.remove_columns("image")]


def shapes_prompts(split: str, count: int, held_out: bool, seed: int) -> list[dict]:
    """`count` Shapes records (caption + attributes) of `split`; held-out pairs only or none."""
    return records_of(shapes_split(split, count, held_out, seed))


KNOBS = ("guidance_scale", "temperature", "top_k", "num_candidates", "likelihood_weight")


def judge_setting(
    pipeline: TextToImagePipeline,
    records: list[dict],
    setting: dict,
    seed: int,
    batch: int,
    weights: list[float] | None = None,
) -> list[dict]:
    """One image per record with the sampling `setting`, judged against the record's attributes.

    With setting["num_candidates"] > 1 the candidates are drawn once, and one row is returned for
    each likelihood weight in `weights` (default: the setting's own), each with the
    `first_candidate` and `any_candidate` figures of that draw."""
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    captions = [record["caption"] for record in records]
    count = setting["num_candidates"]
    sampling = {key: setting[key] for key in ("guidance_scale", "temperature", "top_k")}
    if count == 1:
        output = pipeline(
            captions,
            generator=generator,
            max_batch_size=batch,
            show_progress=False,
            num_candidates=1,  # not the folder's saved default
            **sampling,
        )
        return [{**setting, **judge_batch(at_judge_resolution(output.images), records)}]
    weights = weights or [setting["likelihood_weight"]]
    if pipeline.scorer is None:  # weight 0 would pick the first candidate; __call__ refuses it
        weights = [weight for weight in weights if weight > 0]
        if not weights:
            raise ValueError(
                f"num_candidates={count} on a pipeline without a scorer needs a likelihood "
                "weight > 0; pass --sweep-likelihood-weight with positive values or a pipeline "
                "with a scorer"
            )
    candidates = pipeline.sample_candidates(
        captions, count, generator=generator, max_batch_size=batch, show_progress=False, **sampling
    )
    verdicts = judge_candidates(pipeline, candidates.codes, records)  # [K][N]
    first = summarize_verdicts(verdicts[0], records)
    any_right = float(
        np.mean([any(v[i]["all_correct"] for v in verdicts) for i in range(len(records))])
    )
    rows = []
    for weight in weights:
        best = candidates.best(weight).tolist()  # (N,) candidate index per record
        picked = [verdicts[k][i] for i, k in enumerate(best)]
        row = {**setting, "likelihood_weight": weight, **summarize_verdicts(picked, records)}
        rows.append({**row, "first_candidate": first, "any_candidate": any_right})
    return rows


def judge_candidates(pipeline: TextToImagePipeline, codes: torch.Tensor, records: list) -> list:
    """`judge_image` verdicts of every candidate, decoded once: codes (N, K, h, w) -> [K][N]."""
    verdicts = []
    for index in range(codes.shape[1]):
        images = at_judge_resolution(postprocess(pipeline.decode(codes[:, index]), "pil"))
        verdicts.append([judge_image(image, record) for image, record in zip(images, records)])
    return verdicts


def run_sweep(pipeline: TextToImagePipeline, args: argparse.Namespace, default: dict) -> dict:
    """Judge each setting of the grid (and each likelihood weight) on validation prompts;
    returns the table and the best."""
    records = shapes_prompts("validation", args.num_validation_prompts, False, args.seed)
    seed = args.seed * 1000 + SEED_OFFSETS["validation"]
    table = []
    for point in args.sweep or [{}]:
        rows = judge_setting(
            pipeline, records, {**default, **point}, seed, args.batch_size, args.weights
        )
        table += rows
        for row in rows:
            knobs = ", ".join(f"{key} {row[key]}" for key in default)
            print(f"  sweep {knobs}: all correct {row['all_correct']:.3f}", flush=True)
    best = max(table, key=lambda row: row["all_correct"])  # max keeps the first of equals
    return {
        "split": "validation",
        "num_prompts": len(records),
        "criterion": "all_correct on seen validation prompts",
        "results": table,
        "chosen": {key: best[key] for key in default},
    }


def reconstruction_ceiling(pipeline: TextToImagePipeline, dataset, batch: int) -> dict:
    """The judge on the image tokenizer's encode -> decode of a Shapes `dataset` (the test rows
    behind the test prompts): about what a prior that reproduced the encoder's codes exactly
    would reach, the practical ceiling of the pipeline's all-correct rate."""
    renders = np.stack([np.asarray(image, np.uint8) for image in dataset["image"]])  # (N,H,W,3)
    return judge_reconstructions(
        pipeline.image_tokenizer, renders, records_of(dataset), batch, pipeline.device
    )


def run_tests(
    pipeline: TextToImagePipeline, args: argparse.Namespace, setting: dict
) -> tuple[dict, dict]:
    """Test-split figures with `setting` and without CFG, for seen (and held-out) pairs; and
    the reconstruction ceiling of each group, from the same test rows."""
    groups = {"seen": False, **({"held_out": True} if args.held_out else {})}
    report: dict = {"split": "test"}
    ceiling: dict = {}
    settings = {"with_cfg": setting, "without_cfg": {**setting, "guidance_scale": 1.0}}
    same = setting["guidance_scale"] == 1.0  # then both rows are one draw: judged once
    resolution = pipeline.config.resolution
    for group, held_out in groups.items():
        dataset = shapes_split("test", args.num_prompts, held_out, args.seed, resolution)
        records = records_of(dataset)
        seed = args.seed * 1000 + SEED_OFFSETS[f"test_{group}"]
        for label, value in settings.items():
            if same and label == "without_cfg":
                report.setdefault(label, {})[group] = report["with_cfg"][group]
                continue
            (row,) = judge_setting(pipeline, records, value, seed, args.batch_size)
            report.setdefault(label, {})[group] = row
        ceiling[group] = reconstruction_ceiling(pipeline, dataset, args.batch_size)
    return report, ceiling


def tokenizer_metrics(
    image_tokenizer, count: int, resolution: int, seed: int, batch: int, device: torch.device
) -> dict:
    """PSNR (dB, mean over images, pixels in [0, 1]) and codebook usage on Shapes validation;
    batches go to `device`, the pipeline's."""
    dataset = make_shapes_dataset("validation", count, resolution=resolution, seed=seed)
    pixels = np.stack([np.asarray(image, np.float32) for image in dataset["image"]])  # (N,H,W,3)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, H, W)
    codes, errors = [], []
    with torch.inference_mode():
        for chunk in images.split(batch):
            chunk_codes = image_tokenizer.encode(chunk.to(device))  # (b, h, w)
            recon = image_tokenizer.decode(chunk_codes).float().cpu()  # (b, 3, H, W)
            errors.append(((recon - chunk) / 2).pow(2).mean(dim=(1, 2, 3)))  # (b,)
            codes.append(chunk_codes.cpu())
    mse = torch.cat(errors).clamp_min(1e-10)  # (N,)
    used = torch.unique(torch.cat(codes)).numel()
    return {
        "split": "validation",
        "num_images": count,
        "psnr_db": float((10 * torch.log10(1.0 / mse)).mean()),
        "codebook_usage": used / image_tokenizer.codebook_size,
        "codes_used": used,
        "codebook_size": image_tokenizer.codebook_size,
    }


def main(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    pipeline = TextToImagePipeline.from_pretrained(args.pipeline).to(args.device)
    report: dict = {"pipeline": str(args.pipeline), "seed": args.seed}
    if args.tokenizer_images > 0:
        report["tokenizer"] = tokenizer_metrics(
            pipeline.image_tokenizer,
            args.tokenizer_images,
            pipeline.config.resolution,
            args.seed,
            args.batch_size,
            pipeline.device,
        )
    config = pipeline.config
    setting = {key: getattr(config, key) for key in KNOBS}
    if args.num_candidates is not None:
        setting["num_candidates"] = args.num_candidates
    if args.weights and setting["num_candidates"] == 1:
        raise ValueError(
            "--sweep-likelihood-weight weighs candidates, but this evaluation draws one sample "
            "per image; pass --num-candidates > 1 (with a pipeline that has a scorer)"
        )
    if args.sweep or args.weights:
        report["sweep"] = run_sweep(pipeline, args, setting)
        setting = {**setting, **report["sweep"]["chosen"]}
        if not args.no_save_default:
            update_pipeline_config(args.pipeline, **report["sweep"]["chosen"])
            print(f"stored {report['sweep']['chosen']} as the defaults of {args.pipeline}")
    for key in ("guidance_scale", "temperature", "top_k"):  # explicit flags win; --top-k 0: none
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key) or None if key == "top_k" else getattr(args, key)
    report["sampling"] = {**vars(config), **setting}
    report["test"], report["reconstruction"] = run_tests(pipeline, args, setting)
    if args.reference_dir is not None:
        report["reference"] = reference_metrics(pipeline, args, setting=setting)
    report["seconds"] = round(time.perf_counter() - start, 2)
    text = json.dumps(report, indent=2)
    if args.out is None:
        print(text)
        return report
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print_summary(report)
    print(f"wrote {args.out}")
    return report


def print_summary(report: dict) -> None:
    """One line per test group: all-correct and per-attribute accuracies."""
    if "tokenizer" in report:
        tokenizer = report["tokenizer"]
        print(
            f"  tokenizer: PSNR {tokenizer['psnr_db']:.2f} dB, usage {tokenizer['codebook_usage']:.3f}"
        )
    for group, row in report.get("reconstruction", {}).items():
        print(
            f"  test {group:8s} tokenizer reconstructions: all correct {row['all_correct']:.3f}"
            f"{by_size_suffix(row)}"
        )
    for label, groups in report["test"].items():
        if label == "split":
            continue
        for group, row in groups.items():
            attributes = ", ".join(
                f"{key} {row[key]:.2f}"
                for key in ("color", "shape", "size", "position", "background", "clean")
            )
            print(
                f"  test {group:8s} guidance {row['guidance_scale']:g}: all correct "
                f"{row['all_correct']:.3f} ({attributes}){by_size_suffix(row)}"
                f"{rerank_suffix(row)}"
            )


def rerank_suffix(row: dict) -> str:
    """'; best of 16: first candidate 0.455, any candidate 0.820', or '' without reranking."""
    if "first_candidate" not in row:
        return ""
    return (
        f"; best of {row['num_candidates']}: first candidate "
        f"{row['first_candidate']['all_correct']:.3f}, any candidate {row['any_candidate']:.3f}"
    )


def by_size_suffix(row: dict) -> str:
    """'; small 0.20 (shape 0.31), large 0.50 (shape 0.62)', or '' without size groups."""
    text = describe_by_size(row)
    return f"; {text}" if text else ""


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
