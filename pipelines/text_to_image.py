"""TextToImagePipeline: prompts -> text ids -> prior samples image codes -> image tokenizer decodes.

```python
import torch
from pipelines import TextToImagePipeline
pipe = TextToImagePipeline.from_pretrained("outputs/demo/pipeline")
images = pipe("a red circle", num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images
best = pipe("a red circle", num_candidates=16).images  # keep the best of 16 (needs a scorer)
```
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from codegrid.io import atomic_directory, config_from_dict
from pipelines.candidates import CandidateSet, Generators, row_generators
from pipelines.output import OUTPUT_TYPES, ImagePipelineOutput, postprocess
from pipelines.serialization import (
    ABSENT_ENTRY,
    COMPONENT_NAMES,
    MODEL_INDEX_NAME,
    OPTIONAL_COMPONENT_NAMES,
    PIPELINE_CONFIG_NAME,
    PipelineConfig,
    component_entry,
    model_index,
    read_model_index,
    read_pipeline_config,
    resolve_component_class,
    validated_config,
    write_json,
)
from pipelines.settings import (
    SamplingSettings,
    check_choice,
    check_components,
    resolve_settings,
)
from prior import code_log_likelihood, generate


class TextToImagePipeline:
    """Text-to-image with an image tokenizer (any `ImageTokenizer`), a `Prior` and a `TextTokenizer`.

    Thread safety: one pipeline may be called from several threads at once. A call keeps all its
    state (text ids, KV cache, generators, images) in local variables, the models are in eval
    mode under `torch.inference_mode`, and text encoding is serialised by a lock (HF fast
    tokenizers are not re-entrant). Each call therefore returns the same images as the same call
    made alone with the same generator. Not thread-safe: `.to()` while other threads sample, and
    `generator=None`, which draws from torch's global RNG shared by all threads.

    Args:
        image_tokenizer: decodes codes (B, h, w) to images (B, 3, H, W) in [-1, 1].
        prior: a `prior.Prior` whose `config.codebook_size` and `config.image_grid` match the
            image tokenizer's `codebook_size` and `latent_shape(resolution, resolution)`.
        text_tokenizer: a `prior.TextTokenizer` with the prior's text length.
        scorer: optional `pipelines.scorer.ImageTextScorer` over the same text tokenizer's
            ids; with `num_candidates` > 1 it reranks the sampled candidates.
        config: sampling defaults (`PipelineConfig` or a dict of its fields; unknown keys raise
            ValueError); None, or a dict without "resolution", derives the resolution from the
            image tokenizer, and fields left out take the default sampling values.
    """

    def __init__(
        self,
        image_tokenizer: Any,
        prior: Any,
        text_tokenizer: Any,
        config: PipelineConfig | dict | None = None,
        scorer: Any = None,
    ) -> None:
        self.image_tokenizer = image_tokenizer
        self.prior = prior
        self.text_tokenizer = text_tokenizer
        self.scorer = scorer
        if isinstance(config, dict):
            # Unknown keys raise ValueError naming them; a missing resolution is derived.
            if "resolution" not in config:
                config = {**config, "resolution": self._default_resolution()}
            config = config_from_dict(PipelineConfig, config, source="config")
        if config is None:
            config = PipelineConfig(resolution=self._default_resolution())
        self.config = validated_config(config)
        self._text_lock = threading.Lock()
        check_choice(self.config.num_candidates, self.config.likelihood_weight, scorer)
        check_components(image_tokenizer, prior, text_tokenizer, scorer, self.config.resolution)
        for component in (image_tokenizer, prior, scorer):
            if isinstance(component, torch.nn.Module):
                component.eval()  # sampling never trains: dropout off, quantizer statistics frozen

    # ---------------------------------------------------------------- construction
    def _default_resolution(self) -> int:
        """The image tokenizer's training resolution, or the prior's grid times the downsampling."""
        resolution = getattr(getattr(self.image_tokenizer, "config", None), "resolution", None)
        if isinstance(resolution, int):
            return resolution
        return int(self.prior.config.image_grid[0]) * int(self.image_tokenizer.downsample_factor)

    # ---------------------------------------------------------------- serialisation
    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        image_tokenizer: Any = None,
        prior: Any = None,
        text_tokenizer: Any = None,
        scorer: Any = None,
    ) -> TextToImagePipeline:
        """Load a folder written by `save_pretrained`; a component passed here replaces the saved one.

        Raises:
            FileNotFoundError: `directory` has no `model_index.json` (not a complete pipeline).
            ValueError: an entry of `model_index.json` is not an allowed class, or the components
                don't fit together (codebook, grid or text length).
        """
        folder = Path(directory)
        index = read_model_index(folder)
        overrides = {
            "image_tokenizer": image_tokenizer,
            "prior": prior,
            "text_tokenizer": text_tokenizer,
            "scorer": scorer,
        }
        components = {}
        for name in COMPONENT_NAMES + OPTIONAL_COMPONENT_NAMES:
            if overrides[name] is not None:
                components[name] = overrides[name]
                continue
            if name in OPTIONAL_COMPONENT_NAMES and index[name] == ABSENT_ENTRY:
                continue
            component_class = resolve_component_class(name, index[name], folder / MODEL_INDEX_NAME)
            components[name] = component_class.from_pretrained(folder / name)
        config = read_pipeline_config(folder)
        return cls(**components, config=config)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the pipeline folder atomically: a crash never leaves a folder that loads.

        Raises:
            ValueError: a component can't be serialised (an adapter without `save_pretrained`, or
                a class outside the loadable allowlist). Nothing is written in that case.
        """
        present = [name for name in OPTIONAL_COMPONENT_NAMES if getattr(self, name) is not None]
        saved = COMPONENT_NAMES + tuple(present)
        entries = {name: component_entry(name, getattr(self, name)) for name in saved}
        absent = {name: ABSENT_ENTRY for name in OPTIONAL_COMPONENT_NAMES if name not in saved}
        with atomic_directory(directory) as tmp:
            for name in saved:
                getattr(self, name).save_pretrained(tmp / name)
            write_json(tmp / PIPELINE_CONFIG_NAME, dataclasses.asdict(self.config))
            # Written last, so even the temporary folder is never a loadable pipeline.
            write_json(tmp / MODEL_INDEX_NAME, model_index({**entries, **absent}))
        return Path(directory)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> TextToImagePipeline:
        """Move the prior, the scorer and the image tokenizer (if it is a module) to `device` /
        `dtype`."""
        for component in (self.prior, self.image_tokenizer, self.scorer):
            if callable(getattr(component, "to", None)):
                component.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        """The device of the prior's parameters."""
        return next(self.prior.parameters()).device

    def _image_tokenizer_device(self) -> torch.device:
        """Where the image tokenizer decodes: its first parameter's device; the prior's for a
        tokenizer without parameters (an adapter that places its inputs itself)."""
        parameters = getattr(self.image_tokenizer, "parameters", None)
        first = next(iter(parameters()), None) if callable(parameters) else None
        return self.device if first is None else first.device

    # ---------------------------------------------------------------- sampling
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: Generators = None,
        output_type: str = "pil",
        show_progress: bool = True,
        max_batch_size: int | None = None,
        num_candidates: int | None = None,
        likelihood_weight: float | None = None,
    ) -> ImagePipelineOutput:
        """Sample `num_images_per_prompt` images for each prompt.

        Args:
            prompt: one caption or a non-empty list of captions.
            num_images_per_prompt: images per prompt (>= 1); rows are prompt-major.
            guidance_scale, temperature, top_k, top_p, max_batch_size: None takes the pipeline's
                saved default (`self.config`). guidance_scale >= 0 (1 disables CFG), top_p in (0, 1].
            generator: None (torch's global RNG), one `torch.Generator` for the whole call, or a
                list with one generator per prompt or per image. With a list, each image depends
                only on its own generator (still sampled in batches), so results don't depend
                on `max_batch_size` or on the other prompts, up to float rounding of the batched
                logits. (Before f611790 such lists sampled one image at a time through
                `torch.multinomial`; the same seeds now draw other images.)
            output_type: "pil" (list of images), "np" (B, H, W, 3) or "pt" (B, 3, H, W), in [0, 1].
            show_progress: show a tqdm bar over sampled images.
            num_candidates: codes sampled per returned image (>= 1; None: the saved default).
                Above 1, each image is the candidate with the best `sample_candidates` score,
                and the call costs about num_candidates times as much.
            likelihood_weight: >= 0, the weight of the prior's log-likelihood in that score
                (None: the saved default).

        Returns:
            ImagePipelineOutput with `images` and `codes` (B, h, w), B = len(prompts) * count.
        """
        prompts = _check_prompts(prompt)
        settings = resolve_settings(
            self.config,
            int(self.prior.config.codebook_size),
            num_images_per_prompt,
            guidance_scale,
            temperature,
            top_k,
            top_p,
            max_batch_size,
            num_candidates,
            likelihood_weight,
        )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type={output_type!r} is not supported; use one of {OUTPUT_TYPES}"
            )
        if settings.num_candidates > 1:
            check_choice(settings.num_candidates, settings.likelihood_weight, self.scorer)
            candidates = self._candidates(
                prompts, num_images_per_prompt, settings, generator, show_progress
            )
            codes = candidates.best_codes(settings.likelihood_weight).to(self.device)  # (B, h, w)
        else:
            generators = row_generators(generator, len(prompts), num_images_per_prompt)
            text_ids = self._encode_prompts(prompts, num_images_per_prompt)  # (B, T)
            codes = self._sample_codes(text_ids, settings, generators, show_progress)  # (B, h, w)
        images = self.decode(codes, settings.max_batch_size)  # (B, 3, H, W) in [-1, 1]
        return ImagePipelineOutput(images=postprocess(images, output_type), codes=codes.cpu())

    @torch.inference_mode()
    def sample_candidates(
        self,
        prompt: str | list[str],
        num_candidates: int,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: Generators = None,
        show_progress: bool = True,
        max_batch_size: int | None = None,
    ) -> CandidateSet:
        """Sample `num_candidates` codes per image and score them, without choosing.

        The score parts are the scorer's cosine of each decoded candidate with its caption (None
        without a scorer) and the prior's log p(codes | caption) (`prior.code_log_likelihood`).
        `CandidateSet.best_codes(weight)` then picks what `__call__` with `likelihood_weight=
        weight` returns, so an evaluation can try several weights on one draw. Arguments are
        those of `__call__`; the generator list, if any, is one per prompt or per image.
        """
        prompts = _check_prompts(prompt)
        settings = resolve_settings(
            self.config,
            int(self.prior.config.codebook_size),
            num_images_per_prompt,
            guidance_scale,
            temperature,
            top_k,
            top_p,
            max_batch_size,
            num_candidates,
            None,
        )
        return self._candidates(prompts, num_images_per_prompt, settings, generator, show_progress)

    def _candidates(
        self,
        prompts: list[str],
        num_images_per_prompt: int,
        settings: SamplingSettings,
        generator: Generators,
        show_progress: bool,
    ) -> CandidateSet:
        """Sample and score settings.num_candidates codes for each image (see sample_candidates)."""
        count = settings.num_candidates
        generators = row_generators(generator, len(prompts), num_images_per_prompt, count)
        text_ids = self._encode_prompts(prompts, num_images_per_prompt * count)  # (B * K, T)
        codes = self._sample_codes(text_ids, settings, generators, show_progress)  # (B * K, h, w)
        similarity, log_likelihood = self._score(codes, text_ids, settings.max_batch_size)
        grid = codes.shape[1:]
        return CandidateSet(
            codes=codes.cpu().reshape(-1, count, *grid),  # (B, K, h, w)
            similarity=None if similarity is None else similarity.reshape(-1, count),  # (B, K)
            log_likelihood=log_likelihood.reshape(-1, count),  # (B, K)
        )

    def _score(
        self, codes: torch.Tensor, text_ids: torch.Tensor, max_batch_size: int
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(scorer cosine or None, prior log-likelihood), each (B,) fp32 on the CPU, computed in
        chunks of max_batch_size; decoded images are dropped after scoring (memory)."""
        similarities, likelihoods = [], []
        for chunk, text in zip(codes.split(max_batch_size), text_ids.split(max_batch_size)):
            likelihoods.append(code_log_likelihood(self.prior, text, chunk).float().cpu())
            if self.scorer is not None:
                # The scorer learnt renders in [-1, 1]; decoders may overshoot a little.
                images = self.decode(chunk, max_batch_size).clamp(-1, 1)  # (b, 3, H, W)
                device = next(self.scorer.parameters()).device
                similarity = self.scorer.similarity(images.to(device), text.to(device))  # (b,)
                similarities.append(similarity.float().cpu())
        return (torch.cat(similarities) if similarities else None), torch.cat(likelihoods)

    def _encode_prompts(self, prompts: list[str], num_images_per_prompt: int) -> torch.Tensor:
        """Prompts -> text ids (len(prompts) * num_images_per_prompt, T), prompt-major, on device."""
        with self._text_lock:
            ids = self.text_tokenizer(prompts)  # (P, T)
        ids = ids.repeat_interleave(num_images_per_prompt, dim=0)  # (B, T)
        return ids.to(self.device)

    def _null_ids(self, batch_size: int) -> torch.Tensor:
        """Ids of the empty caption (batch_size, T), the unconditional branch of CFG."""
        with self._text_lock:
            ids = self.text_tokenizer.null_ids(batch_size)  # (B, T)
        return ids.to(self.device)

    def _sample_codes(
        self,
        text_ids: torch.Tensor,
        settings: SamplingSettings,
        generators: torch.Generator | list[torch.Generator] | None,
        show_progress: bool,
    ) -> torch.Tensor:
        """Sample codes for all rows of `text_ids` (B, T) in chunks of max_batch_size -> (B, h, w).

        With one generator per row, each chunk gets its rows' generators: `prior.generate`
        then draws every row from its own generator only, so a row's codes do not depend on
        max_batch_size or on the other rows (up to float rounding of the batched logits).
        """
        total = text_ids.shape[0]
        per_row = isinstance(generators, list)
        chunks = []
        with tqdm(total=total, desc="sampling", unit="img", disable=not show_progress) as bar:
            for start in range(0, total, settings.max_batch_size):
                stop = min(start + settings.max_batch_size, total)
                generator = generators[start:stop] if per_row else generators
                chunks.append(self._sample_chunk(text_ids[start:stop], settings, generator))
                bar.update(stop - start)
        return torch.cat(chunks)  # (B, h, w)

    def _sample_chunk(
        self,
        text_ids: torch.Tensor,
        settings: SamplingSettings,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """One batched `prior.generate` call: text ids (b, T) -> codes (b, h, w); `generator`
        is None, one generator, or a list of b (one per row)."""
        use_guidance = settings.guidance_scale != 1.0
        null_ids = self._null_ids(text_ids.shape[0]) if use_guidance else None  # (b, T)
        return generate(
            self.prior,
            text_ids,
            null_text_ids=null_ids,
            guidance_scale=settings.guidance_scale,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            generator=generator,
        )

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, max_batch_size: int | None = None) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, H, W) in [-1, 1], decoded in chunks of
        max_batch_size (None: the saved default)."""
        max_batch_size = max_batch_size or self.config.max_batch_size
        codes = codes.to(self._image_tokenizer_device())  # (B, h, w)
        pieces = [self.image_tokenizer.decode(chunk) for chunk in codes.split(max_batch_size)]
        return torch.cat(pieces)  # (B, 3, H, W)


def _check_prompts(prompt: Any) -> list[str]:
    """A str or a non-empty list/tuple of str -> list[str]; ValueError otherwise."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise ValueError("prompt is an empty list; pass at least one caption")
    bad = [index for index, item in enumerate(prompt) if not isinstance(item, str)]
    if bad:
        raise ValueError(f"prompt must contain only str; items at positions {bad[:5]} are not")
    return list(prompt)
