"""Encoder and decoder of the VQGAN, laid out like taming-transformers.

The architecture is the DDPM UNet halves without a timestep embedding (Esser et al. 2021,
taming `taming/modules/diffusionmodules/model.py`). Parameter names match taming's state_dict
one to one, so taming, LlamaGen (after renaming) and diffusers checkpoints load without
`strict=False`:

    encoder.conv_in, encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}, encoder.down.{i}.downsample.conv,
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out,
    decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j} (num_res_blocks + 1 per level),
    decoder.up.{i}.attn.{j}, decoder.up.{i}.upsample.conv, decoder.norm_out, decoder.conv_out

`decoder.up[0]` is the highest resolution, as in taming (which builds the list with `insert(0)`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from codegrid.precision import cpu_low_precision, scaled_dot_product_attention

NORM_GROUPS = 32  # taming's GroupNorm(32, eps=1e-6)


NORMS = ("group", "layer", "channel", "none")


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each position: (B, C, H, W) -> (B, C, H, W).

    Unlike GroupNorm, whose statistics span the whole image, every output depends on its own
    position only, so a patch's latent does not change with what the rest of the image holds
    (the per-position LayerNorm of ConvNeXt, Liu et al. 2022). Same parameter names and shapes
    as GroupNorm's (`weight`, `bias`, both (C,)).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        h = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        h = F.layer_norm(h, (channels,), self.weight, self.bias, self.eps)
        return h.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, computed in fp32 on CPU for bf16 and fp16 inputs or under autocast, returned
    in the input's dtype.

    CUDA's autocast already runs group_norm in fp32; CPU's does not, and its bf16 kernel was
    the slowest op of the demo's tokenizer step (a bf16 step took 0.135 s against 0.090 s in
    fp32 on 2 cores with AMX; 0.066 s with this fp32 norm and bf16 convolutions, measured for
    this project). Same parameters and keys as nn.GroupNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_low_precision(x):
            return super().forward(x)  # CUDA's autocast already computes it in fp32
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        # Under CPU autocast oneDNN's bf16 convolutions return channels-last tensors, on which
        # group_norm's kernels were 4-5x slower than on NCHW ones (fwd + bwd of (16, 32, 32, 32):
        # 1.42 ms against 0.27 ms on 2 cores): normalise an NCHW copy, hand back x's layout.
        layout = torch.channels_last if channels_last(x) else torch.contiguous_format
        with torch.autocast("cpu", enabled=False):
            h = F.group_norm(x.float().contiguous(), self.num_groups, weight, bias, self.eps)
        return h.to(x.dtype).contiguous(memory_format=layout)


def channels_last(x: torch.Tensor) -> bool:
    """True for a 4D tensor laid out channels-last (and not also NCHW-contiguous)."""
    return (
        x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def normalization(channels: int, norm: str = "group") -> nn.Module:
    """`norm="group"`: GroupNorm with 32 groups when `channels` allows it, else the largest
    divisor below 32 (taming always uses 32; narrow CPU models of 16 or 48 channels need fewer).
    `norm="layer"`: GroupNorm with one group, i.e. one mean and variance over all channels and
    positions of an image (Wu & He 2018: GN with G = 1 is LayerNorm); same keys as "group".
    `norm="channel"`: `ChannelNorm`, which is spatially local. `norm="none"`: an identity (the
    blocks then have no norm keys).

    With one channel per group, as in the CPU presets' 16- and 32-channel decoders, GroupNorm is
    instance normalisation: it removes each channel's image-wide mean and scale, which the
    decoder must put back from what the codes say (StyleGAN2 replaced such per-feature-map
    normalisation for the artefacts it caused, Karras et al. 2020). On Shapes, reconstructions
    of some runs came back with tinted backgrounds; one group keeps every channel's mean
    relative to the others (docs/experiments.md).
    """
    if norm == "channel":
        return ChannelNorm(channels)
    if norm == "none":
        return nn.Identity()
    groups = 1 if norm == "layer" else math.gcd(NORM_GROUPS, channels)
    return GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """(norm -> swish -> conv3x3) x 2 plus a residual; 1x1 `nin_shortcut` if channels change.

    (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, norm: str = "group"
    ) -> None:
        super().__init__()
        self.norm1 = normalization(in_channels, norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalization(out_channels, norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without autograd, swish and the residual add write into tensors nobody reads again:
        # one allocation and one memory pass fewer each (same values).
        inplace = not torch.is_grad_enabled()
        h = self.norm1(x)
        # With norm="none" norm1 hands back x itself, which the residual below still reads.
        h = self.conv1(F.silu(h, inplace=inplace and h is not x))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return h.add_(x) if inplace else x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with 1x1 q, k, v and proj_out convs.

    (B, C, H, W) -> (B, C, H, W). The softmax scale is C ** -0.5, SDPA's default for head dim C.
    """

    def __init__(self, channels: int, norm: str = "group") -> None:
        super().__init__()
        self.norm = normalization(channels, norm)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        # contiguous(): SDPA's fused kernels (flash, memory-efficient) need the last dimension
        # at stride 1 on every device and otherwise fall back to the math kernel; the copy is
        # small. On 2 CPU cores, at the demo's mid block (B 32, C 32, 8x8) attention forward +
        # backward took 1.0 ms against 2.0 ms for the transposed views.
        q = self.q(h).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # (B, 1, HW, C)
        k = self.k(h).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # (B, 1, HW, C)
        v = self.v(h).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # (B, 1, HW, C)
        h = scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), fp32 on CPU in bf16
        h = h.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 conv3x3 after asymmetric zero padding (0, 1, 0, 1), as in taming. (B,C,H,W) ->
    (B,C,H/2,W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3. (B,C,H,W) -> (B,C,2H,2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` and `attn` lists plus an optional resampler (taming names)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    @classmethod
    def build(
        cls, block_in: int, block_out: int, count: int, attention: bool, dropout: float, norm: str
    ) -> _Level:
        """`count` ResnetBlocks (block_in -> block_out, then block_out -> block_out), each
        followed by an AttnBlock when `attention`; created in taming's order, so a seed gives
        the same initial weights."""
        blocks, attns = [], []
        for index in range(count):
            channels_in = block_in if index == 0 else block_out
            blocks.append(ResnetBlock(channels_in, block_out, dropout, norm))
            if attention:
                attns.append(AttnBlock(block_out, norm))
        return cls(blocks, attns)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[index](h)
        return h


class _Mid(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (taming always has the
    attention; `attention=False` replaces it by the identity)."""

    def __init__(self, channels: int, dropout: float, attention: bool, norm: str) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm)
        self.attn_1 = AttnBlock(channels, norm) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, norm)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, z_channels, H/f, W/f), f = 2**(len(ch_mult)-1).

    Attention follows each ResnetBlock of every level whose resolution (computed from the
    configured `resolution`) is in `attn_resolutions`.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        mid_attention: bool = True,
        norm: str = "group",
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        current_resolution, block_in = resolution, ch
        for level, multiplier in enumerate(ch_mult):
            block_out = ch * multiplier
            attention = current_resolution in attn_resolutions
            stage = _Level.build(block_in, block_out, num_res_blocks, attention, dropout, norm)
            block_in = block_out
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                current_resolution //= 2
            self.down.append(stage)
        self.mid = _Mid(block_in, dropout, mid_attention, norm)
        self.norm_out = normalization(block_in, norm)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage.run(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchEncoder(nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, z_channels, H/f, W/f), each latent a function of
    its own f x f patch only.

    A patchify convolution (kernel = stride = f, as ViT's patch embedding, Dosovitskiy et al.
    2021) followed by per-position residual MLP blocks (1x1 convolutions, `ChannelNorm`). The
    receptive field of a code is exactly its patch: identical patches always get the same code,
    whatever the rest of the image holds, so plain background has one code per colour and an
    object's codes do not change with the object's other parts. The decoder keeps its full
    receptive field and blends neighbouring codes.
    """

    def __init__(
        self, *, in_channels: int, factor: int, hidden: int, num_blocks: int, z_channels: int
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden, factor, stride=factor)
        self.blocks = nn.ModuleList(_PatchBlock(hidden) for _ in range(num_blocks))
        self.norm_out = ChannelNorm(hidden)
        self.conv_out = nn.Conv2d(hidden, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, hidden, H/f, W/f)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _PatchBlock(nn.Module):
    """Pre-norm residual MLP on each position: x + W2 silu(W1 norm(x)), hidden 2x wide."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelNorm(channels)
        self.fc1 = nn.Conv2d(channels, 2 * channels, 1)
        self.fc2 = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.silu(self.fc1(self.norm(x))))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> images (B, out_channels, h*f, w*f), unbounded (no tanh).

    Levels run from the lowest resolution (`up[-1]`) to the highest (`up[0]`), each with
    num_res_blocks + 1 ResnetBlocks.
    """

    def __init__(
        self,
        *,
        out_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        mid_attention: bool = True,
        norm: str = "group",
    ) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, mid_attention, norm)
        stages: list[_Level] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            attention = current_resolution in attn_resolutions
            stage = _Level.build(block_in, block_out, num_res_blocks + 1, attention, dropout, norm)
            block_in = block_out
            if level != 0:
                stage.upsample = Upsample(block_in)
                current_resolution *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = normalization(block_in, norm)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage.run(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
