"""The teacher-forced pass with `text_attention="self"`, computing each distinct text token once.

When a text token attends to itself only, its attention output is its own value vector (one key,
softmax weight 1; RoPE turns a query and its own key by the same angle), so its hidden state in
every block is a function of the token id alone: not of its position, nor of the other words.
A batch of 16 Shapes captions holds 320 text positions but only about 40 distinct ids. This pass
runs the blocks over the distinct ids once and over the image positions, whose queries read the
text keys and values gathered back to their positions. It gives the logits of the full pass
(`Prior.backbone` over the whole sequence; tests/test_prior.py checks both and their gradients)
with about a fifth fewer rows per matmul in training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from codegrid.precision import scaled_dot_product_attention as attend
from prior.rope import apply_rope

if TYPE_CHECKING:
    from prior.layers import Block
    from prior.model import Prior


def image_hidden(prior: Prior, text_ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Text ids (B, T) and embedded image inputs (B, N, D) (BOI first) -> the normed hidden
    states of the image positions (B, N, D), equal to `prior.backbone` over the whole sequence
    sliced at T, for `text_attention="self"` without dropout."""
    distinct, index = torch.unique(text_ids, return_inverse=True)  # (U,), (B, T)
    text = prior.text_embedding(distinct)  # (U, D)
    length = text_ids.shape[1]
    rotations = prior.rope[: length + image.shape[1]]  # (T + N, Dh/2, 2)
    # Image query j (position T + j) reads every text key and the image keys up to its own.
    positions = torch.arange(image.shape[1], device=image.device)
    causal = positions[None, :] <= positions[:, None]  # (N, N)
    mask = torch.cat([causal.new_ones(image.shape[1], length), causal], dim=1)  # (N, T + N)
    use_checkpoint = prior.gradient_checkpointing and torch.is_grad_enabled()
    for block in prior.blocks:
        if use_checkpoint:
            text, image = checkpoint(
                block_step, block, text, image, index, rotations, mask, use_reentrant=False
            )
        else:
            text, image = block_step(block, text, image, index, rotations, mask)
    return prior.norm(image)


def block_step(
    block: Block,
    text: torch.Tensor,
    image: torch.Tensor,
    index: torch.Tensor,
    rotations: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block over the distinct text states (U, D) and the image states (B, N, D); `index`
    (B, T) maps each text position to its row of `text`. Returns both, updated."""
    attention = block.attn
    heads, head_dim = attention.num_heads, attention.head_dim
    (batch, count, dim), length = image.shape, index.shape[1]
    text_qkv = attention.qkv(block.attn_norm(text)).view(-1, 3, heads, head_dim)  # (U, 3, H, Dh)
    image_qkv = attention.qkv(block.attn_norm(image))
    image_qkv = image_qkv.view(batch, count, 3, heads, head_dim)  # (B, N, 3, H, Dh)
    text_key = apply_rope(text_qkv[index, 1:2], rotations[:length])  # (B, T, 1, H, Dh)
    image_qk = apply_rope(image_qkv[:, :, :2], rotations[length:])  # (B, N, 2, H, Dh)
    query = image_qk[:, :, 0].transpose(1, 2)  # (B, H, N, Dh)
    key = torch.cat([text_key[:, :, 0], image_qk[:, :, 1]], dim=1).transpose(1, 2)  # (B,H,T+N,Dh)
    value = torch.cat([text_qkv[index, 2], image_qkv[:, :, 2]], dim=1)  # (B, T + N, H, Dh)
    out = attend(query, key, value.transpose(1, 2), attn_mask=mask)  # (B, H, N, Dh)
    image = image + attention.proj(out.transpose(1, 2).reshape(batch, count, dim))  # (B, N, D)
    # A text token's attention output is its own value: one key, weight 1.
    text = text + attention.proj(text_qkv[:, 2].reshape(-1, dim))  # (U, D)
    text = text + block.mlp(block.mlp_norm(text))
    image = image + block.mlp(block.mlp_norm(image))
    return text, image
