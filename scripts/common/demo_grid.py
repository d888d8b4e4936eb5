"""The demo's last stage: a grid of fixed prompts sampled with the tuned defaults, each cell
judged (scripts/demo.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# "size colour shape position background": 12 seen colour-shape pairs, then 4 pairs held out of
# training (pipelines.data.shapes.HELD_OUT).
GRID_PROMPTS = """large red circle center black; small blue square top_left gray;
large green triangle bottom_right white; small yellow diamond top_right black;
large cyan cross bottom_left gray; large pink ring center white;
small orange circle bottom_right black; large purple square top_right gray;
small green cross center white; large blue diamond top_left black;
small red triangle bottom_left white; large yellow ring top_right gray;
large red ring center black; large green circle top_left gray;
small blue triangle bottom_right white; large yellow square center black"""
GRID_IMAGES_PER_PROMPT = 2
GRID_PROMPTS_PER_ROW = 4
GRID_SCALE = 3  # nearest-neighbour upscaling, so 32-pixel samples are visible in the README


def grid_records() -> list[dict]:
    """GRID_PROMPTS as Shapes records, captioned with the first template of the training data."""
    records = []
    for entry in GRID_PROMPTS.split(";"):
        size, color, shape, position, background = entry.split()
        position = position.replace("_", " ")
        caption = f"a {size} {color} {shape} in the {position} on a {background} background"
        names = ("size", "color", "shape", "position", "background", "caption")
        records.append(dict(zip(names, (size, color, shape, position, background, caption))))
    return records


def stage_grid(args: argparse.Namespace, out: Path, threads: int) -> Path:
    """Sample the grid with the tuned defaults; print each prompt with its images.

    Runs in process: the grid is the demo's own output, not a job a user would type."""
    import torch
    from PIL import Image

    from pipelines import TextToImagePipeline
    from pipelines.data.judge import judge_image
    from pipelines.data.shapes import is_held_out
    from pipelines.output import make_grid

    torch.set_num_threads(threads)
    pipeline = TextToImagePipeline.from_pretrained(out / "pipeline").to(args.device)
    records = grid_records()
    output = pipeline(
        [record["caption"] for record in records],
        num_images_per_prompt=GRID_IMAGES_PER_PROMPT,
        generator=torch.Generator(pipeline.device).manual_seed(args.seed),
    )
    columns = GRID_IMAGES_PER_PROMPT * GRID_PROMPTS_PER_ROW
    print(
        f"  grid: {len(records)} prompts x {GRID_IMAGES_PER_PROMPT} images, {columns} columns, "
        f"guidance_scale={pipeline.config.guidance_scale:g}"
    )
    listing = []
    for index, record in enumerate(records):
        first = index * GRID_IMAGES_PER_PROMPT
        images = output.images[first : first + GRID_IMAGES_PER_PROMPT]
        verdicts = ["ok" if judge_image(image, record)["all_correct"] else "x" for image in images]
        row, column = divmod(first, columns)
        tag = " (held-out pair)" if is_held_out(record) else ""
        print(
            f"  [{index:2d}] images {first}-{first + len(images) - 1} (row {row}, columns "
            f"{column}-{column + len(images) - 1}) judge {'/'.join(verdicts)}: "
            f"{record['caption']}{tag}"
        )
        indices = list(range(first, first + len(images)))
        listing.append({**record, "images": indices, "held_out": bool(tag), "judge": verdicts})
    side = pipeline.config.resolution * GRID_SCALE
    large = [image.resize((side, side), Image.Resampling.NEAREST) for image in output.images]
    make_grid(large, columns=columns).save(out / "grid.png")
    (out / "grid_prompts.json").write_text(json.dumps(listing, indent=2) + "\n")
    return out / "grid.png"
