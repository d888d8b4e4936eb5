"""Sample images from a pipeline folder: one PNG per image plus a grid.

    python scripts/sample.py --pipeline outputs/demo/pipeline "a red circle" "a blue square" \
        --num-images-per-prompt 4 --seed 0 --out samples/

Prompts come from the positional arguments and/or `--prompts-file` (one per line; blank lines
skipped). Image `i` of prompt `p` is written to `OUT/p{p:03d}_{i:02d}.png`; `OUT/grid.png` has
one row per prompt (with one image per prompt, a near-square grid in prompt order), and `OUT/prompts.json` maps files to prompts. Each prompt gets its own
generator seeded `seed + p`, so an image depends only on the seed and its prompt's position.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from common.help import HelpFormatter

from pipelines import TextToImagePipeline
from pipelines.output import make_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add = parser.add_argument
    saved = "(default: the pipeline's pipeline_config.json)"
    add("prompts", nargs="*", help="captions to sample")
    add("--pipeline", type=Path, required=True, help="pipeline folder (make_pipeline.py)")
    add("--prompts-file", type=Path, default=None, help="one prompt per line, after the others")
    add("--out", type=Path, required=True, help="output folder")
    add("--num-images-per-prompt", type=int, default=1, help="images per prompt")
    add("--seed", type=int, default=0, help="prompt i uses a generator seeded seed + i")
    add("--guidance-scale", type=float, default=None, help=f"CFG scale, 1 = off {saved}")
    add("--temperature", type=float, default=None, help=f"softmax temperature {saved}")
    add("--top-k", type=int, default=None, help=f"keep the k most likely codes {saved}")
    add("--top-p", type=float, default=None, help=f"nucleus mass in (0, 1] {saved}")
    add("--max-batch-size", type=int, default=None, help=f"rows per prior call {saved}")
    add("--num-candidates", type=int, default=None, help="codes sampled per image, the best "
        f"kept by the pipeline's scorer and likelihood (1: no reranking) {saved}")  # fmt: skip
    add("--likelihood-weight", type=float, default=None, help="weight of the prior's "
        f"log-likelihood in the rerank score {saved}")  # fmt: skip
    add("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add("--no-progress", action="store_true", help="hide the progress bar")
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
        num_candidates=args.num_candidates,
        likelihood_weight=args.likelihood_weight,
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
