"""scripts/evaluate_tokenizer.py: metric definitions, ranges, the FID path and the CLI."""

import json
import math

import evaluate_tokenizer as ev
import pytest
import torch
from torch import nn

from tokenizer import VQGAN, VQGANConfig


class TinyFeatures(nn.Module):
    """A small random feature extractor for FID (research/data-and-eval.md section 3)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.num_features = dim
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, dim, 3, 2, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255.0)


def random_images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def tiny_vqgan() -> VQGAN:
    torch.manual_seed(0)
    config = VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), z_channels=16, codebook_size=32)
    return VQGAN(config).eval()


def test_psnr_identical_images_hit_the_cap():
    images = random_images(3)
    assert torch.equal(ev.psnr(images, images), torch.full((3,), ev.PSNR_CAP_DB))


@pytest.mark.parametrize("offset", [0.02, 0.2, 1.0])
def test_psnr_matches_the_definition(offset):
    # A constant shift of `offset` in [-1, 1] units is offset / 2 on [0, 1] pixels.
    images = torch.zeros(2, 3, 8, 8)
    expected = -10 * math.log10((offset / 2) ** 2)
    assert torch.allclose(ev.psnr(images, images + offset), torch.full((2,), expected), atol=1e-4)


def test_ssim_is_one_for_identical_and_lower_for_noise():
    images = random_images(2, size=32)
    assert torch.allclose(ev.ssim(images, images), torch.ones(2), atol=1e-5)
    noisy = (images + 0.5 * random_images(2, size=32, seed=1)).clamp(-1, 1)
    assert (ev.ssim(images, noisy) < 0.9).all()


@pytest.mark.parametrize(
    ("codes", "usage", "perplexity"),
    [(torch.arange(8), 1.0, 8.0), (torch.zeros(8, dtype=torch.long), 1 / 8, 1.0),
     (torch.tensor([0, 0, 1, 1]), 2 / 8, 2.0)],
)  # fmt: skip
def test_code_histogram(codes, usage, perplexity):
    histogram = ev.CodeHistogram(8)
    histogram.update(codes.view(1, 1, -1))
    assert histogram.usage() == pytest.approx(usage)
    assert histogram.perplexity() == pytest.approx(perplexity)


def test_fid_with_a_random_feature_module():
    torch.manual_seed(0)
    real = ev.to_uint8(random_images(24))
    fid_same = ev.build_fid(feature=TinyFeatures())
    fid_same.update(real, real=True)
    fid_same.update(real, real=False)
    fid_dark = ev.build_fid(feature=TinyFeatures())
    fid_dark.update(real, real=True)
    fid_dark.update((real.float() * 0.3).to(torch.uint8), real=False)
    same, dark = float(fid_same.compute()), float(fid_dark.compute())
    assert abs(same) < 1e-3
    assert dark > 100 * max(abs(same), 1e-4)


def test_evaluate_tiny_vqgan_values_in_range(tiny_vqgan):
    batches = [random_images(4, seed=seed) for seed in range(2)]
    metrics = ev.evaluate(tiny_vqgan, batches, fid_metric=ev.build_fid(feature=TinyFeatures()))
    assert metrics["num_images"] == 8
    assert 0 < metrics["psnr"] < ev.PSNR_CAP_DB
    assert -1 <= metrics["ssim"] <= 1
    assert metrics["lpips"] is None
    assert math.isfinite(metrics["rfid"]) and metrics["rfid"] >= -1e-3
    assert 0 < metrics["codebook_usage"] <= 1
    assert 1 <= metrics["codebook_perplexity"] <= tiny_vqgan.codebook_size
    # Usage counts distinct codes of exactly the codes the model produced.
    codes = torch.cat([tiny_vqgan.encode(b) for b in batches])
    assert metrics["codebook_usage"] == codes.unique().numel() / tiny_vqgan.codebook_size


def test_main_writes_json_with_clear_nulls(tmp_path, tiny_vqgan, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no cached weights
    tiny_vqgan.save_pretrained(tmp_path / "vq")
    out = tmp_path / "eval" / "metrics.json"
    argv = ["--tokenizer", str(tmp_path / "vq"), "--num-images", "6", "--batch-size", "4"]
    result = ev.main(ev.parse_args([*argv, "--out", str(out)]))
    written = json.loads(out.read_text())
    assert written["num_images"] == 6 == result["num_images"]
    assert written["lpips"] is None and written["rfid"] is None
    assert any("LPIPS not computed" in note for note in written["notes"])
    assert any("rFID not computed" in note for note in written["notes"])
    assert 0 <= written["codebook_usage"] <= 1


def test_main_random_lpips_backbone_gives_a_number(tmp_path, tiny_vqgan):
    tiny_vqgan.save_pretrained(tmp_path / "vq")
    argv = ["--tokenizer", str(tmp_path / "vq"), "--num-images", "2", "--lpips", "random"]
    result = ev.main(ev.parse_args([*argv, "--fid", "off"]))
    assert result["lpips"] is not None and result["lpips"] >= 0
    assert any("RANDOM" in note for note in result["notes"])


@pytest.mark.parametrize(
    "argv",
    [["--num-images", "0"], ["--batch-size", "0"], ["--fid-weights", "/nonexistent.pth"]],
)
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        ev.parse_args(["--tokenizer", "x", *argv])


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.main(ev.parse_args(["--tokenizer", str(tmp_path / "missing")]))


class _Lossless:
    """A stand-in tokenizer whose decode returns exactly what was encoded."""

    codebook_size = 1

    def encode(self, images):
        self.images = images
        return torch.zeros(images.shape[0], 1, 1, dtype=torch.long)

    def decode(self, codes):
        return self.images


class _Grey(_Lossless):
    def decode(self, codes):
        return torch.zeros_like(self.images)


def test_judge_reconstructions_bounds_the_pipeline():
    """A lossless tokenizer passes every render; one that decodes to flat grey passes none."""
    perfect = ev.judge_reconstructions(_Lossless(), 40, 32, seed=1, batch_size=16)
    assert perfect["count"] == 40 and perfect["all_correct"] == 1.0
    grey = ev.judge_reconstructions(_Grey(), 40, 32, seed=1, batch_size=16)
    assert grey["all_correct"] == 0.0 and grey["color"] == 0.0


def test_main_judge_flag(tmp_path, tiny_vqgan):
    folder = tiny_vqgan.save_pretrained(tmp_path / "vq")
    argv = ["--tokenizer", str(folder), "--num-images", "4", "--lpips", "off", "--fid", "off",
            "--judge", "6", "--out", str(tmp_path / "eval.json")]  # fmt: skip
    result = json.loads(ev.main(ev.parse_args(argv)) and (tmp_path / "eval.json").read_text())
    assert result["shapes_judge"]["count"] == 6
    assert 0.0 <= result["shapes_judge"]["all_correct"] <= 1.0
