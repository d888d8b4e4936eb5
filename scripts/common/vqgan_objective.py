"""The tokenizer job's training objective (taming, Esser et al. 2021), assembled from
`tokenizer.losses`: reconstruction + perceptual + quantizer loss for the generator, and a
PatchGAN with hinge loss, taming's adaptive weight and optional LeCam regularisation.

GAN phases are a pure function of the step: the discriminator trains from `disc_start`, and
its loss enters the generator loss `disc_warmup_steps` later. The LeCam EMAs are the only GAN
state besides weights and optimizers; they go into checkpoints as safetensors tensors.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenizer.losses import (
    LeCamEMA,
    adaptive_weight,
    build_perceptual_loss,
    discriminator_gan_loss,
    generator_gan_loss,
    reconstruction_loss,
)

LOGGED_STATS = ("perplexity", "batch_usage", "restarted_codes")


@dataclass
class VQGANObjective:
    """Loss settings and modules. `disc` is the (possibly DDP-wrapped) discriminator or None;
    `perceptual` an LPIPS module or None; `lecam` a LeCamEMA or None."""

    reconstruction: str
    edge_weight: float
    perceptual_weight: float
    disc_weight: float
    disc_loss: str
    disc_start: int
    disc_warmup_steps: int
    lecam_weight: float
    disc: Any = None
    disc_module: nn.Module | None = None
    perceptual: nn.Module | None = None
    lecam: LeCamEMA | None = None
    autocast: Any = contextlib.nullcontext

    def phase(self, step: int) -> tuple[bool, bool]:
        """(train the discriminator, use its loss in the generator) at 0-based `step`."""
        disc_on = self.disc is not None and step >= self.disc_start
        return disc_on, disc_on and step >= self.disc_start + self.disc_warmup_steps

    def generator_loss(
        self, model: nn.Module, last_layer: torch.Tensor, images: torch.Tensor, adversarial: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, 3, H, W) in [-1, 1] -> (loss, reconstruction fp32, detached terms)."""
        with self.autocast():
            out = model(images)
        reconstruction = out.reconstruction.float()
        nll = reconstruction_loss(images, reconstruction, self.reconstruction, self.edge_weight)
        terms = {"rec_loss": nll.detach(), "quantizer_loss": out.quantizer_loss.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(images, reconstruction).mean()
            nll = nll + self.perceptual_weight * perceptual
            terms["perceptual_loss"] = perceptual.detach()
        loss = nll + out.quantizer_loss
        if adversarial:
            # The unwrapped D with frozen parameters: it gets no gradient from the G loss, and
            # DDP sees exactly one forward of D (the D step's) per backward.
            self.disc_module.requires_grad_(False)
            g_loss = generator_gan_loss(self.disc_module(reconstruction).float(), self.disc_loss)
            self.disc_module.requires_grad_(True)
            weight = adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
            loss = loss + weight * g_loss
            terms.update(g_loss=g_loss.detach(), adaptive_weight=weight)
        for key in LOGGED_STATS:
            if key in out.stats:
                terms[key] = out.stats[key].detach().float()
        return loss, reconstruction, terms

    def discriminator_loss(
        self, images: torch.Tensor, fake: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss, real logits, fake logits, terms). Real and fake images go through ONE
        forward (DDP allows one forward per backward)."""
        with self.autocast():
            logits = self.disc(torch.cat([images, fake.detach()])).float()
        real, fake_logits = logits.chunk(2)
        loss = discriminator_gan_loss(real, fake_logits, self.disc_loss)
        terms = {
            "d_loss": loss.detach(),
            "logits_real": real.mean().detach(),
            "logits_fake": fake_logits.mean().detach(),
        }
        if self.lecam is not None:
            regulariser = self.lecam(real, fake_logits)
            loss = loss + self.lecam_weight * regulariser
            terms["lecam_loss"] = regulariser.detach()
        return loss, real.detach(), fake_logits.detach(), terms

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """LeCam EMA buffers for the checkpoint (`lecam.*`)."""
        if self.lecam is None:
            return {}
        return {f"lecam.{name}": value for name, value in self.lecam.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the LeCam EMAs from a checkpoint (strict: every key checked)."""
        state = {
            key.removeprefix("lecam."): value
            for key, value in tensors.items()
            if key.startswith("lecam.")
        }
        if self.lecam is not None and (state or tensors):
            self.lecam.load_state_dict(state, strict=True)


def build_perceptual(args: argparse.Namespace, warn: Callable[[str], None]) -> nn.Module | None:
    """The LPIPS module, or None: weight 0, or its VGG16 weights are not on disk, in which case
    `warn` gets one line and `args.perceptual_weight` becomes 0."""
    if args.perceptual_weight == 0:
        return None
    try:
        return build_perceptual_loss(random_backbone=args.perceptual_random_backbone)
    except FileNotFoundError as error:
        warn(f"perceptual loss OFF (--perceptual-weight {args.perceptual_weight} ignored): {error}")
        args.perceptual_weight = 0.0
        return None


def build_objective(
    args: argparse.Namespace, accelerator: Any, disc: Any, warn: Callable[[str], None]
) -> VQGANObjective:
    """The objective of the tokenizer job's flags; LPIPS and LeCam only when weighted > 0.
    `disc` is the prepared (possibly DDP-wrapped) discriminator or None."""
    perceptual = build_perceptual(args, warn)
    lecam = LeCamEMA() if disc is not None and args.lecam_weight > 0 else None
    return VQGANObjective(
        args.reconstruction,
        args.edge_weight,
        args.perceptual_weight,
        args.disc_weight,
        args.disc_loss,
        args.disc_start,
        args.disc_warmup_steps,
        args.lecam_weight,
        disc,
        accelerator.unwrap_model(disc) if disc is not None else None,
        perceptual.to(accelerator.device) if perceptual is not None else None,
        lecam.to(accelerator.device) if lecam is not None else None,
        accelerator.autocast,
    )
