"""Reference models for the converter tests, built from each source's own pip package with a
random init and a tiny config (taming-transformers-rom1504 modules, diffusers VQModel,
transformers JanusVQVAE), plus LlamaGen's key layout and its l2-normalised quantizer."""

from __future__ import annotations

import re
import sys
import types

import torch
import torch.nn.functional as F

CODEBOOK = 64


def perturb_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter off its init (GroupNorm 1/0 included) so that swapped keys show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def random_images(batch: int = 2, side: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, side, side, generator=generator) * 2 - 1  # (B, 3, H, W) in [-1, 1]


class TamingVQ(torch.nn.Module):
    """taming's VQModel built from taming.modules only (taming.models needs old Lightning)."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            quant, _, (_, _, indices) = self.quantize(self.quant_conv(self.encoder(images)))
        return indices.view(quant.shape[0], quant.shape[2], quant.shape[3])  # (B*h*w,) -> (B, h, w)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        shape = (*codes.shape, self.quantize.e_dim)  # (B, h, w, D)
        quant = self.quantize.get_codebook_entry(codes.reshape(-1), shape)  # (B, D, h, w)
        return self.decoder(self.post_quant_conv(quant))


def taming_yaml(ddconfig: dict, n_embed: int, embed_dim: int, target="taming.models.vqgan.VQModel"):
    loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}
    params = {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": ddconfig, "lossconfig": loss}
    return {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}}


def lightning_checkpoint(state_dict: dict, monkeypatch) -> dict:
    """A Lightning 1.0-style checkpoint: `callbacks` is keyed by the callback class itself, so
    the pickle holds a global for pytorch_lightning's ModelCheckpoint."""
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    callback_class = type("ModelCheckpoint", (), {"__module__": module_name})
    module = types.ModuleType(module_name)
    module.ModelCheckpoint = callback_class
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module_name, module)
    return {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state_dict,
        "callbacks": {
            callback_class: {"best_model_score": torch.tensor(0.5), "best_model_path": "x"}
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6}]}],
        "lr_schedulers": [],
    }


def to_llamagen_key(key: str, num_levels: int) -> str:
    """Our/taming key -> LlamaGen's (inverse of the verified map in the research notes)."""
    mid = {"block_1": "0", "attn_1": "1", "block_2": "2"}
    if match := re.match(r"^encoder\.down\.(\d+)\.(block|attn|downsample)\.(.*)$", key):
        level, kind, rest = match.groups()
        return f"encoder.conv_blocks.{level}.{'res' if kind == 'block' else kind}.{rest}"
    if match := re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.(.*)$", key):
        level, kind, rest = match.groups()
        new = num_levels - 1 - int(level)
        return f"decoder.conv_blocks.{new}.{'res' if kind == 'block' else kind}.{rest}"
    if match := re.match(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.*)$", key):
        return f"{match.group(1)}.mid.{mid[match.group(2)]}.{match.group(3)}"
    return key


def llamagen_encode(reference: TamingVQ, images: torch.Tensor) -> torch.Tensor:
    """LlamaGen's quantizer: argmin of squared distance between l2-normalised z and codebook."""
    with torch.no_grad():
        z = reference.quant_conv(reference.encoder(images))  # (B, D, h, w)
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)  # (N, D)
        codebook = F.normalize(reference.quantize.embedding.weight, dim=-1)  # (K, D)
        distances = (
            flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        )
    return distances.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])  # (N,) -> (B, h, w)


def llamagen_decode(reference: TamingVQ, codes: torch.Tensor) -> torch.Tensor:
    codebook = F.normalize(reference.quantize.embedding.weight, dim=-1)  # decode_code re-normalises
    quant = F.embedding(codes, codebook).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)
    return reference.decoder(reference.post_quant_conv(quant))


def tiny_vqmodel(**overrides):
    from diffusers import VQModel

    config = dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=32,
        vq_embed_dim=8,
        num_vq_embeddings=CODEBOOK,
        norm_num_groups=32,
        sample_size=32,
    )
    return perturb_(VQModel(**{**config, **overrides}), seed=2)


def diffusers_encode(reference, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        latents = reference.encode(images).latents  # (B, D, h, w)
        _, _, (_, _, indices) = reference.quantize(latents)  # flat (B*h*w,)
    return indices.view(latents.shape[0], *latents.shape[2:])  # (B, h, w)


def diffusers_decode(reference, codes: torch.Tensor) -> torch.Tensor:
    shape = (*codes.shape, reference.quantize.vq_embed_dim)  # (B, h, w, D)
    quant = reference.quantize.get_codebook_entry(codes.reshape(-1), shape)  # (B, D, h, w)
    return reference.decode(quant, force_not_quantize=True).sample


def tiny_janus():
    from transformers import JanusVQVAE, JanusVQVAEConfig

    config = JanusVQVAEConfig(embed_dim=8, num_embeddings=CODEBOOK, latent_channels=32,
                              base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                              num_patches=8, projection_dim=16, image_token_embed_dim=16)  # fmt: skip
    return perturb_(JanusVQVAE(config), seed=3)
