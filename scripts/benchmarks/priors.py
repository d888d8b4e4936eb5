"""Model builders shared by the prior benchmarks: our Prior and the Hugging Face GPT-2 reference.

Shapes (issue 7): d_model 512, 8 layers, 8 heads, 32 text tokens, a 16x16 grid of 256 image
codes. Vocabularies: text 1024 ids, codebook 1024 codes. Our prior has separate text and image
embeddings and an image head of exactly `codebook_size` outputs; GPT-2 gets one shared
vocabulary of text + codebook + 1 (the BOI token) = 2049 ids and a full-vocabulary head.
"""

from __future__ import annotations

import torch
from torch import nn

from prior import Prior, PriorConfig
from prior.layers import Projection

TEXT_VOCAB = 1024
CODEBOOK = 1024
TEXT_LENGTH = 32
HF_VOCAB = TEXT_VOCAB + CODEBOOK + 1  # shared ids for text, codes and BOI


def prior_config(settings, grid: int = 16, **overrides) -> PriorConfig:
    """The benchmark prior (tiny in smoke mode) with an (grid x grid) image grid.

    Its blocks are GPT-2's (LayerNorm, a 4d GELU MLP) so that both sides of each ratio run the
    same architecture and the ratio measures the implementation. With the prior's default
    blocks (RMSNorm, SwiGLU) CFG sampling was 7% slower on this CPU (medians of three
    interleaved runs: 6.58 against 6.17 s): torch's CPU RMSNorm runs as several small kernels,
    LayerNorm as one.
    """
    dims = dict(d_model=512, num_layers=8, num_heads=8)
    vocab = dict(text_vocab_size=TEXT_VOCAB, codebook_size=CODEBOOK, text_length=TEXT_LENGTH)
    if settings.smoke:
        dims = dict(d_model=64, num_layers=2, num_heads=4)
        vocab = dict(text_vocab_size=64, codebook_size=64, text_length=8)
    blocks = dict(norm="layernorm", mlp="gelu")
    return PriorConfig(image_grid=(grid, grid), **{**blocks, **dims, **vocab, **overrides})


def build_prior(config: PriorConfig, seed: int, device="cpu") -> Prior:
    """A Prior with seeded random weights; an untied image head is re-drawn from N(0, 0.02)
    because its zero init would make every code equally likely (sampling cost does not depend on
    it, but equivalence checks are stronger with peaked distributions). A tied head already is
    the N(0, 0.02) embedding."""
    torch.manual_seed(seed)
    model = Prior(config)
    if model.image_head is not None:
        nn.init.normal_(model.image_head.weight, std=0.02)
    return model.to(device)


def random_text(config: PriorConfig, batch: int, seed: int, device="cpu") -> torch.Tensor:
    """(batch, text_length) long ids in [1, text_vocab_size); id 0 is treated as padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.text_vocab_size, (batch, config.text_length), generator=generator)
    return ids.to(device)


def hf_vocab(config: PriorConfig) -> int:
    """GPT-2's shared vocabulary: text ids, then codes, then BOI."""
    return config.text_vocab_size + config.codebook_size + 1


def build_gpt2(config: PriorConfig, seed: int, device="cpu"):
    """transformers' GPT2LMHeadModel with the prior's width, depth and heads, no dropout, and a
    shared vocabulary of text + codes + BOI. Imported lazily: `bench.py gpu` needs only torch."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_config = GPT2Config(
        vocab_size=hf_vocab(config),
        n_positions=config.sequence_length + 1,
        n_embd=config.d_model,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(hf_config).to(device)


def matmul_parameters(model: nn.Module) -> int:
    """Weights that take part in matmuls (every Projection or nn.Linear); embeddings are lookups."""
    layers = (Projection, nn.Linear)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, layers))


def block_parameters(config: PriorConfig) -> int:
    """Matmul weights of one block: qkv + proj (4 d^2) and the MLP (3 or 2 d * hidden)."""
    matrices = 3 if config.mlp == "swiglu" else 2
    return 4 * config.d_model**2 + matrices * config.d_model * config.mlp_hidden


def training_flops(config: PriorConfig, batch: int) -> tuple[float, str]:
    """FLOPs of one training step of our prior (forward + backward) and the formula.

    6 * N_blocks * tokens + 6 * N_head * image_tokens + 12 * L * d * T * tokens, with T the
    sequence length (PaLM, Chowdhery et al. 2022, appendix B; attention counted without the
    causal halving). The image head runs only at the image positions.
    """
    d_model, layers, length = config.d_model, config.num_layers, config.sequence_length
    n_blocks, n_head = layers * block_parameters(config), d_model * config.codebook_size
    tokens, image_tokens = batch * length, batch * config.num_image_tokens
    flops = (
        6 * n_blocks * tokens + 6 * n_head * image_tokens + 12 * layers * d_model * length * tokens
    )
    formula = (
        f"6*N_blocks*tokens + 6*N_head*image_tokens + 12*L*d*T*tokens with N_blocks={n_blocks}, "
        f"N_head={n_head}, L={layers}, d={d_model}, T={length}, tokens={tokens}"
    )
    return float(flops), formula


def decode_flops_per_token(config: PriorConfig, context: float) -> tuple[float, float]:
    """Forward FLOPs of one cached decode step for one row at `context` cached positions:
    (total, attention part). Attention: q.k and p.v, 2 * 2 * d * context per layer."""
    d_model, layers = config.d_model, config.num_layers
    dense = 2 * (layers * block_parameters(config) + d_model * config.codebook_size)
    attention = 4 * layers * d_model * context
    return float(dense + attention), float(attention)
