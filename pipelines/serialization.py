"""On-disk layout of a pipeline folder, in the style of diffusers:

```
pipeline/
  model_index.json       {"_class_name": "TextToImagePipeline", "image_tokenizer": ["tokenizer", "VQGAN"], ...}
  pipeline_config.json   resolution and the sampling defaults (guidance_scale, temperature, top_k,
                         top_p, max_batch_size, num_candidates, likelihood_weight)
  image_tokenizer/       the component's own save_pretrained folder
  prior/
  text_tokenizer/
  scorer/                optional: the candidate reranker (`[null, null]` in model_index.json
                         when absent, diffusers' convention for a missing optional component)
```

Component classes are resolved through an explicit allowlist (never an import string), so a
`model_index.json` cannot make the loader import or run anything else.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codegrid.io import check_field_names, config_from_dict, fsync_path
from pipelines.scorer import ImageTextScorer
from prior import Prior, TextTokenizer
from tokenizer import VQGAN

MODEL_INDEX_NAME = "model_index.json"
PIPELINE_CONFIG_NAME = "pipeline_config.json"
PIPELINE_CLASS_NAME = "TextToImagePipeline"
COMPONENT_NAMES = ("image_tokenizer", "prior", "text_tokenizer")
OPTIONAL_COMPONENT_NAMES = ("scorer",)
ABSENT_ENTRY = [None, None]

# (library, class name) -> class, per component. Only these can be loaded from a folder.
LOADABLE_CLASSES: dict[str, dict[tuple[str, str], type]] = {
    "image_tokenizer": {("tokenizer", "VQGAN"): VQGAN},
    "prior": {("prior", "Prior"): Prior},
    "text_tokenizer": {("prior", "TextTokenizer"): TextTokenizer},
    "scorer": {("pipelines", "ImageTextScorer"): ImageTextScorer},
}


@dataclass
class PipelineConfig:
    """Sampling defaults stored with a pipeline; `__call__` arguments left as None take these.

    Attributes:
        resolution: side of the square images (pixels) that the image tokenizer decodes to.
        guidance_scale: classifier-free guidance; 1.0 disables it, > 1 strengthens the prompt.
        temperature: > 0; divides the logits before sampling.
        top_k: keep the k most likely codes (None: all).
        top_p: nucleus sampling mass in (0, 1] (None: off).
        max_batch_size: the most images sampled in one forward batch (CFG doubles the rows).
        num_candidates: codes sampled per returned image; above 1 the pipeline keeps the one
            with the best rerank score (needs a scorer, or likelihood_weight > 0).
        likelihood_weight: >= 0; the rerank score is the scorer's image-caption cosine plus
            this weight times the prior's log p(codes | caption) in nats.
    """

    resolution: int
    guidance_scale: float = 1.5
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_batch_size: int = 64
    num_candidates: int = 1
    likelihood_weight: float = 0.0


def _check_number(name: str, value: Any, low: float, low_inclusive: bool, kind: type) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not isinstance(value, int):
        is_number = False
    bound_ok = (
        is_number and math.isfinite(value) and (value >= low if low_inclusive else value > low)
    )
    if not bound_ok:
        relation = ">=" if low_inclusive else ">"
        raise ValueError(
            f"{name}={value!r} is invalid; it must be a finite {kind.__name__} {relation} {low}"
        )


def validate_sampling_values(
    guidance_scale: Any = None,
    temperature: Any = None,
    top_k: Any = None,
    top_p: Any = None,
    max_batch_size: Any = None,
    codebook_size: int | None = None,
    num_candidates: Any = None,
    likelihood_weight: Any = None,
) -> None:
    """Raise ValueError naming the argument if a given (non-None) sampling value is out of range."""
    if guidance_scale is not None:
        _check_number("guidance_scale", guidance_scale, 0.0, True, float)
    if temperature is not None:
        _check_number("temperature", temperature, 0.0, False, float)
    if top_k is not None:
        _check_number("top_k", top_k, 1, True, int)
        if codebook_size is not None and top_k > codebook_size:
            raise ValueError(
                f"top_k={top_k} exceeds the codebook size {codebook_size}; use 1..{codebook_size} "
                "or None for no top-k filtering"
            )
    if top_p is not None:
        _check_number("top_p", top_p, 0.0, False, float)
        if top_p > 1.0:
            raise ValueError(f"top_p={top_p!r} must lie in (0, 1]; use None to disable it")
    if max_batch_size is not None:
        _check_number("max_batch_size", max_batch_size, 1, True, int)
    if num_candidates is not None:
        _check_number("num_candidates", num_candidates, 1, True, int)
    if likelihood_weight is not None:
        _check_number("likelihood_weight", likelihood_weight, 0.0, True, float)


def validated_config(config: PipelineConfig) -> PipelineConfig:
    """Check every field of a PipelineConfig; return it unchanged."""
    _check_number("resolution", config.resolution, 1, True, int)
    validate_sampling_values(
        config.guidance_scale,
        config.temperature,
        config.top_k,
        config.top_p,
        config.max_batch_size,
        num_candidates=config.num_candidates,
        likelihood_weight=config.likelihood_weight,
    )
    return config


def component_entry(name: str, component: Any) -> list[str]:
    """The `[library, class]` pair for a component, or a ValueError saying why it can't be saved."""
    if not callable(getattr(component, "save_pretrained", None)):
        raise ValueError(
            f"{name} of type {type(component).__name__} is not serialisable: it has no "
            "save_pretrained (adapters wrap external models). Convert it to our format with "
            "scripts/convert_tokenizer.py, or save the pipeline with a serialisable component and "
            f"pass this one at load time: TextToImagePipeline.from_pretrained(dir, {name}=...)"
        )
    for (library, class_name), cls in LOADABLE_CLASSES[name].items():
        if type(component) is cls:
            return [library, class_name]
    allowed = [f"{lib}.{cls}" for lib, cls in LOADABLE_CLASSES[name]]
    raise ValueError(
        f"{name} of type {type(component).__qualname__} cannot be saved in a pipeline folder; "
        f"the loadable classes for {name} are {allowed}"
    )


