"""Training-only losses of the VQGAN (the model never imports this module).

Reconstruction (L1/L2), LPIPS (Zhang et al. 2018) through the `lpips` package's calibrated
heads on a VGG16 trunk, the PatchGAN discriminator (Isola et al. 2017, as in taming), hinge and
non-saturating GAN losses, taming's adaptive generator weight, and LeCam regularisation
(Tseng et al. 2021). No optimizer and no logging here: the training script owns both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lpips
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lpips.lpips import NetLinLayer, ScalingLayer
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 checkpoint name
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # relu1_2 ... relu5_3
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
PERCEPTUAL_KINDS = ("lpips",)
GAN_LOSSES = ("hinge", "non-saturating")


def edge_weights(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W) with mean 1 over the batch: proportional to
    1 + strength * e / mean(e), where e is the 3x3 maximum of the channel-summed absolute
    horizontal and vertical differences of `images` (B, C, H, W), so both sides of an edge count.

    Up-weighting the error near edges is the idea of edge-based losses for super-resolution
    (Seif & Androutsos 2018). On 32-pixel Shapes, where a small object is a few dozen of 1024
    pixels, strength 1 kept the shape of 76% of small objects' reconstructions against 57% at
    equal steps (docs/experiments.md, "Tokenizer")."""
    dx = F.pad((images[..., :, 1:] - images[..., :, :-1]).abs(), (0, 1))  # (B, C, H, W)
    dy = F.pad((images[..., 1:, :] - images[..., :-1, :]).abs(), (0, 0, 0, 1))  # (B, C, H, W)
    edges = F.max_pool2d((dx + dy).sum(1, keepdim=True), 3, stride=1, padding=1)  # (B, 1, H, W)
    weights = 1 + strength * edges / edges.mean().clamp(min=1e-6)
    return weights / weights.mean()


def reconstruction_loss(
    images: torch.Tensor, reconstruction: torch.Tensor, kind: str = "l1", edge_weight: float = 0.0
):
    """Mean absolute ("l1", taming) or squared ("l2", LlamaGen) error; returns a scalar >= 0.

    `images` and `reconstruction` are (B, C, H, W), about [-1, 1] (the reconstruction is not
    clamped). With `edge_weight` > 0 each pixel's error is weighted by
    `edge_weights(images, edge_weight)`, whose mean is 1, so the loss stays on the same scale."""
    if kind not in ("l1", "l2"):
        raise ValueError(f"reconstruction kind={kind!r} is invalid; allowed: ('l1', 'l2')")
    if edge_weight < 0:
        raise ValueError(f"edge_weight={edge_weight} is invalid; use 0 (off) or more")
    if edge_weight == 0:
        if kind == "l1":
            return (images - reconstruction).abs().mean()
        return F.mse_loss(reconstruction, images)
    error = (images - reconstruction).abs() if kind == "l1" else (images - reconstruction) ** 2
    return (error * edge_weights(images, edge_weight)).mean()


