"""The GPT prior: a decoder-only transformer over `[text tokens][BOI][image codes]`.

Design (issue 4, item 3):
- Pre-norm blocks (RMSNorm or LayerNorm), a SwiGLU or GELU MLP, one fused qkv projection and
  `F.scaled_dot_product_attention`; no biases (LlamaGen `gpt.py`).
- Text and image tokens have their own embeddings and output heads. The image head has exactly
  `codebook_size` outputs, so an image position can never produce a text id. With
  `tie_image_embeddings` the head reuses the image embedding's code rows (Press & Wolf 2017).
- Positions: 1D RoPE for the text, 2D RoPE (row, column) for the image grid, with real
  positions for the whole prefix, unlike LlamaGen (prior/rope.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from codegrid.io import (
    config_from_dict,
    load_model_folder,
    load_state_dict_strict,
    save_model_folder,
)
from prior.cache import KVCache
from prior.distinct_text import image_hidden
from prior.layers import Block, CodeFeatureEmbedding, Projection, apply_dropout, make_norm
from prior.rope import rope_table

MLP_KINDS = ("swiglu", "gelu")
NORM_KINDS = ("rmsnorm", "layernorm")
TEXT_ATTENTION = ("causal", "self")


@dataclass
class PriorConfig:
    """Architecture of the prior; saved as `config.json` beside `model.safetensors`.

    `text_pad_id` is the pad id of the text tokenizer: pad targets are ignored by the text loss.
    The loss is `image_loss_weight * image_loss + text_loss_weight * text_loss`; DALL-E used 7/8
    and 1/8. A text head exists only when `text_loss_weight > 0`. For SwiGLU the hidden width is
    `2/3 * mlp_ratio * d_model` rounded up to `mlp_multiple_of` (LlamaGen: 8/3 d, multiple 256).
    `tie_image_embeddings`: the image logits are `hidden @ E[:codebook_size].T` with E the image
    embedding (GPT-2 ties its token embedding the same way; LlamaGen does not tie).
    `code_feature_dim` > 0: every code also has a fixed feature vector of this length (for
    example its mean decoded f x f patch, `scripts/common/code_features.py`), held in the
    weights; a code's embedding is its free row plus a learned MLP of its features
    (`CodeFeatureEmbedding`). `code_feature_groups`: sizes of consecutive groups of those
    features (summing to `code_feature_dim`), each with its own MLP, the embeddings summed;
    empty means one group.
    `text_attention`: "causal" (GPT: a text token attends to the ones before it) or "self" (a
    text token attends to itself only, so its hidden state is a function of the word alone and
    image positions read each word unmixed; see `Prior.attention_mask`). With "self" and
    `text_loss_weight` > 0 the text head predicts each next token from the current one alone.
    """

    text_vocab_size: int = 512
    text_length: int = 16
    codebook_size: int = 256
    image_grid: tuple[int, int] = (8, 8)
    d_model: int = 192
    num_layers: int = 4
    num_heads: int = 4
    mlp: str = "swiglu"
    mlp_ratio: float = 4.0
    mlp_multiple_of: int = 64
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    text_loss_weight: float = 0.0
    image_loss_weight: float = 1.0
    text_pad_id: int = 0
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_image_embeddings: bool = False
    code_feature_dim: int = 0
    code_feature_groups: tuple[int, ...] = ()
    text_attention: str = "causal"

    def __post_init__(self) -> None:
        # Lists (from JSON) become tuples; anything else is left for validate() to name.
        if isinstance(self.image_grid, list | tuple):
            self.image_grid = tuple(self.image_grid)
        if isinstance(self.code_feature_groups, list | tuple):
            self.code_feature_groups = tuple(self.code_feature_groups)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""
        for name in ("text_vocab_size", "codebook_size", "d_model", "num_layers", "num_heads"):
            _require(self, name, _positive_int(getattr(self, name)), "an int >= 1")
        grid, heads = self.image_grid, self.num_heads
        groups, features = self.code_feature_groups, self.code_feature_dim
        checks = [
            (
                "text_length",
                lambda: _positive_int(self.text_length) and self.text_length >= 2,
                "an int >= 2 (room for BOS and EOS)",
            ),
            ("image_grid", lambda: _valid_grid(grid), "a tuple (h, w) of ints >= 1"),
            ("d_model", lambda: self.d_model % heads == 0, f"a multiple of num_heads={heads}"),
            ("num_heads", lambda: self.head_dim % 4 == 0, "a head_dim divisible by 4 (2D RoPE)"),
            ("mlp", lambda: self.mlp in MLP_KINDS, MLP_KINDS),
            ("norm", lambda: self.norm in NORM_KINDS, NORM_KINDS),
            ("text_attention", lambda: self.text_attention in TEXT_ATTENTION, TEXT_ATTENTION),
            ("mlp_multiple_of", lambda: _positive_int(self.mlp_multiple_of), "an int >= 1"),
            ("dropout", lambda: 0.0 <= self.dropout < 1.0, "[0, 1)"),
            ("code_feature_dim", lambda: _non_negative_int(self.code_feature_dim), "an int >= 0"),
            (
                "code_feature_groups",
                lambda: _valid_groups(groups, features),
                f"ints >= 1 summing to {features}",
            ),
            ("text_loss_weight", lambda: self.text_loss_weight >= 0, ">= 0"),
            ("image_loss_weight", lambda: self.image_loss_weight > 0, "> 0"),
            ("text_pad_id", lambda: 0 <= self.text_pad_id < self.text_vocab_size, "< vocab size"),
        ]
        checks += [(name, lambda n=name: getattr(self, n) > 0, "> 0") for name in _POSITIVE]
        for name, check, allowed in checks:
            _require(self, name, _holds(check), allowed)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> PriorConfig:
        """A preset from `PRESETS` with fields overridden; unknown names raise ValueError."""
        if name not in PRESETS:
            raise ValueError(f"unknown prior preset {name!r}; allowed presets: {sorted(PRESETS)}")
        return config_from_dict(cls, {**PRESETS[name], **overrides}, source=f"preset {name!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def sequence_length(self) -> int:
        """Input length in training: text, BOI and all codes but the last."""
        return self.text_length + self.num_image_tokens

    @property
    def mlp_hidden(self) -> int:
        hidden = self.mlp_ratio * self.d_model
        if self.mlp == "swiglu":
            hidden = 2 * hidden / 3
        return self.mlp_multiple_of * math.ceil(int(hidden) / self.mlp_multiple_of)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_grid(grid) -> bool:
    """A tuple of two ints >= 1."""
    return isinstance(grid, tuple) and len(grid) == 2 and all(map(_positive_int, grid))


def _valid_groups(groups, total) -> bool:
    """Empty (one group), or sizes >= 1 that add up to `total` features."""
    if not isinstance(groups, tuple):
        return False
    return not groups or (all(map(_positive_int, groups)) and sum(groups) == total)


def _holds(check) -> bool:
    """`check()`, with a value of the wrong type (a TypeError inside it) counting as invalid."""
    try:
        return bool(check())
    except TypeError:
        return False


def _require(config: PriorConfig, field: str, condition: bool, allowed) -> None:
    if not condition:
        value = getattr(config, field)
        raise ValueError(f"PriorConfig.{field}={value!r} is invalid; allowed: {allowed}")


_POSITIVE = ("mlp_ratio", "rope_theta", "init_std", "norm_eps")


_LARGE = dict(codebook_size=16384, image_grid=(16, 16), text_length=128, text_vocab_size=32128)
_LARGE.update(dropout=0.1, mlp_multiple_of=256)
PRESETS: dict[str, dict] = {
    # Sized like the 1.9M-parameter prior of the project's CPU calibration study on 32-pixel
    # Shapes (4 layers, d 192, 4 heads); with 1024 codes and 512 text ids it has 2.1M.
    # LayerNorm: its fused CPU kernel made training steps ~10% faster than RMSNorm (measured).
    # Tied image head: on the demo's codes, 4.3 minutes reached the validation loss that the
    # untied head needed 12 minutes for (1.45 nats; docs/experiments.md, "The prior's head,
    # schedule and sampling").
    "cpu-tiny": dict(
        d_model=192, num_layers=4, num_heads=4, norm="layernorm", tie_image_embeddings=True
    ),
    # Roughly LlamaGen GPT-B / L / XL (Sun et al. 2024, table of model sizes).
    "B": dict(_LARGE, d_model=768, num_layers=12, num_heads=12),
    "L": dict(_LARGE, d_model=1024, num_layers=24, num_heads=16),
    "XL": dict(_LARGE, d_model=1280, num_layers=36, num_heads=20),
}


class PriorOutput(NamedTuple):
    """Losses in nats per token; `text_loss` is None without a text head.

    image_logits: (B, h*w, codebook_size) fp32; entry j predicts image code j.
    """

    loss: torch.Tensor
    image_loss: torch.Tensor
    text_loss: torch.Tensor | None
    image_logits: torch.Tensor


class Prior(nn.Module):
    """Decoder-only transformer; see the module docstring for the layout and positions."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        self.boi_id = config.codebook_size  # the image embedding's extra last row
        self.text_embedding = nn.Embedding(config.text_vocab_size, config.d_model)
        self.image_embedding = nn.Embedding(config.codebook_size + 1, config.d_model)
        self.code_features = None
        if config.code_feature_dim > 0:
            self.code_features = CodeFeatureEmbedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = make_norm(config)
        self.image_head = None
        if not config.tie_image_embeddings:
            self.image_head = Projection(config.d_model, config.codebook_size)
        self.text_head = None
        if config.text_loss_weight > 0:
            self.text_head = Projection(config.d_model, config.text_vocab_size)
        self.register_buffer("rope", rope_table(config), persistent=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std); residual projections scaled by 1/sqrt(2 * layers) (GPT-2); an untied
        image head starts at zero, so the first loss is exactly ln(codebook_size) (LlamaGen);
        with code features the codes' free rows start at zero."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, Projection | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.RMSNorm | nn.LayerNorm):
                module.reset_parameters()
        for block in self.blocks:
            for weight in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(weight, std=std / math.sqrt(2 * self.config.num_layers))
        if self.image_head is not None:
            nn.init.zeros_(self.image_head.weight)
        if self.code_features is not None:
            # Codes start as the embedding of their features; the free rows learn only what the
            # features do not tell apart (a lower validation loss than random rows, measured).
            with torch.no_grad():
                self.image_embedding.weight[: self.config.codebook_size].zero_()

    def _apply(self, fn, recurse=True):
        # Rebuild the rotation table after .to()/.half()/.cuda(): it stays fp32 on the weights'
        # device, so positions never lose precision to a bf16 cast.
        super()._apply(fn, recurse)
        self.rope = rope_table(self.config).to(self.image_embedding.weight.device)
        return self

    def backbone(self, x, start: int = 0, cache: KVCache | None = None, dropout: float = 0.0):
        """Embedded inputs x (B, L, D) at positions start..start+L-1 -> normed hidden (B, L, D).

        With `gradient_checkpointing` and grad enabled the blocks are checkpointed, which
        cannot fill a KV cache: passing `cache` then raises ValueError.
        """
        length = x.shape[1]
        rotations = self.rope[start : start + length]  # (L, Dh/2, 2)
        # A one-token step attends to the whole cached prefix under either text_attention.
        mask = None
        if self.config.text_attention == "self" and length > 1:
            mask = self.attention_mask(length, x.device)  # (L, L)
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        if use_checkpoint and cache is not None:
            raise ValueError(
                "a KV cache was passed with gradient_checkpointing=True and grad enabled; the "
                "checkpointed blocks cannot fill it. Run cached calls under torch.no_grad() or "
                "torch.inference_mode() (as prior.generate does), or set "
                "prior.gradient_checkpointing = False"
            )
        for index, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layer(index)
            if use_checkpoint:
                x = checkpoint(block, x, rotations, None, 0, dropout, mask, use_reentrant=False)
            else:
                x = block(x, rotations, layer_cache, start, dropout, mask)
        return self.norm(x)

    def attention_mask(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """(length, length) bool, True where query i may attend to key j, for a call starting
        at position 0 with text_attention="self": causal, except that a text position attends to
        itself only. Image positions (BOI on) see every text token and the codes before them.

        Why: under a causal mask the shape word's hidden state has read the colour word before
        it, so a colour-shape pair the training captions never pair gets a representation the
        prior never saw; with words kept apart, image positions combine known parts. On Shapes'
        held-out pairs this drew 56.5-64.5% against 53.0-59.5% (docs/experiments.md)."""
        positions = torch.arange(length, device=device)
        causal = positions[None, :] <= positions[:, None]  # (L, L)
        text = positions < self.config.text_length  # (L,)
        mixed_text = text[:, None] & text[None, :] & (positions[:, None] != positions[None, :])
        return causal & ~mixed_text

    def image_table(self) -> torch.Tensor:
        """Image input embeddings (V + 1, D), the last row BOI; with code features, each code's
        row is its free row plus the embedding of its features. Compute it once per forward
        or generate call and pass it on."""
        table = self.image_embedding.weight
        if self.code_features is None:
            return table
        return table + F.pad(self.code_features(), (0, 0, 0, 1))  # BOI has no features

    def image_logits(self, hidden: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Normed hidden states (..., D) -> fp32 logits over the codes (..., codebook_size)."""
        if self.image_head is None:
            table = self.image_table() if table is None else table
            codes = table[: self.config.codebook_size]  # (V, D), no BOI
            return (hidden @ codes.T).float()  # (..., V)
        return self.image_head(hidden).float()  # (..., V)

    def embed(
        self, text_ids: torch.Tensor, image_inputs: torch.Tensor, table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text ids (B, T) and image input ids (B, n) in [0, codebook_size] (the last is BOI)
        -> (B, T + n, D); `table` is `image_table()` when the caller has it already."""
        text = self.text_embedding(text_ids)  # (B, T, D)
        table = self.image_table() if table is None else table
        image = F.embedding(image_inputs, table)  # (B, n, D)
        return torch.cat([text, image], dim=1)  # (B, T + n, D)

    def forward(self, text_ids: torch.Tensor, image_codes: torch.Tensor) -> PriorOutput:
        """Teacher-forced losses; dropout (config.dropout) only in training mode.

        Args:
            text_ids: (B, text_length) long in [0, text_vocab_size).
            image_codes: (B, h, w) or (B, h*w) long in [0, codebook_size).
        """
        codes = self.check_inputs(text_ids, image_codes)  # (B, N)
        cfg, text_length = self.config, text_ids.shape[1]
        dropout = cfg.dropout if self.training else 0.0
        image_logits, hidden = self._teacher_forced(text_ids, codes, dropout)  # (B, N, V)
        # (B, N, V) -> (B*N, V) logits against (B, N) -> (B*N,) targets
        image_loss = F.cross_entropy(image_logits.flatten(0, 1), codes.flatten())
        loss, text_loss = cfg.image_loss_weight * image_loss, None
        if self.text_head is not None:
            # Position i predicts text token i + 1; the last text position would predict BOI.
            text_logits = self.text_head(hidden[:, : text_length - 1]).float()  # (B, T-1, Vt)
            targets = text_ids[:, 1:].flatten()  # (B*(T-1),)
            summed = F.cross_entropy(
                text_logits.flatten(0, 1),  # (B*(T-1), Vt)
                targets,
                ignore_index=cfg.text_pad_id,
                reduction="sum",
            )
            text_loss = summed / (targets != cfg.text_pad_id).sum().clamp(min=1)
            loss = loss + cfg.text_loss_weight * text_loss
        return PriorOutput(loss, image_loss, text_loss, image_logits)

    def teacher_forced_image_logits(
        self, text_ids: torch.Tensor, image_codes: torch.Tensor
    ) -> torch.Tensor:
        """The image logits of `forward` without dropout, in either mode; nothing is mutated.

        text_ids (B, text_length), image_codes (B, h, w) or (B, h*w) -> fp32 (B, h*w,
        codebook_size), entry j predicting code j.
        """
        codes = self.check_inputs(text_ids, image_codes)  # (B, N)
        return self._teacher_forced(text_ids, codes, 0.0)[0]  # (B, N, V)

    def _teacher_forced(self, text_ids: torch.Tensor, codes: torch.Tensor, dropout: float):
        """Checked text ids (B, T) and codes (B, N) -> (image logits (B, N, V) fp32, the normed
        hidden states (B, T + N, D), or None on the distinct-text path)."""
        boi = codes.new_full((codes.shape[0], 1), self.boi_id)
        image_inputs = torch.cat([boi, codes[:, :-1]], dim=1)  # (B, N)
        table = self.image_table()  # (V + 1, D)
        if self.config.text_attention == "self" and self.text_head is None and dropout == 0:
            # Each distinct text token once: the same logits, fewer rows (prior/distinct_text.py).
            image = F.embedding(image_inputs, table)  # (B, N, D)
            return self.image_logits(image_hidden(self, text_ids, image), table), None
        inputs = apply_dropout(self.embed(text_ids, image_inputs, table), dropout)  # (B, T+N, D)
        hidden = self.backbone(inputs, 0, None, dropout)  # (B, T + N, D)
        return self.image_logits(hidden[:, text_ids.shape[1] :], table), hidden  # (B, N, V)

    def check_inputs(self, text_ids: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
        """Validate shapes, dtypes and id ranges; returns the codes flattened to (B, h*w)."""
        cfg = self.config
        check_text_ids(text_ids, cfg)
        height, width = cfg.image_grid
        if image_codes.shape[1:] == (height, width):
            image_codes = image_codes.flatten(1)  # (B, N)
        if image_codes.dim() != 2 or image_codes.shape != (text_ids.shape[0], height * width):
            raise ValueError(
                f"image_codes has shape {tuple(image_codes.shape)}; expected "
                f"({text_ids.shape[0]}, {height}, {width}) or ({text_ids.shape[0]}, {height * width})"
            )
        check_id_range(image_codes, cfg.codebook_size, "image_codes", "codebook_size")
        return image_codes

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` atomically (codegrid.io)."""
        return save_model_folder(directory, self.config, self.state_dict(), type(self).__name__)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Prior:
        """Load a folder written by `save_pretrained`; every weight key is checked. Returns the
        model in eval mode (dropout off), as diffusers' and `VQGAN.from_pretrained` do; call
        `.train()` to fine-tune it."""
        config, state_dict = load_model_folder(directory, PriorConfig)
        model = cls(config)
        load_state_dict_strict(model, state_dict, source=str(directory))
        return model.to(device).eval()


def check_text_ids(text_ids: torch.Tensor, config: PriorConfig) -> None:
    """Raise ValueError unless text_ids is a (B, text_length) long tensor of valid ids."""
    if text_ids.dim() != 2 or text_ids.shape[1] != config.text_length:
        raise ValueError(
            f"text_ids has shape {tuple(text_ids.shape)}; expected (B, text_length="
            f"{config.text_length}) as produced by TextTokenizer"
        )
    check_id_range(text_ids, config.text_vocab_size, "text_ids", "text_vocab_size")


def check_id_range(ids: torch.Tensor, size: int, name: str, size_name: str) -> None:
    """Raise ValueError unless `ids` (any shape) is torch.long with every value in
    [0, size); `name` and `size_name` name the tensor and the bound in the message."""
    if ids.dtype != torch.long:
        raise ValueError(f"{name} must be torch.long, got {ids.dtype}")
    # Value checks need a host sync and break torch.compile graphs; compiled training skips them.
    if torch.compiler.is_compiling() or not ids.numel():
        return
    if ids.min() < 0 or ids.max() >= size:
        raise ValueError(
            f"{name} holds ids in [{int(ids.min())}, {int(ids.max())}]; allowed: "
            f"[0, {size_name}={size})"
        )
