"""Per-code features for the prior: what each image code looks like once decoded."""

from __future__ import annotations

import torch


@torch.no_grad()
def mean_decoded_patches(
    image_tokenizer, codes: torch.Tensor, codebook_size: int, device="cpu", batch_size: int = 256
) -> torch.Tensor:
    """Mean decoded f x f patch of every code over the code grids `codes` (N, h, w).

    Each grid is decoded with `image_tokenizer.decode` ((B, h, w) -> (B, 3, H, W) in [-1, 1]) and
    cut into its h x w patches of f x f pixels (f = H / h); the patches under each code are
    averaged. Returns float32 (codebook_size, 3 * f * f) in [-1, 1]; a code that never occurs
    gets zeros. With a tokenizer whose codes see only their own patch (`encoder="patch"`) this
    is what the code shows; with taming's encoder it is what the code shows on average.
    """
    if not getattr(image_tokenizer, "can_decode", True):
        raise ValueError(
            f"{type(image_tokenizer).__name__} cannot decode, so code features cannot be computed; "
            "pass a tokenizer that decodes or leave --code-features at 'none'"
        )
    if codes.ndim != 3 or codes.shape[0] == 0:
        raise ValueError(f"codes has shape {tuple(codes.shape)}; pass (N >= 1, h, w) code grids")
    sums, counts = None, torch.zeros(codebook_size, dtype=torch.long)
    for chunk in codes.split(batch_size):
        images = image_tokenizer.decode(chunk.to(device)).float().cpu()  # (B, 3, H, W)
        factor = images.shape[2] // chunk.shape[1]
        patches = images.unfold(2, factor, factor).unfold(3, factor, factor)  # (B,3,h,w,f,f)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * factor * factor)  # (Bhw, F)
        if sums is None:
            sums = torch.zeros(codebook_size, patches.shape[1])
        flat = chunk.flatten().cpu()  # (B*h*w,)
        sums.index_add_(0, flat, patches)
        counts += torch.bincount(flat, minlength=codebook_size)
    return sums / counts.clamp(min=1).unsqueeze(1).float()  # (V, F)