def vgg16_weights_path() -> Path:
    """Where torchvision caches the VGG16 ImageNet weights (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


class LPIPS(nn.Module):
    """LPIPS distance with lpips' v0.1 linear heads on a VGG16 trunk; frozen, always eval.

    forward(x, y): (B, 3, H, W) in [-1, 1] each -> (B,) distances >= 0 (0 for identical input).
    Keys match lpips/taming: `scaling_layer.*`, `net.slice{1..5}.{i}.*`, `lin{0..4}.model.1.*`.
    """

    def __init__(self, random_backbone: bool = False) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = nn.Module()
        layers, in_channels = [], 3
        for value in _VGG16_CFG:  # torchvision's `features` indices 0..29
            if value == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, value, 3, padding=1), nn.ReLU()]
                in_channels = value
        for number, (start, stop) in enumerate(_LPIPS_SLICES, 1):
            block = nn.Sequential()
            for index in range(start, stop):
                block.add_module(str(index), layers[index])
            setattr(self.net, f"slice{number}", block)
        self.lins = nn.ModuleList(NetLinLayer(c, use_dropout=True) for c in _LPIPS_CHANNELS)
        for number, lin in enumerate(self.lins):
            setattr(self, f"lin{number}", lin)
        self._load_heads()
        if not random_backbone:
            self._load_trunk(vgg16_weights_path())
        self.requires_grad_(False)
        self.eval()

    def _load_heads(self) -> None:
        path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
        if not path.is_file():
            raise FileNotFoundError(f"lpips linear heads not found at {path}; reinstall lpips")
        state = torch.load(path, map_location="cpu", weights_only=True)
        expected = {f"lin{i}.model.1.weight" for i in range(len(_LPIPS_CHANNELS))}
        if set(state) != expected:
            raise ValueError(f"{path}: keys {sorted(state)} != expected {sorted(expected)}")
        for key, value in state.items():
            self.get_parameter(key).data.copy_(value)

    def _load_trunk(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for number, (start, stop) in enumerate(_LPIPS_SLICES, 1):
            block = getattr(self.net, f"slice{number}")
            for index in range(start, stop):
                if isinstance(block[index - start], nn.Conv2d):
                    for name in ("weight", "bias"):
                        key = f"features.{index}.{name}"
                        if key not in state:
                            raise ValueError(f"{path}: missing {key}; is it torchvision's VGG16?")
                        getattr(block[index - start], name).data.copy_(state[key])

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a fixed metric: dropout in the heads stays off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = self.scaling_layer(torch.cat([x, y]))  # (2B, 3, H, W): one trunk pass for both
        total = torch.zeros(batch, device=x.device, dtype=torch.float32)
        for number, lin in enumerate(self.lins, 1):
            h = getattr(self.net, f"slice{number}")(h)
            features = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit channel vectors
            difference = (features[:batch] - features[batch:]).pow(2)  # (B, C, h, w)
            total = total + lin(difference).float().mean(dim=(1, 2, 3))
        return total


def build_perceptual_loss(kind: str = "lpips", random_backbone: bool = False) -> LPIPS:
    """The perceptual loss module, never touching the network.

    random_backbone=True uses a randomly initialised VGG16 trunk (tests, or an explicit choice).
    Otherwise the torchvision VGG16 weights must already be at `vgg16_weights_path()`; if not,
    FileNotFoundError says where to put them, so a training script can log one line and run
    with perceptual weight 0."""
    if kind not in PERCEPTUAL_KINDS:
        raise ValueError(f"perceptual kind={kind!r} is invalid; allowed: {PERCEPTUAL_KINDS}")
    path = vgg16_weights_path()
    if not random_backbone and not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs torchvision's VGG16 ImageNet weights at {path} and this machine has no "
            f"copy (nothing is downloaded). Copy {VGG16_FILE} there, or set TORCH_HOME to a folder "
            f"holding checkpoints/{VGG16_FILE}; otherwise train with --perceptual-weight 0."
        )
    return LPIPS(random_backbone=random_backbone)


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix; taming's discriminator): images (B, C, H, W) -> logits (B, 1, h, w).

    Keys `main.{i}.*` match taming's checkpoints (BatchNorm, k=4, LeakyReLU 0.2, N(0, 0.02) init).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        multiplier = 1
        for layer in range(1, n_layers + 1):
            previous, multiplier = multiplier, min(2**layer, 8)
            stride = 2 if layer < n_layers else 1
            layers += [
                nn.Conv2d(ndf * previous, ndf * multiplier, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * multiplier),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * multiplier, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def discriminator_gan_loss(logits_real, logits_fake, kind: str = "hinge") -> torch.Tensor:
    """D loss, scalar: hinge 0.5*(relu(1-real) + relu(1+fake)); non-saturating (taming's
    "vanilla") 0.5*(softplus(-real) + softplus(fake)). Lower when real > fake."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "non-saturating":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"disc_loss={kind!r} is invalid; allowed: {GAN_LOSSES}")


