"""Stage 2: the text tokenizer and the GPT prior over `[text][BOI][image codes]`.

`prior` never imports `tokenizer`; the two stages meet only in `pipelines`.
"""

from prior.cache import KVCache
from prior.likelihood import code_log_likelihood
from prior.model import PRESETS, Prior, PriorConfig, PriorOutput
from prior.sampling import drop_captions, generate, mix_guidance, top_k_filter, top_p_filter
from prior.text_tokenizer import TextTokenizer

__all__ = [
    "PRESETS",
    "KVCache",
    "Prior",
    "PriorConfig",
    "PriorOutput",
    "TextTokenizer",
    "code_log_likelihood",
    "drop_captions",
    "generate",
    "mix_guidance",
    "top_k_filter",
    "top_p_filter",
]