def resolve_component_class(name: str, entry: Any, source: Path) -> type:
    """Map a `model_index.json` entry to a class through the allowlist."""
    allowed = LOADABLE_CLASSES[name]
    key = tuple(entry) if isinstance(entry, list) and len(entry) == 2 else None
    if key not in allowed:
        raise ValueError(
            f"{source}: component {name!r} has entry {entry!r}; allowed entries are "
            f"{[list(pair) for pair in allowed]}"
        )
    return allowed[key]


def model_index(entries: dict[str, list[str]]) -> dict[str, Any]:
    """The JSON payload of `model_index.json`."""
    try:
        version = importlib.metadata.version("codegrid")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree without install
        version = "unknown"
    return {"_class_name": PIPELINE_CLASS_NAME, "_codegrid_version": version, **entries}


def read_model_index(directory: Path) -> dict[str, Any]:
    """Load and check `model_index.json`; FileNotFoundError / ValueError name the file."""
    path = directory / MODEL_INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a pipeline folder (a complete folder has "
            f"{MODEL_INDEX_NAME}; write one with save_pretrained or scripts/make_pipeline.py)"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS_NAME:
        raise ValueError(f"{path}: _class_name must be {PIPELINE_CLASS_NAME!r}")
    missing = [name for name in COMPONENT_NAMES if name not in index]
    if missing:
        raise ValueError(f"{path}: missing component entries {missing}")
    for name in OPTIONAL_COMPONENT_NAMES:  # folders written before the component existed
        index.setdefault(name, ABSENT_ENTRY)
    return index


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to `path` (inside a folder being written atomically)."""
    path.write_text(json.dumps(payload, indent=2) + "\n")


def read_pipeline_config(directory: Path) -> PipelineConfig:
    """Load `pipeline_config.json` with unknown fields rejected and every value checked."""
    path = directory / PIPELINE_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the pipeline folder is incomplete")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    return validated_config(config_from_dict(PipelineConfig, values, source=str(path)))


def update_pipeline_config(directory: str | os.PathLike, **changes: Any) -> PipelineConfig:
    """Change saved sampling defaults in place, atomically (temporary file, fsync, rename).

    Example: `update_pipeline_config("outputs/demo/pipeline", guidance_scale=2.0)`. A name that
    is not a `PipelineConfig` field raises ValueError and nothing is written.
    """
    check_field_names(PipelineConfig, changes, "update_pipeline_config")
    folder = Path(directory)
    config = validated_config(dataclasses.replace(read_pipeline_config(folder), **changes))
    path = folder / PIPELINE_CONFIG_NAME
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write_json(tmp, dataclasses.asdict(config))
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(folder)
    return config
