"""Sample images from a pipeline folder: one PNG per image plus a grid.

    python scripts/sample.py --pipeline outputs/demo/pipeline "a red circle" "a blue square" \
        --num-images-per-prompt 4 --seed 0 --out samples/

Prompts come from the positional arguments and/or `--prompts-file` (one per line; blank lines
skipped). Image `i` of prompt `p` is written to `OUT/p{p:03d}_{i:02d}.png`; `OUT/grid.png` has
one row per prompt, and `OUT/prompts.json` maps files to prompts. Each prompt gets its own
generator seeded `seed + p`, so an image depends only on the seed and its prompt's position.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from pipelines import TextToImagePipeline
from pipelines.output import make_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", help="captions to sample")
    parser.add_argument("--pipeline", type=Path, required=True, help="pipeline folder")
    parser.add_argument("--prompts-file", type=Path, default=None, help="one prompt per line")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--num-images-per-prompt", type=int, default=1, help="images per prompt")
    parser.add_argument(
        "--seed", type=int, default=0, help="prompt i uses a generator seeded seed + i"
    )
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: saved")
    parser.add_argument("--temperature", type=float, default=None, help="default: saved")
    parser.add_argument("--top-k", type=int, default=None, help="default: saved")
    parser.add_argument("--top-p", type=float, default=None, help="default: saved")
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: saved")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Positional prompts followed by those of --prompts-file; ValueError if there are none."""
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {args.prompts_file} does not exist")
        lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass captions as arguments or use --prompts-file FILE")
    return prompts


def write_images(images: list, prompts: list[str], per_prompt: int, out: Path) -> list[dict]:
    """Save each image as p{prompt}_{index}.png and return the file -> prompt records."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for row, image in enumerate(images):
        prompt_index, image_index = divmod(row, per_prompt)
        name = f"p{prompt_index:03d}_{image_index:02d}.png"
        image.save(out / name)
        records.append(
            {"file": name, "prompt_index": prompt_index, "prompt": prompts[prompt_index]}
        )
    return records


def main(args: argparse.Namespace) -> Path:
    prompts = read_prompts(args)
    pipeline = TextToImagePipeline.from_pretrained(args.pipeline).to(args.device)
    generators = [
        torch.Generator(pipeline.device).manual_seed(args.seed + index)
        for index in range(len(prompts))
    ]
    output = pipeline(
        prompts,
        num_images_per_prompt=args.num_images_per_prompt,
        guidance_scale=args.guidance_scale,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_batch_size=args.max_batch_size,
        generator=generators,
        show_progress=not args.no_progress,
    )
    records = write_images(output.images, prompts, args.num_images_per_prompt, args.out)
    columns = args.num_images_per_prompt
    if columns == 1:  # one image per prompt: a near-square grid in prompt order
        columns = math.ceil(math.sqrt(len(prompts)))
    make_grid(output.images, columns=columns).save(args.out / "grid.png")
    (args.out / "prompts.json").write_text(json.dumps(records, indent=2) + "\n")
    for index, prompt in enumerate(prompts):
        print(f"[{index}] {prompt}")
    print(f"wrote {len(records)} images and grid.png to {args.out}")
    return args.out


if __name__ == "__main__":
    main(parse_args())
