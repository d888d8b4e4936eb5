"""Pipelines: the text-to-image pipeline, its output type and the candidate scorer (`pipelines.data` holds the datasets).

The re-exports resolve on first access (PEP 562), so that `import pipelines.data.shapes` does not
import the model packages (`prior`, `tokenizer`) it doesn't need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.candidates import CandidateSet
    from pipelines.output import ImagePipelineOutput
    from pipelines.scorer import ImageTextScorer, ScorerConfig
    from pipelines.serialization import PipelineConfig
    from pipelines.text_to_image import TextToImagePipeline

_EXPORTS = {
    "CandidateSet": "pipelines.candidates",
    "ImageTextScorer": "pipelines.scorer",
    "ImagePipelineOutput": "pipelines.output",
    "PipelineConfig": "pipelines.serialization",
    "ScorerConfig": "pipelines.scorer",
    "TextToImagePipeline": "pipelines.text_to_image",
}

__all__ = [
    "CandidateSet",
    "ImagePipelineOutput",
    "ImageTextScorer",
    "PipelineConfig",
    "ScorerConfig",
    "TextToImagePipeline",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
