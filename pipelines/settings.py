"""What a pipeline checks before it samples: that its components fit together, and the call's
sampling arguments (resolved over the saved defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.serialization import PipelineConfig, validate_sampling_values


@dataclass(frozen=True)
class SamplingSettings:
    """The resolved sampling arguments of one call (call arguments over saved defaults)."""

    guidance_scale: float
    temperature: float
    top_k: int | None
    top_p: float | None
    max_batch_size: int
    num_candidates: int = 1
    likelihood_weight: float = 0.0


def resolve_settings(
    defaults: PipelineConfig,
    codebook_size: int,
    num_images_per_prompt: Any,
    guidance_scale: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    max_batch_size: Any,
    num_candidates: Any = None,
    likelihood_weight: Any = None,
) -> SamplingSettings:
    """Validate a call's arguments (ValueError naming the argument) and fill in the defaults."""
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be an int >= 1")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be >= 1")
    validate_sampling_values(
        guidance_scale,
        temperature,
        top_k,
        top_p,
        max_batch_size,
        codebook_size,
        num_candidates=num_candidates,
        likelihood_weight=likelihood_weight,
    )

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return SamplingSettings(
        guidance_scale=float(pick(guidance_scale, defaults.guidance_scale)),
        temperature=float(pick(temperature, defaults.temperature)),
        top_k=pick(top_k, defaults.top_k),
        top_p=pick(top_p, defaults.top_p),
        max_batch_size=int(pick(max_batch_size, defaults.max_batch_size)),
        num_candidates=int(pick(num_candidates, defaults.num_candidates)),
        likelihood_weight=float(pick(likelihood_weight, defaults.likelihood_weight)),
    )


def check_choice(num_candidates: int, likelihood_weight: float, scorer: Any) -> None:
    """Several candidates need a way to choose among them: a scorer or a likelihood weight."""
    if num_candidates > 1 and likelihood_weight == 0 and scorer is None:
        raise ValueError(
            f"num_candidates={num_candidates} with likelihood_weight=0 needs a scorer to choose "
            "among candidates, and this pipeline has no scorer; pass likelihood_weight > 0 (rank "
            "by the prior's likelihood alone), a scorer (scripts/train_scorer.py, "
            "scripts/make_pipeline.py --scorer) or num_candidates=1"
        )


def check_components(
    image_tokenizer: Any, prior: Any, text_tokenizer: Any, scorer: Any, resolution: int
) -> None:
    """Fail early, naming both sides, when the components don't fit together."""
    prior_config = prior.config
    if int(prior_config.codebook_size) != int(image_tokenizer.codebook_size):
        raise ValueError(
            f"codebook mismatch: prior.config.codebook_size={prior_config.codebook_size} but "
            f"image_tokenizer.codebook_size={image_tokenizer.codebook_size}; train the "
            "prior on codes extracted with this image tokenizer"
        )
    grid = tuple(int(side) for side in image_tokenizer.latent_shape(resolution, resolution))
    if grid != tuple(int(side) for side in prior_config.image_grid):
        raise ValueError(
            f"grid mismatch: prior.config.image_grid={tuple(prior_config.image_grid)} but the "
            f"image tokenizer gives {grid} codes at resolution {resolution}; set "
            "config.resolution or use a prior trained on this tokenizer's codes"
        )
    check_prior_text(prior_config, text_tokenizer)
    if scorer is not None:
        check_scorer(scorer, text_tokenizer)


def check_prior_text(prior_config: Any, text_tokenizer: Any) -> None:
    """The prior must read the text tokenizer's ids: same length, vocabulary large enough, and
    the same pad id when the prior has a text loss; a field the prior's config lacks (an
    adapter) is not checked."""
    text_length = getattr(prior_config, "text_length", None)
    if text_length is not None and int(text_tokenizer.text_length) != int(text_length):
        raise ValueError(
            f"text length mismatch: text_tokenizer.text_length={text_tokenizer.text_length} "
            f"but prior.config.text_length={text_length}; use the prior's own text tokenizer"
        )
    # The pad id only marks the text loss's ignored targets: without a text loss it is unused.
    pad_id = getattr(prior_config, "text_pad_id", None)
    text_loss = getattr(prior_config, "text_loss_weight", 0) > 0
    if text_loss and pad_id is not None and int(text_tokenizer.pad_id) != int(pad_id):
        raise ValueError(
            f"text pad id mismatch: text_tokenizer.pad_id={text_tokenizer.pad_id} but "
            f"prior.config.text_pad_id={pad_id}; the prior was trained with another text "
            "tokenizer: use the prior's own text tokenizer"
        )
    vocab = getattr(prior_config, "text_vocab_size", None)
    if vocab is not None and int(text_tokenizer.vocab_size) > int(vocab):
        raise ValueError(
            f"text vocabulary mismatch: text_tokenizer.vocab_size={text_tokenizer.vocab_size}"
            f" exceeds prior.config.text_vocab_size={vocab}; use the prior's own text tokenizer"
        )


def check_scorer(scorer: Any, text_tokenizer: Any) -> None:
    """The scorer must read the pipeline's text ids: same pad id, vocabulary large enough."""
    config = getattr(scorer, "config", None)
    if not hasattr(config, "text_vocab_size") or not callable(getattr(scorer, "similarity", None)):
        raise ValueError(
            f"scorer of type {type(scorer).__name__} is not an image-caption scorer; pass a "
            "pipelines.ImageTextScorer (scripts/train_scorer.py) or None"
        )
    if int(text_tokenizer.vocab_size) > int(config.text_vocab_size) or int(
        text_tokenizer.pad_id
    ) != int(config.text_pad_id):
        raise ValueError(
            f"scorer mismatch: scorer.config has text_vocab_size={config.text_vocab_size}, "
            f"text_pad_id={config.text_pad_id} but the text tokenizer has vocab_size="
            f"{text_tokenizer.vocab_size}, pad_id={text_tokenizer.pad_id}; train the scorer "
            "with this pipeline's text tokenizer (scripts/train_scorer.py --text-tokenizer)"
        )
