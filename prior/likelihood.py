"""The prior's log-likelihood of whole code grids, for reranking sampled candidates."""

from __future__ import annotations

import torch

from prior.model import Prior


@torch.no_grad()
def code_log_likelihood(
    prior: Prior, text_ids: torch.Tensor, image_codes: torch.Tensor
) -> torch.Tensor:
    """log p(codes | caption) in nats, summed over the grid: one teacher-forced forward pass.

    This is the conditional model itself (no guidance, temperature 1, no dropout even when the
    prior is in training mode; no autograd graph), whatever settings drew the codes, so
    candidates drawn together are compared on one scale. The prior's mode is not changed.

    Args:
        text_ids: (B, text_length) long, as for `Prior.forward`.
        image_codes: (B, h, w) or (B, h*w) long in [0, codebook_size).

    Returns:
        (B,) fp32, <= 0.
    """
    codes = prior.check_inputs(text_ids, image_codes)  # (B, N)
    logits = prior.teacher_forced_image_logits(text_ids, codes)  # (B, N, V)
    log_probs = logits.log_softmax(dim=-1)  # (B, N, V)
    return log_probs.gather(-1, codes.unsqueeze(-1)).squeeze(-1).sum(dim=-1)  # (B,)
