"""Training losses: LPIPS (random trunk, parity with the lpips package, weight loading and the
offline error), PatchGAN, GAN loss signs, adaptive weight, LeCam, and the VQGANLoss phases."""

import pytest
import torch

from tokenizer import VQGAN, VQGANConfig
from tokenizer.losses import (
    LPIPS,
    VGG16_FILE,
    LeCamEMA,
    NLayerDiscriminator,
    VQGANLoss,
    VQGANLossConfig,
    adaptive_weight,
    build_perceptual_loss,
    discriminator_gan_loss,
    edge_weights,
    generator_gan_loss,
    reconstruction_loss,
    vgg16_weights_path,
)


@pytest.fixture(scope="module")
def random_lpips() -> LPIPS:
    torch.manual_seed(0)
    return build_perceptual_loss("lpips", random_backbone=True)


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_random_backbone_zero_for_identical_images(random_lpips):
    x, y = images(seed=0), images(seed=1)
    same = random_lpips(x, x)
    assert same.shape == (2,) and torch.equal(same, torch.zeros(2))
    different = random_lpips(x, y)
    assert (different > 0).all()
    y.requires_grad_(True)
    random_lpips(x, y).sum().backward()
    assert y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.training  # a fixed metric: heads' dropout never switches on


def test_lpips_matches_the_lpips_package(random_lpips):
    import lpips

    # lpips builds torchvision's VGG16 with the deprecated `pretrained=` argument
    with pytest.warns(UserWarning, match="deprecated"):
        reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    reference.load_state_dict(random_lpips.state_dict(), strict=True)
    x, y = images(seed=2), images(seed=3)
    with torch.no_grad():
        expected = reference(x, y).flatten()
    torch.testing.assert_close(random_lpips(x, y), expected, rtol=1e-4, atol=1e-6)


def test_build_perceptual_loss_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert vgg16_weights_path() == tmp_path / "hub" / "checkpoints" / VGG16_FILE
    with pytest.raises(FileNotFoundError, match=r"TORCH_HOME.*--perceptual-weight 0"):
        build_perceptual_loss("lpips")
    with pytest.raises(ValueError, match="kind='dists'"):
        build_perceptual_loss("dists", random_backbone=True)
    # a torchvision-format checkpoint in the cache is loaded into the trunk
    torch.manual_seed(1)
    donor = LPIPS(random_backbone=True)
    features = {}
    for number in range(1, 6):  # slice keys carry torchvision's `features` indices
        for name, value in getattr(donor.net, f"slice{number}").state_dict().items():
            features[f"features.{name}"] = value
    vgg16_weights_path().parent.mkdir(parents=True)
    torch.save(features, vgg16_weights_path())
    loaded = build_perceptual_loss("lpips")
    for key, value in donor.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_reconstruction_losses():
    x, y = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert reconstruction_loss(x, y, "l1").item() == 0.5
    assert reconstruction_loss(x, y, "l2").item() == 0.25
    with pytest.raises(ValueError, match="'l3'"):
        reconstruction_loss(x, y, "l3")


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_edge_weighted_reconstruction(kind):
    """Weights have mean 1 and are flat on a flat image (so the loss is the plain one there);
    on an image with an edge, the same error costs more at the edge than far from it."""
    flat = torch.zeros(2, 3, 8, 8)
    weights = edge_weights(flat, 1.0)
    torch.testing.assert_close(weights, torch.ones(2, 1, 8, 8))
    noisy = flat + 0.1 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = reconstruction_loss(flat, noisy, kind)
    torch.testing.assert_close(reconstruction_loss(flat, noisy, kind, edge_weight=1.0), plain)
    image = torch.zeros(1, 3, 8, 8)
    image[..., :, 4:] = 1.0  # a vertical edge between columns 3 and 4
    weights = edge_weights(image, 1.0)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[0, 0, :, 3:5].min() > 1 > weights[0, 0, :, 0].max()
    at_edge, far = image.clone(), image.clone()
    at_edge[..., 2, 4] += 0.5
    far[..., 2, 0] += 0.5
    assert reconstruction_loss(image, at_edge, kind, 1.0) > reconstruction_loss(
        image, far, kind, 1.0
    )
    assert reconstruction_loss(image, at_edge, kind) == reconstruction_loss(image, far, kind)
    with pytest.raises(ValueError, match="edge_weight=-1"):
        reconstruction_loss(image, far, kind, -1.0)


def test_patchgan_layout_and_size():
    discriminator = NLayerDiscriminator(3, 64, 3)
    keys = {key.split(".")[1] for key in discriminator.state_dict()}
    assert keys == {"0", "2", "3", "5", "6", "8", "9", "11"}  # taming's main.{i} indices
    assert round(sum(p.numel() for p in discriminator.parameters()) / 1e6, 2) == 2.77
    assert discriminator(images(2, 32)).shape == (2, 1, 2, 2)
    assert NLayerDiscriminator(3, 8, 2)(images(1, 64)).shape == (1, 1, 14, 14)


