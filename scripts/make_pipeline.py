"""Assemble trained components into one pipeline folder.

    python scripts/make_pipeline.py --image-tokenizer runs/tokenizer/final \
        --prior runs/prior/final/prior --text-tokenizer runs/prior/final/text_tokenizer \
        --out runs/pipeline --guidance-scale 1.5 [--scorer runs/scorer/final --num-candidates 16]

The folder loads with `TextToImagePipeline.from_pretrained(out)`. Components are checked against
each other (codebook size, code grid, text length, the scorer's text ids) before anything is
written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from common.help import HelpFormatter

from pipelines import ImageTextScorer, PipelineConfig, TextToImagePipeline
from prior import Prior, TextTokenizer
from tokenizer import VQGAN


# fmt: off
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add = parser.add_argument
    defaults = {field.name: field.default for field in dataclasses.fields(PipelineConfig)}

    def saved(name: str) -> str:
        value = "none" if defaults[name] is None else defaults[name]
        return f"(default: {value}, PipelineConfig's)"

    add("--image-tokenizer", type=Path, required=True, help="VQGAN folder")
    add("--prior", type=Path, required=True, help="Prior folder")
    add("--text-tokenizer", type=Path, required=True,
        help="TextTokenizer folder, local HF tokenizer folder or SentencePiece .model file")
    add("--out", type=Path, required=True, help="pipeline folder to write")
    add("--resolution", type=int, default=None,
        help="side of the decoded images in pixels (default: the tokenizer's)")
    add("--guidance-scale", type=float, default=None,
        help=f"sampling guidance saved as the default, >= 0, 1 = off {saved('guidance_scale')}")
    add("--temperature", type=float, default=None,
        help=f"sampling temperature saved as the default, > 0 {saved('temperature')}")
    add("--top-k", type=int, default=None,
        help=f"default top-k; unset keeps all codes {saved('top_k')}")
    add("--top-p", type=float, default=None,
        help=f"default nucleus mass in (0, 1] {saved('top_p')}")
    add("--max-batch-size", type=int, default=None,
        help=f"images per prior forward; larger requests are chunked {saved('max_batch_size')}")
    add("--scorer", type=Path, default=None,
        help="ImageTextScorer folder (scripts/train_scorer.py's OUTPUT/final) that reranks "
        "candidates; trained on this --text-tokenizer's ids (default: none)")
    add("--num-candidates", type=int, default=None,
        help="default candidates sampled per returned image, 1 = no reranking "
        f"{saved('num_candidates')}")
    add("--likelihood-weight", type=float, default=None,
        help="default weight of the prior's log-likelihood (nats) in the rerank score "
        f"{saved('likelihood_weight')}")
    return parser.parse_args(argv)
# fmt: on


def sampling_config(args: argparse.Namespace, image_tokenizer: VQGAN) -> PipelineConfig:
    """PipelineConfig from the flags; flags left unset keep the dataclass defaults."""
    resolution = args.resolution or image_tokenizer.config.resolution
    overrides = {
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "max_batch_size": args.max_batch_size,
        "num_candidates": args.num_candidates,
        "likelihood_weight": args.likelihood_weight,
    }
    config = PipelineConfig(resolution=resolution)
    given = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(config, **given)


def main(args: argparse.Namespace) -> Path:
    for flag, path in (
        ("--image-tokenizer", args.image_tokenizer),
        ("--prior", args.prior),
        ("--text-tokenizer", args.text_tokenizer),
        ("--scorer", args.scorer),
    ):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{flag} {path} does not exist; pass a saved component folder")
    image_tokenizer = VQGAN.from_pretrained(args.image_tokenizer)
    prior = Prior.from_pretrained(args.prior)
    text_tokenizer = TextTokenizer.from_pretrained(args.text_tokenizer)
    scorer = None if args.scorer is None else ImageTextScorer.from_pretrained(args.scorer)
    config = sampling_config(args, image_tokenizer)
    pipeline = TextToImagePipeline(
        image_tokenizer, prior, text_tokenizer, config=config, scorer=scorer
    )
    out = pipeline.save_pretrained(args.out)
    print(f"wrote pipeline to {out}")
    print(json.dumps(dataclasses.asdict(pipeline.config), indent=2))
    return out


if __name__ == "__main__":
    main(parse_args())
