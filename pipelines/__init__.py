"""Pipelines: the text-to-image pipeline and its output type (`pipelines.data` holds the datasets).

The re-exports resolve on first access (PEP 562), so that `import pipelines.data.shapes` does not
import the model packages (`prior`, `tokenizer`) it doesn't need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.output import ImagePipelineOutput
    from pipelines.serialization import PipelineConfig
    from pipelines.text_to_image import TextToImagePipeline

_EXPORTS = {
    "ImagePipelineOutput": "pipelines.output",
    "PipelineConfig": "pipelines.serialization",
    "TextToImagePipeline": "pipelines.text_to_image",
}

__all__ = ["ImagePipelineOutput", "PipelineConfig", "TextToImagePipeline"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
