"""TextToImagePipeline: prompts -> text ids -> prior samples image codes -> image tokenizer decodes.

```python
from pipelines import TextToImagePipeline
pipe = TextToImagePipeline.from_pretrained("outputs/demo/pipeline")
images = pipe("a red circle", num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images
```
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from codegrid.io import atomic_directory
from pipelines.output import OUTPUT_TYPES, ImagePipelineOutput, postprocess
from pipelines.serialization import (
    COMPONENT_NAMES,
    MODEL_INDEX_NAME,
    PIPELINE_CONFIG_NAME,
    PipelineConfig,
    component_entry,
    model_index,
    read_model_index,
    read_pipeline_config,
    resolve_component_class,
    validate_sampling_values,
    validated_config,
    write_json,
)
from prior import generate

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SamplingSettings:
    """The resolved sampling arguments of one call (call arguments over saved defaults)."""

    guidance_scale: float
    temperature: float
    top_k: int | None
    top_p: float | None
    max_batch_size: int


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
        config: sampling defaults (`PipelineConfig` or dict); None derives the resolution from
            the image tokenizer and uses the default sampling values.
    """

    def __init__(
        self,
        image_tokenizer: Any,
        prior: Any,
        text_tokenizer: Any,
        config: PipelineConfig | dict | None = None,
    ) -> None:
        self.image_tokenizer = image_tokenizer
        self.prior = prior
        self.text_tokenizer = text_tokenizer
        if isinstance(config, dict):
            config = PipelineConfig(**config)
        if config is None:
            config = PipelineConfig(resolution=self._default_resolution())
        self.config = validated_config(config)
        self._text_lock = threading.Lock()
        self._check_components()
        for component in (image_tokenizer, prior):
            if isinstance(component, torch.nn.Module):
                component.eval()  # sampling never trains: dropout off, quantizer statistics frozen

    # ---------------------------------------------------------------- construction checks
    def _default_resolution(self) -> int:
        """The image tokenizer's training resolution, or the prior's grid times the downsampling."""
        resolution = getattr(getattr(self.image_tokenizer, "config", None), "resolution", None)
        if isinstance(resolution, int):
            return resolution
        return int(self.prior.config.image_grid[0]) * int(self.image_tokenizer.downsample_factor)

    def _check_components(self) -> None:
        """Fail early, naming both sides, when the three components don't fit together."""
        prior_config, resolution = self.prior.config, self.config.resolution
        if int(prior_config.codebook_size) != int(self.image_tokenizer.codebook_size):
            raise ValueError(
                f"codebook mismatch: prior.config.codebook_size={prior_config.codebook_size} but "
                f"image_tokenizer.codebook_size={self.image_tokenizer.codebook_size}; train the "
                "prior on codes extracted with this image tokenizer"
            )
        grid = tuple(
            int(side) for side in self.image_tokenizer.latent_shape(resolution, resolution)
        )
        if grid != tuple(int(side) for side in prior_config.image_grid):
            raise ValueError(
                f"grid mismatch: prior.config.image_grid={tuple(prior_config.image_grid)} but the "
                f"image tokenizer gives {grid} codes at resolution {resolution}; set "
                "config.resolution or use a prior trained on this tokenizer's codes"
            )
        text_length = getattr(prior_config, "text_length", None)
        if text_length is not None and int(self.text_tokenizer.text_length) != int(text_length):
            raise ValueError(
                f"text length mismatch: text_tokenizer.text_length={self.text_tokenizer.text_length} "
                f"but prior.config.text_length={text_length}; use the prior's own text tokenizer"
            )
        vocab = getattr(prior_config, "text_vocab_size", None)
        if vocab is not None and int(self.text_tokenizer.vocab_size) > int(vocab):
            raise ValueError(
                f"text vocabulary mismatch: text_tokenizer.vocab_size={self.text_tokenizer.vocab_size}"
                f" exceeds prior.config.text_vocab_size={vocab}; use the prior's own text tokenizer"
            )

    # ---------------------------------------------------------------- serialisation
    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        image_tokenizer: Any = None,
        prior: Any = None,
        text_tokenizer: Any = None,
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
        }
        components = {}
        for name in COMPONENT_NAMES:
            if overrides[name] is not None:
                components[name] = overrides[name]
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
        entries = {name: component_entry(name, getattr(self, name)) for name in COMPONENT_NAMES}
        with atomic_directory(directory) as tmp:
            for name in COMPONENT_NAMES:
                getattr(self, name).save_pretrained(tmp / name)
            write_json(tmp / PIPELINE_CONFIG_NAME, dataclasses.asdict(self.config))
            # Written last, so even the temporary folder is never a loadable pipeline.
            write_json(tmp / MODEL_INDEX_NAME, model_index(entries))
        return Path(directory)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> TextToImagePipeline:
        """Move the prior and the image tokenizer (if it is a module) to `device` / `dtype`."""
        for component in (self.prior, self.image_tokenizer):
            if callable(getattr(component, "to", None)):
                component.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        """The device of the prior's parameters."""
        return next(self.prior.parameters()).device

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
    ) -> ImagePipelineOutput:
        """Sample `num_images_per_prompt` images for each prompt.

        Args:
            prompt: one caption or a non-empty list of captions.
            num_images_per_prompt: images per prompt (>= 1); rows are prompt-major.
            guidance_scale, temperature, top_k, top_p, max_batch_size: None takes the pipeline's
                saved default (`self.config`). guidance_scale >= 0 (1 disables CFG), top_p in (0, 1].
            generator: None (torch's global RNG), one `torch.Generator` for the whole call, or a
                list with one generator per prompt or per image. With a list, each image depends
                only on its own generator (images are then sampled one at a time, which is
                slower), so results don't depend on `max_batch_size` or on the other prompts.
            output_type: "pil" (list of images), "np" (B, H, W, 3) or "pt" (B, 3, H, W), in [0, 1].
            show_progress: show a tqdm bar over sampled images.

        Returns:
            ImagePipelineOutput with `images` and `codes` (B, h, w), B = len(prompts) * count.
        """
        prompts = _check_prompts(prompt)
        settings = self._resolve_settings(
            num_images_per_prompt, guidance_scale, temperature, top_k, top_p, max_batch_size
        )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type={output_type!r} is not supported; use one of {OUTPUT_TYPES}"
            )
        generators = _per_image_generators(generator, len(prompts), num_images_per_prompt)
        text_ids = self._encode_prompts(prompts, num_images_per_prompt)  # (B, T)
        codes = self._sample_codes(text_ids, settings, generators, show_progress)  # (B, h, w)
        images = self._decode(codes, settings.max_batch_size)  # (B, 3, H, W) in [-1, 1]
        return ImagePipelineOutput(images=postprocess(images, output_type), codes=codes.cpu())

    def _resolve_settings(
        self,
        num_images_per_prompt: Any,
        guidance_scale: Any,
        temperature: Any,
        top_k: Any,
        top_p: Any,
        max_batch_size: Any,
    ) -> SamplingSettings:
        """Validate the call's arguments (ValueError naming the argument) and fill in defaults."""
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be an int >= 1")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be >= 1")
        codebook_size = int(self.prior.config.codebook_size)
        validate_sampling_values(
            guidance_scale, temperature, top_k, top_p, max_batch_size, codebook_size
        )
        defaults = self.config

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SamplingSettings(
            guidance_scale=float(pick(guidance_scale, defaults.guidance_scale)),
            temperature=float(pick(temperature, defaults.temperature)),
            top_k=pick(top_k, defaults.top_k),
            top_p=pick(top_p, defaults.top_p),
            max_batch_size=int(pick(max_batch_size, defaults.max_batch_size)),
        )

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

        `prior.generate` draws a whole batch from one generator, so with one generator per image
        each image is sampled on its own: slower, but then an image depends on nothing else.
        """
        total = text_ids.shape[0]
        per_image = isinstance(generators, list)
        chunk_size = 1 if per_image else settings.max_batch_size
        chunks = []
        with tqdm(total=total, desc="sampling", unit="img", disable=not show_progress) as bar:
            for start in range(0, total, chunk_size):
                stop = min(start + chunk_size, total)
                generator = generators[start] if per_image else generators
                chunks.append(self._sample_chunk(text_ids[start:stop], settings, generator))
                bar.update(stop - start)
        return torch.cat(chunks)  # (B, h, w)

    def _sample_chunk(
        self,
        text_ids: torch.Tensor,
        settings: SamplingSettings,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """One batched `prior.generate` call: text ids (b, T) -> codes (b, h, w)."""
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

    def _decode(self, codes: torch.Tensor, max_batch_size: int) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, H, W) in [-1, 1], decoded in chunks."""
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


def _per_image_generators(
    generator: Generators, num_prompts: int, num_images_per_prompt: int
) -> torch.Generator | list[torch.Generator] | None:
    """None or one generator pass through; a list becomes one generator per image.

    A list may hold one generator per image (used as is) or one per prompt; in the latter case
    each prompt's generator seeds `num_images_per_prompt` fresh per-image generators, so the
    images of a prompt depend only on that prompt's generator.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if not isinstance(generator, (list, tuple)) or not all(
        isinstance(item, torch.Generator) for item in generator
    ):
        raise ValueError("generator must be None, a torch.Generator or a list of torch.Generator")
    total = num_prompts * num_images_per_prompt
    if len(generator) == total:
        return list(generator)
    if len(generator) != num_prompts:
        raise ValueError(
            f"got a list of {len(generator)} generators; pass one per prompt ({num_prompts}) or "
            f"one per image ({total})"
        )
    per_image = []
    for prompt_generator in generator:
        seeds = torch.randint(
            0,
            2**62,
            (num_images_per_prompt,),
            generator=prompt_generator,
            device=prompt_generator.device,
        )
        for seed in seeds.tolist():
            per_image.append(torch.Generator(prompt_generator.device).manual_seed(seed))
    return per_image
