"""The prior's layers: the projection, attention, MLP and block of the transformer, and the
embedding of fixed per-code features. `prior.model.Prior` assembles them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from codegrid.precision import scaled_dot_product_attention as attend
from prior.rope import apply_rope

if TYPE_CHECKING:
    from prior.model import PriorConfig


def make_norm(config: PriorConfig) -> nn.Module:
    """The pre-norm of `config.norm` over the last dim: (..., d_model) -> (..., d_model)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def apply_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with probability p in [0, 1), any shape -> the same shape; p = 0 returns x.

    Always active when p > 0: callers pass p = 0 outside training (`Prior.forward` does).
    """
    return F.dropout(x, p=p, training=True) if p > 0 else x


class Projection(nn.Module):
    """`x @ weight` with the weight stored (in_features, out_features), the layout of GPT-2's
    Conv1D. A decode step multiplies a few rows by each weight: on 2 CPU cores the benchmark's
    CFG sampling call (d=512, 16 rows) ran 8% faster than with nn.Linear's (out, in) layout
    (an isolated 16-row matmul with its weight in cache, 1.3-2.4x); training is unchanged."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight  # (..., in) -> (..., out)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, RoPE on queries and keys and
    an optional KV cache; no biases. x (B, L, D) -> (B, L, D), H heads of Dh = D / H."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = Projection(config.d_model, 3 * config.d_model)
        self.proj = Projection(config.d_model, config.d_model)

    def forward(self, x, rotations, cache=None, start: int = 0, mask=None) -> torch.Tensor:
        """x (B, L, D) at positions start..start+L-1 -> (B, L, D).

        With a cache (keys, values each (B, H, T_max, Dh)) the new keys and values are written
        at [start, start + L) and attention covers the prefix [0, start + L). A multi-token call
        must start at 0, so the causal mask stays square. `mask`: None for causal attention, or
        a (L, L) bool mask (True = may attend) replacing it (`Prior.attention_mask`).
        """
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)  # (B, L, 3, H, Dh)
        qk = apply_rope(qkv[:, :, :2], rotations).permute(2, 0, 3, 1, 4)  # (2, B, H, L, Dh)
        query, key = qk.unbind(0)  # (B, H, L, Dh) each
        value = qkv[:, :, 2].transpose(1, 2)  # (B, H, L, Dh)
        if cache is not None:
            if length > 1 and start != 0:
                raise ValueError(f"a multi-token cached call must start at 0, got start={start}")
            key_cache, value_cache = cache
            key_cache[:, :, start : start + length] = key
            value_cache[:, :, start : start + length] = value
            key = key_cache[:, :, : start + length]  # (B, H, S, Dh)
            value = value_cache[:, :, : start + length]  # (B, H, S, Dh)
        out = attend(query, key, value, is_causal=length > 1 and mask is None, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))  # (B, L, D)


class MLP(nn.Module):
    """SwiGLU (fused gate and up projections) or GELU MLP: (..., D) -> hidden (..., mlp_hidden)
    -> (..., D); no biases."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.gated = config.mlp == "swiglu"
        hidden = config.mlp_hidden
        # SwiGLU's gate and up projections are fused into one matmul (Shazeer 2020, GLU variants).
        self.up = Projection(config.d_model, 2 * hidden if self.gated else hidden)
        self.down = Projection(hidden, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.up(x)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden, approximate="tanh")  # GPT-2's GELU
        return self.down(hidden)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x)), with dropout on
    each residual branch. x (B, L, D) -> (B, L, D); `cache` is one layer's (keys, values),
    each (B, H, T_max, Dh), written at [start, start + L) (see `Attention.forward`)."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = make_norm(config), make_norm(config)
        self.attn, self.mlp = Attention(config), MLP(config)

    def forward(self, x, rotations, cache=None, start: int = 0, dropout: float = 0.0, mask=None):
        x = x + apply_dropout(self.attn(self.attn_norm(x), rotations, cache, start, mask), dropout)
        return x + apply_dropout(self.mlp(self.mlp_norm(x)), dropout)


class CodeFeatureEmbedding(nn.Module):
    """Embeds a fixed feature vector per code, `features` (V, F) (a buffer, saved with the
    weights); `forward()` returns (V, D).

    The free embedding rows of a colour-and-shape-specific code learn only from the few captions
    it appears under, so a colour never seen with a shape has no codes the prior would draw for
    it. When the features describe what a code looks like (its mean decoded patch), codes that
    look alike share this part of their embedding, and what the prior learns about one code
    carries over to others of the same colour or outline.

    The features may come in groups (`config.code_feature_groups`, consecutive sizes summing to
    F): each group has its own GELU MLP (F_g -> D -> D) and the embeddings are summed, so no
    hidden unit sees two groups. With a code's outline and its colours as separate groups (the
    "matte" features, `scripts/common/code_features.py`), a code's tied logit is a sum of an
    outline score and a colour score: the prior can draw the outline of one caption word in the
    colour of another although it never saw the two together. On Shapes' held-out colour-shape
    pairs that raised all correct from 34.0-55.0% to 58.5-65.5% at equal steps, on the codes of
    three demo runs (docs/experiments.md); one MLP over the same features mixes them again
    (50.0%). The groups are one block-diagonal `up` (F -> G*D, a fixed mask zeroes the weights
    across groups) and one `down` (G*D -> D), whose product is the sum of the per-group MLPs;
    with one group this is the MLP F -> D -> D.
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        groups = config.code_feature_groups or (config.code_feature_dim,)
        features = torch.zeros(config.codebook_size, config.code_feature_dim)
        self.register_buffer("features", features)
        width = config.d_model
        self.up = Projection(config.code_feature_dim, len(groups) * width)
        self.down = Projection(len(groups) * width, width)
        mask = torch.zeros(config.code_feature_dim, len(groups) * width)
        starts = [sum(groups[:index]) for index in range(len(groups))]
        for index, (start, size) in enumerate(zip(starts, groups)):
            mask[start : start + size, index * width : (index + 1) * width] = 1
        self.register_buffer("mask", mask, persistent=False)

    def forward(self) -> torch.Tensor:
        weight = self.up.weight * self.mask.to(self.up.weight.dtype)  # (F, G*D) block-diagonal
        features = self.features.to(weight.dtype)  # (V, F)
        return self.down(F.gelu(features @ weight))  # (V, D)
