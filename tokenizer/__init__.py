"""Stage 1: the VQGAN image tokenizer (model code only; training losses live in
`tokenizer.losses`, which the model never imports)."""

from tokenizer.protocol import ImageTokenizer
from tokenizer.quantize import FSQ, QuantizerOutput, VectorQuantizer
from tokenizer.vqgan import PRESETS, VQGAN, VQGANConfig, VQGANOutput, build_quantizer

__all__ = [
    "FSQ",
    "PRESETS",
    "VQGAN",
    "ImageTokenizer",
    "QuantizerOutput",
    "VQGANConfig",
    "VQGANOutput",
    "VectorQuantizer",
    "build_quantizer",
]
