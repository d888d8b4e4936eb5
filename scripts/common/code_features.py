"""Per-code features for the prior: what each image code looks like once decoded, as its mean
patch or as a matte (an outline and two colours)."""

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

    def features(images: torch.Tensor, factor: int) -> torch.Tensor:
        patches = images.unfold(2, factor, factor).unfold(3, factor, factor)  # (B,3,h,w,f,f)
        return patches.permute(0, 2, 3, 1, 4, 5).flatten(3)  # (B, h, w, 3*f*f)

    return _mean_per_code(image_tokenizer, codes, codebook_size, features, device, batch_size)


MATTE_SCALE = 0.5  # a pixel this far (RGB in [-1, 1]) from the background is all foreground
MATTE_COLOURS = 6  # foreground RGB, then background RGB, after the alpha of every pixel


@torch.no_grad()
def matte_features(
    image_tokenizer, codes: torch.Tensor, codebook_size: int, device="cpu", batch_size: int = 256
) -> torch.Tensor:
    """Every code's matte, averaged over its uses in the code grids `codes` (N, h, w): float32
    (codebook_size, f*f + 6) = [alpha (f*f, in [0, 1]) | foreground RGB (3) | background RGB
    (3)], colours in [-1, 1]; a code that never occurs gets zeros.

    Each grid is decoded; its background is the image's per-channel median colour, and a
    pixel's alpha is its distance from that colour over MATTE_SCALE, clipped to 1. A patch's
    foreground is the alpha-weighted mean of its pixels (the background where alpha is all 0).
    Like block truncation coding's two colours and bitmap per block (Delp & Mitchell 1979), this
    splits what a code looks like into an outline and colours, which the prior embeds as
    separate groups (`PriorConfig.code_feature_groups`), so that an outline learnt under one
    colour carries over to the others.
    """

    def features(images: torch.Tensor, factor: int) -> torch.Tensor:
        background = images.flatten(2).median(dim=2).values[:, None, None, None]  # (B,1,1,1,3)
        patches = images.unfold(2, factor, factor).unfold(3, factor, factor)  # (B,3,h,w,f,f)
        patches = patches.permute(0, 2, 3, 4, 5, 1).flatten(3, 4)  # (B, h, w, f*f, 3)
        alpha = ((patches - background).norm(dim=-1) / MATTE_SCALE).clamp(max=1)  # (B,h,w,ff)
        weight = alpha.sum(-1, keepdim=True)  # (B, h, w, 1)
        mixed = (alpha.unsqueeze(-1) * patches).sum(-2) / weight.clamp(min=1e-3)  # (B,h,w,3)
        background = background[:, :, :, 0].expand_as(mixed)  # (B, h, w, 3)
        foreground = torch.where(weight > 1e-3, mixed, background)
        return torch.cat([alpha, foreground, background], dim=-1)  # (B, h, w, f*f + 6)

    return _mean_per_code(image_tokenizer, codes, codebook_size, features, device, batch_size)


def matte_groups(feature_dim: int) -> tuple[int, int]:
    """The matte's feature groups for the prior: the alpha, then both colours."""
    return (feature_dim - MATTE_COLOURS, MATTE_COLOURS)


def _mean_per_code(image_tokenizer, codes, codebook_size, features, device, batch_size):
    """Mean over the cells of `codes` (N, h, w) of features(decoded (B, 3, H, W), f) (B, h, w,
    F), per code: (codebook_size, F) float32, zeros for codes that never occur."""
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
        cells = features(images, images.shape[2] // chunk.shape[1]).flatten(0, 2)  # (B*h*w, F)
        if sums is None:
            sums = torch.zeros(codebook_size, cells.shape[1])
        flat = chunk.flatten().cpu()  # (B*h*w,)
        sums.index_add_(0, flat, cells)
        counts += torch.bincount(flat, minlength=codebook_size)
    return sums / counts.clamp(min=1).unsqueeze(1).float()  # (V, F)