@pytest.mark.parametrize("kind", ["hinge", "non-saturating"])
def test_gan_loss_signs(kind):
    confident = discriminator_gan_loss(torch.full((4,), 3.0), torch.full((4,), -3.0), kind)
    fooled = discriminator_gan_loss(torch.full((4,), -3.0), torch.full((4,), 3.0), kind)
    assert confident < fooled
    if kind == "hinge":
        assert confident.item() == 0.0
    # the generator's loss falls as the discriminator rates its images as more real
    assert generator_gan_loss(torch.full((4,), 2.0), kind) < generator_gan_loss(
        torch.full((4,), -2.0), kind
    )
    with pytest.raises(ValueError, match="allowed"):
        generator_gan_loss(torch.zeros(1), "wasserstein")


def test_adaptive_weight_is_the_gradient_norm_ratio():
    layer = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4)
    nll = (x @ layer).pow(2).mean()
    g_loss = -(x @ layer).mean() * 0.01
    weight = adaptive_weight(nll, g_loss, layer, disc_weight=0.5)
    nll_grad = torch.autograd.grad(nll, layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, layer, retain_graph=True)[0]
    expected = 0.5 * nll_grad.norm() / (g_grad.norm() + 1e-4)
    torch.testing.assert_close(weight, expected)
    assert torch.isfinite(weight) and not weight.requires_grad
    flat = adaptive_weight(nll * 1e6, g_loss * 0, layer)  # no adversarial gradient at all
    assert flat.item() == 1e4  # clamped
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"needs autograd.*outside torch\.no_grad"),
    ):
        adaptive_weight(nll, g_loss, layer)


def test_lecam_ema_and_regulariser():
    lecam = LeCamEMA(decay=0.9)
    lecam.update(torch.full((4,), 2.0), torch.full((4,), -2.0))
    assert lecam.real_ema.item() == 2.0 and lecam.fake_ema.item() == -2.0  # first copies
    lecam.update(torch.full((4,), 0.0), torch.full((4,), 0.0))
    torch.testing.assert_close(lecam.real_ema, torch.tensor(1.8))
    # real logits below the fake EMA and fake logits above the real EMA: no penalty
    assert lecam(torch.full((2,), -3.0), torch.full((2,), 3.0)).item() == 0.0
    # diverging logits are penalised quadratically
    penalty = lecam(torch.full((2,), 3.8), torch.full((2,), -1.0))
    torch.testing.assert_close(penalty, torch.tensor((3.8 + 1.8) ** 2 + (1.8 + 1.0) ** 2))
    assert set(lecam.state_dict()) == {"real_ema", "fake_ema", "num_updates"}


def test_vqgan_loss_phases_and_backward():
    torch.manual_seed(0)
    config = VQGANConfig.from_preset(
        "cpu-tiny", resolution=16, ch=16, ch_mult=(1, 2), z_channels=8, codebook_size=16
    )
    model = VQGAN(config).train()
    loss_config = VQGANLossConfig(
        perceptual_weight=0.0,
        disc_start=10,
        disc_warmup_steps=4,
        disc_ndf=8,
        disc_num_layers=2,
        lecam_weight=0.1,
    )
    criterion = VQGANLoss(loss_config).train()
    x = images(2, 16)
    out = model(x)
    last = model.get_last_layer()
    # before warmup: reconstruction + codebook only, D multiplied by 0
    loss, logs = criterion.generator_loss(x, out.reconstruction, out.quantizer_loss, 0, last)
    assert "generator_gan_loss" not in logs
    torch.testing.assert_close(loss, logs["reconstruction_loss"] + out.quantizer_loss)
    d_loss, d_logs = criterion.discriminator_loss(x, out.reconstruction, 0)
    assert d_loss.item() == 0.0 and d_logs["disc_factor"].item() == 0.0
    # warmup: D trains, G does not see it yet
    assert criterion.discriminator_active(6) and not criterion.adversarial_active(6)
    d_loss, d_logs = criterion.discriminator_loss(x, out.reconstruction, 6)
    assert d_loss.item() > 0 and "lecam_loss" in d_logs
    d_loss.backward()
    assert criterion.discriminator.main[0].weight.grad is not None
    # adversarial phase: adaptive weight, finite, gradients reach the encoder
    loss, logs = criterion.generator_loss(x, out.reconstruction, out.quantizer_loss, 10, last)
    assert torch.isfinite(logs["adaptive_weight"]) and logs["adaptive_weight"] > 0
    loss.backward()
    assert model.encoder.conv_in.weight.grad is not None
    with torch.no_grad():  # validation: logged, weight 0
        _, logs = criterion.generator_loss(x, out.reconstruction, out.quantizer_loss, 10, last)
    assert logs["adaptive_weight"].item() == 0.0


def test_vqgan_loss_validation():
    with pytest.raises(ValueError, match=r"perceptual_weight=1\.0 needs a perceptual module"):
        VQGANLoss(VQGANLossConfig())
    with pytest.raises(ValueError, match="disc_loss='wgan'"):
        VQGANLossConfig(disc_loss="wgan")
    with pytest.raises(ValueError, match="disc_start=-1"):
        VQGANLossConfig(disc_start=-1)
    plain = VQGANLoss(VQGANLossConfig(perceptual_weight=0.0, disc_weight=0.0))  # a VQ-VAE
    assert plain.discriminator is None and not plain.adversarial_active(10**9)
    with pytest.raises(ValueError, match="disc_weight=0"):
        plain.discriminator_loss(images(1, 16), images(1, 16), 0)
