"""Sampled candidates and their rerank scores; the generators behind each sampled row.

Rows of a call are prompt-major, then image, then candidate: row `(p * N + n) * K + k` is
candidate k of image n of prompt p, for N images per prompt and K candidates per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class CandidateSet:
    """K candidates for each of B output images, with the two parts of their rerank score.

    Attributes:
        codes: (B, K, h, w) CPU long, the sampled codes.
        similarity: (B, K) fp32 CPU, the scorer's cosine of each decoded candidate with its
            caption in [-1, 1]; None without a scorer.
        log_likelihood: (B, K) fp32 CPU, the prior's log p(codes | caption) in nats (<= 0).
    """

    codes: torch.Tensor
    similarity: torch.Tensor | None
    log_likelihood: torch.Tensor

    def scores(self, likelihood_weight: float) -> torch.Tensor:
        """(B, K): similarity + likelihood_weight * log_likelihood (the similarity counts 0
        without a scorer, so the likelihood alone ranks)."""
        scores = likelihood_weight * self.log_likelihood  # (B, K)
        return scores if self.similarity is None else scores + self.similarity

    def best(self, likelihood_weight: float) -> torch.Tensor:
        """Index (B,) of each image's best candidate; ties keep the earliest."""
        return self.scores(likelihood_weight).argmax(dim=1)  # (B,)

    def best_codes(self, likelihood_weight: float) -> torch.Tensor:
        """The codes of each image's best candidate: (B, h, w)."""
        index = self.best(likelihood_weight)  # (B,)
        return self.codes[torch.arange(len(index)), index]  # (B, h, w)


def row_generators(
    generator: Generators, num_prompts: int, num_images_per_prompt: int, num_candidates: int = 1
) -> torch.Generator | list[torch.Generator] | None:
    """None or one generator pass through; a list becomes one generator per sampled row.

    A list may hold one generator per prompt or one per image. A prompt's generator seeds
    `num_images_per_prompt * num_candidates` fresh generators, an image's `num_candidates`
    (with one candidate, an image's generator is used as is). So an image's candidates depend
    only on its own generator, or on its prompt's, not on `max_batch_size` or the other
    prompts; the scores may differ in the last float bits between batch sizes.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if not isinstance(generator, (list, tuple)) or not all(
        isinstance(item, torch.Generator) for item in generator
    ):
        raise ValueError("generator must be None, a torch.Generator or a list of torch.Generator")
    images = num_prompts * num_images_per_prompt
    if len(generator) == images:
        fan_out = num_candidates
    elif len(generator) == num_prompts:
        fan_out = num_images_per_prompt * num_candidates
    else:
        raise ValueError(
            f"got a list of {len(generator)} generators; pass one per prompt ({num_prompts}) or "
            f"one per image ({images})"
        )
    if len(generator) == images and num_candidates == 1:
        return list(generator)
    rows = []
    for parent in generator:
        seeds = torch.randint(0, 2**62, (fan_out,), generator=parent, device=parent.device)
        rows += [torch.Generator(parent.device).manual_seed(seed) for seed in seeds.tolist()]
    return rows
