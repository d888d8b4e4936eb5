"""Code features for the prior: the mean decoded patch of every code."""

import pytest
import torch
from common.code_features import mean_decoded_patches


class PatchPainter:
    """A stand-in tokenizer whose decode paints each f x f patch with its code's own colour."""

    can_decode = True

    def __init__(self, factor: int, codebook_size: int) -> None:
        self.factor = factor
        self.colours = torch.linspace(-1, 1, codebook_size * 3).view(codebook_size, 3)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        colours = self.colours[codes].permute(0, 3, 1, 2)  # (B, 3, h, w)
        return colours.repeat_interleave(self.factor, 2).repeat_interleave(self.factor, 3)


def test_each_code_gets_the_mean_of_its_patches_and_unused_codes_zeros():
    painter, size = PatchPainter(factor=2, codebook_size=10), 10
    codes = torch.randint(0, 6, (7, 3, 4))  # codes 6..9 never occur
    features = mean_decoded_patches(painter, codes, size, batch_size=3)
    assert features.shape == (size, 3 * 2 * 2)
    # channel-major f x f patches: each code's patch is its colour in every pixel
    expected = painter.colours[:6].repeat_interleave(4, dim=1)  # (6, 12)
    torch.testing.assert_close(features[:6], expected)
    assert features[6:].abs().sum() == 0

    # averaging: a code whose patches differ gets their mean
    class Noisy(PatchPainter):
        def decode(self, codes):
            images = super().decode(codes)
            return images + torch.arange(codes.shape[0]).view(-1, 1, 1, 1) * 0.01

    both = torch.zeros(2, 1, 1, dtype=torch.long)
    mean = mean_decoded_patches(Noisy(1, 10), both, size, batch_size=2)
    torch.testing.assert_close(mean[0], painter.colours[0] + 0.005)


def test_a_tokenizer_that_cannot_decode_is_refused():
    class EncodeOnly:
        can_decode = False

    with pytest.raises(ValueError, match="cannot decode"):
        mean_decoded_patches(EncodeOnly(), torch.zeros(1, 2, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="codes has shape"):
        mean_decoded_patches(PatchPainter(2, 4), torch.zeros(0, 2, 2, dtype=torch.long), 4)
