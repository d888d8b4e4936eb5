"""Code features for the prior: the mean decoded patch and the matte of every code."""

import pytest
import torch
from common.code_features import MATTE_SCALE, matte_features, matte_groups, mean_decoded_patches


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


class HalfPainter:
    """Code 0 decodes to a black 2 x 2 patch; code 1 to its left column in red, the right one
    black; code 2 to a patch whose top-left pixel is half MATTE_SCALE from black."""

    can_decode = True
    red = torch.tensor([1.0, -1.0, -1.0])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        patches = torch.full((3, 3, 2, 2), -1.0)  # (code, RGB, f, f)
        patches[1, :, :, 0] = self.red[:, None]
        patches[2, 0, 0, 0] += MATTE_SCALE / 2
        images = patches[codes]  # (B, h, w, 3, f, f)
        return images.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)  # (B, 3, 2h, 2w)


def test_matte_is_an_alpha_per_pixel_and_two_colours_against_the_images_background():
    codes = torch.zeros(2, 3, 3, dtype=torch.long)  # mostly black: the median is black
    codes[0, 0, 0], codes[1, 2, 1], codes[1, 1, 1] = 1, 1, 2
    features = matte_features(HalfPainter(), codes, 4, batch_size=1)
    assert features.shape == (4, 2 * 2 + 6) and matte_groups(features.shape[1]) == (4, 6)
    black = torch.full((3,), -1.0)
    torch.testing.assert_close(features[0], torch.cat([torch.zeros(4), black, black]))
    alpha = torch.tensor([1.0, 0.0, 1.0, 0.0])  # row-major pixels: the left column
    torch.testing.assert_close(features[1], torch.cat([alpha, HalfPainter.red, black]))
    assert features[2, :4].tolist() == [0.5, 0.0, 0.0, 0.0]  # half the scale: half alpha
    assert features[3].abs().sum() == 0  # never used


def test_a_tokenizer_that_cannot_decode_is_refused():
    class EncodeOnly:
        can_decode = False

    for compute in (mean_decoded_patches, matte_features):
        with pytest.raises(ValueError, match="cannot decode"):
            compute(EncodeOnly(), torch.zeros(1, 2, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="codes has shape"):
        mean_decoded_patches(PatchPainter(2, 4), torch.zeros(0, 2, 2, dtype=torch.long), 4)