def generator_gan_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """G loss, scalar: hinge -mean(fake) (taming); non-saturating mean(softplus(-fake))."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non-saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"gen_loss={kind!r} is invalid; allowed: {GAN_LOSSES}")


def adaptive_weight(nll_loss, g_loss, last_layer, disc_weight: float = 1.0) -> torch.Tensor:
    """taming's lambda = ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, 1e4], times
    disc_weight; gradients taken at `last_layer` (the decoder's conv_out weight). Detached."""
    if not torch.is_grad_enabled():
        # A caller error, not a failed computation: nothing can be differentiated here.
        raise ValueError(
            "adaptive_weight needs autograd but gradients are disabled; call it outside "
            "torch.no_grad() / torch.inference_mode(), or skip it in validation (weight 0)"
        )
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight


class LeCamEMA(nn.Module):
    """EMAs of the mean real/fake logits and the LeCam regulariser (Tseng et al. 2021):
    mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2). Under DDP the means are
    averaged over ranks so the buffers agree. The first update copies the means."""

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("real_ema", torch.zeros(()))
        self.register_buffer("fake_ema", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """Fold the mean of D's logits on real and fake images (any shapes, unbounded) into
        the EMAs; every rank must call it under DDP (all_reduce)."""
        means = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)
            means /= dist.get_world_size()
        decay = self.decay if self.num_updates > 0 else 0.0
        self.real_ema.mul_(decay).add_(means[0], alpha=1 - decay)
        self.fake_ema.mul_(decay).add_(means[1], alpha=1 - decay)
        self.num_updates += 1

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """LeCam regulariser, an fp32 scalar >= 0, for D's logits on real and fake images (any
        shapes, unbounded) against the current EMAs (see `update`); differentiable in the logits."""
        return (
            F.relu(logits_real.float() - self.fake_ema).pow(2).mean()
            + F.relu(self.real_ema - logits_fake.float()).pow(2).mean()
        )


@dataclass(frozen=True)
class VQGANLossConfig:
    """Loss settings (taming's `VQLPIPSWithDiscriminator` names where they exist).

    disc_start: step at which the adversarial term enters the generator loss (taming).
    disc_warmup_steps: the discriminator trains this many steps before disc_start, so it is not
      random when its gradient first reaches the generator (taming trains D only from disc_start,
      the root of the collapse reported in taming issues #44 and #93).
    disc_weight 0 means no discriminator at all (a plain VQ-VAE with perceptual_weight 0).
    """

    reconstruction: str = "l1"
    reconstruction_weight: float = 1.0
    edge_weight: float = 0.0
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    disc_weight: float = 0.8
    disc_start: int = 0
    disc_warmup_steps: int = 0
    disc_loss: str = "hinge"
    gen_loss: str = "hinge"
    adaptive_weight: bool = True
    disc_num_layers: int = 3
    disc_ndf: int = 64
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99

    def __post_init__(self) -> None:
        choices = {"reconstruction": ("l1", "l2"), "disc_loss": GAN_LOSSES, "gen_loss": GAN_LOSSES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"VQGANLossConfig.{name}={getattr(self, name)!r}; allowed {allowed}"
                )
        for name in (
            "reconstruction_weight",
            "edge_weight",
            "perceptual_weight",
            "codebook_weight",
            "disc_weight",
            "disc_start",
            "disc_warmup_steps",
            "lecam_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"VQGANLossConfig.{name}={getattr(self, name)} must be >= 0")
        if self.disc_num_layers < 1 or self.disc_ndf < 1 or not 0 < self.lecam_decay < 1:
            raise ValueError(
                f"VQGANLossConfig: need disc_num_layers >= 1 (got {self.disc_num_layers}), "
                f"disc_ndf >= 1 (got {self.disc_ndf}), 0 < lecam_decay < 1 (got {self.lecam_decay})"
            )


class VQGANLoss(nn.Module):
    """Generator and discriminator objectives. Owns the discriminator and the LeCam EMA; the
    perceptual module is passed in (None when perceptual_weight is 0).

    Usage per step: `loss_g, logs = generator_loss(...)` -> backward -> step the autoencoder
    optimizer only (the D forward inside also leaves gradients on D: zero them before the D
    step); then, if `discriminator_active(step)`, `loss_d, logs = discriminator_loss(...)`.
    """

    def __init__(
        self, config: VQGANLossConfig, perceptual: nn.Module | None = None, in_channels: int = 3
    ) -> None:
        super().__init__()
        if config.perceptual_weight > 0 and perceptual is None:
            raise ValueError(
                f"perceptual_weight={config.perceptual_weight} needs a perceptual module "
                f"(build_perceptual_loss); pass perceptual_weight=0 to train without one"
            )
        self.config = config
        self.perceptual = perceptual if config.perceptual_weight > 0 else None
        self.discriminator = None
        if config.disc_weight > 0:
            self.discriminator = NLayerDiscriminator(
                in_channels, config.disc_ndf, config.disc_num_layers
            )
        self.lecam = LeCamEMA(config.lecam_decay)

    def adversarial_active(self, step: int) -> bool:
        """Whether the adversarial term is in the generator loss at `step`."""
        return self.discriminator is not None and step >= self.config.disc_start

    def discriminator_active(self, step: int) -> bool:
        """Whether the discriminator trains at `step` (disc_warmup_steps before disc_start)."""
        start = self.config.disc_start - self.config.disc_warmup_steps
        return self.discriminator is not None and step >= start

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstruction: torch.Tensor,
        quantizer_loss: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images, reconstruction (B, C, H, W) in [-1, 1]; quantizer_loss scalar ->
        (scalar loss, detached logs). `last_layer` (VQGAN.get_last_layer()) enables the adaptive
        weight; under torch.no_grad (validation) the adversarial term is logged with weight 0."""
        config = self.config
        rec = reconstruction_loss(images, reconstruction, config.reconstruction, config.edge_weight)
        nll = config.reconstruction_weight * rec
        logs = {"reconstruction_loss": rec.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(images, reconstruction).mean()
            nll = nll + config.perceptual_weight * perceptual
            logs["perceptual_loss"] = perceptual.detach()
        loss = nll + config.codebook_weight * quantizer_loss
        if self.adversarial_active(step):
            g_loss = generator_gan_loss(self.discriminator(reconstruction), config.gen_loss)
            if not torch.is_grad_enabled():
                weight = torch.zeros((), device=images.device)
            elif config.adaptive_weight and last_layer is not None:
                weight = adaptive_weight(nll, g_loss, last_layer, config.disc_weight)
            else:
                weight = torch.tensor(config.disc_weight, device=images.device)
            loss = loss + weight * g_loss
            logs.update({"generator_gan_loss": g_loss.detach(), "adaptive_weight": weight})
        logs.update({"nll_loss": nll.detach(), "quantizer_loss": quantizer_loss.detach()})
        logs["generator_loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, images: torch.Tensor, reconstruction: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Real images and reconstructions (B, C, H, W), both detached here -> (scalar loss,
        detached logs). Multiplied by 0 before the discriminator starts (taming's disc_factor).
        LeCam (if lecam_weight > 0) updates its EMA in training mode."""
        if self.discriminator is None:
            raise ValueError("discriminator_loss called with disc_weight=0 (no discriminator)")
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstruction.detach())
        loss = discriminator_gan_loss(logits_real, logits_fake, self.config.disc_loss)
        logs = {
            "discriminator_gan_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        if self.config.lecam_weight > 0:
            if self.training:
                self.lecam.update(logits_real, logits_fake)
            regularizer = self.lecam(logits_real, logits_fake)
            loss = loss + self.config.lecam_weight * regularizer
            logs["lecam_loss"] = regularizer.detach()
        factor = 1.0 if self.discriminator_active(step) else 0.0
        logs["disc_factor"] = loss.new_tensor(factor)  # on the loss's device, like every log
        loss = factor * loss
        logs["discriminator_loss"] = loss.detach()
        return loss, logs
