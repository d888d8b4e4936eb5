"""Quantizers: vector quantization (classic, l2-normalised, EMA, dead-code restart) and FSQ.

Every quantizer maps latents (B, D, h, w) to a straight-through quantized tensor of the same
shape, a scalar loss, integer codes (B, h, w) in [0, codebook_size), and per-batch statistics.
Distances and losses run in fp32 even under bf16 autocast. Codebook usage is accumulated over
a window (an epoch, a validation pass) by `forward` and read with `codebook_usage()`.

Under torch.distributed (DDP) the per-step code histograms and EMA sums are all-reduced, and
dead-code replacements are drawn on rank 0 and broadcast, so codebook buffers stay identical
on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    """quantized (B, D, h, w) fp32 with straight-through gradient; loss scalar fp32;
    indices (B, h, w) int64 in [0, codebook_size); stats: scalar tensors for logging."""

    quantized: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    stats: dict[str, torch.Tensor]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: 1 when one code is used, K when all K are equally used."""
    probs = counts.double() / counts.sum().clamp_min(1)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum()).float()


class _CodeUsage(nn.Module):
    """Counts code assignments made by `forward` since the last `reset_codebook_usage()`."""

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        # Not persistent: a statistic, not a weight, so it never reaches a checkpoint.
        self.register_buffer("usage_counts", torch.zeros(codebook_size, dtype=torch.long), False)

    def reset_codebook_usage(self) -> None:
        """Start a new usage window (call at the start of an epoch or validation pass)."""
        self.usage_counts.zero_()

    def codebook_usage(self, all_reduce: bool = False) -> dict[str, float]:
        """Usage over the window: `usage` = fraction of codes used at least once (0..1),
        `perplexity` = exp(entropy) of the code histogram (1..codebook_size), `count` =
        assignments seen. `all_reduce=True` sums the window over ranks (every rank must call)."""
        counts = self.usage_counts.clone()
        if all_reduce and _distributed():
            dist.all_reduce(counts)
        return {
            "usage": (counts > 0).float().mean().item(),
            "perplexity": _perplexity(counts).item(),
            "count": float(counts.sum().item()),
        }

    def _batch_stats(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"perplexity": _perplexity(counts), "batch_usage": (counts > 0).float().mean()}


def entropy_penalty(distances: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample entropy minus entropy of the mean assignment (LlamaGen; MAGVIT-v2, Yu et al.
    2023): low when each vector picks one code confidently and the batch spreads over codes.

    distances: (N, K) squared distances. Returns a scalar (can be negative)."""
    log_probs = F.log_softmax(-distances / temperature, dim=-1)  # (N, K)
    probs = log_probs.exp()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    mean_probs = probs.mean(0)  # (K,)
    batch_entropy = -(mean_probs * torch.log(mean_probs.clamp_min(1e-12))).sum()
    return sample_entropy - batch_entropy


RESTART_SOURCES = ("random", "error")


class VectorQuantizer(_CodeUsage):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    Loss (van den Oord et al. 2017): ||sg[z] - e||^2 + beta * ||z - sg[e]||^2. Taming's default
    `legacy=True` puts beta on the codebook term instead (taming issues #46, #57); we do not.

    Options (combinable):
      l2_normalize: z and codebook are l2-normalised before the lookup and the decoder receives
        the unit codebook vector (ViT-VQGAN, Yu et al. 2021; LlamaGen).
      ema: the codebook follows exponential moving averages of its assigned vectors, with Laplace
        smoothing (van den Oord et al. 2017 appendix; Razavi et al. 2019); it gets no gradient
        and the loss is only the commitment term.
      restart_dead_codes: a code unused for `restart_threshold` training forwards is replaced by
        an encoder output of the current batch: a random one (`restart_from="random"`, Dhariwal
        et al. 2020, Jukebox) or those farthest from their nearest code (`"error"`, the
        k-means++ idea of seeding where the error is largest, Arthur & Vassilvitskii 2007), which
        spends fewer codes on the densest content (plain background in Shapes).
      entropy_weight: adds `entropy_weight * entropy_penalty` (LlamaGen, MAGVIT-v2).
    """

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        *,
        beta: float = 0.25,
        l2_normalize: bool = False,
        ema: bool = False,
        ema_decay: float = 0.99,
        restart_dead_codes: bool = False,
        restart_threshold: int = 20,
        restart_from: str = "random",
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__(codebook_size)
        self.codebook_dim = codebook_dim
        self.beta, self.l2_normalize, self.ema, self.ema_decay = beta, l2_normalize, ema, ema_decay
        self.restart_dead_codes, self.restart_threshold = restart_dead_codes, restart_threshold
        if restart_from not in RESTART_SOURCES:
            raise ValueError(
                f"restart_from={restart_from!r} is invalid; use one of {RESTART_SOURCES}"
            )
        self.restart_from = restart_from
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        with torch.no_grad():
            # taming's U(-1/K, 1/K); l2 mode normalises it as LlamaGen does.
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_normalize:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if ema:
            self.embedding.weight.requires_grad_(False)
            # cluster_size starts at 1 so weight == embed_sum / cluster_size from step 0, and an
            # unused code keeps its vector while both decay at the same rate.
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())
        if restart_dead_codes:
            self.register_buffer("steps_since_used", torch.zeros(codebook_size, dtype=torch.long))

    def codebook(self) -> torch.Tensor:
        """The vectors the lookup compares against and returns: (K, D) fp32, unit norm in l2 mode."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_normalize else weight

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.codebook_dim)  # (B*h*w, D)
        return F.normalize(flat, dim=-1) if self.l2_normalize else flat

    @staticmethod
    def _distances(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Squared distances (N, K) as ||z||^2 - 2 z.e + ||e||^2 with one matmul."""
        squared = codebook.pow(2).sum(1)  # (K,)
        cross = torch.addmm(squared, flat, codebook.t(), alpha=-2.0)  # (N, K)
        return cross + flat.pow(2).sum(1, keepdim=True)

    @torch.no_grad()
    def encode_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Codes only, no state change: z (B, D, h, w) -> (B, h, w) int64."""
        return self.nearest_indices(z, 1)[..., 0]  # (B, h, w)

    @torch.no_grad()
    def nearest_indices(self, z: torch.Tensor, count: int) -> torch.Tensor:
        """The `count` nearest codes of each latent, nearest first: z (B, D, h, w) ->
        (B, h, w, count) int64. No state change."""
        batch, _, height, width = z.shape
        with torch.autocast(z.device.type, enabled=False):
            distances = self._distances(self._flatten(z), self.codebook())  # (N, K)
        nearest = distances.argmin(1, keepdim=True)  # (N, 1)
        if count > 1:
            others = distances.topk(count, dim=1, largest=False).indices  # (N, count)
            # the first column stays argmin, whose ties the training forward breaks the same way
            nearest = torch.cat([nearest, others[:, 1:]], dim=1)  # (N, count)
        return nearest.view(batch, height, width, count)  # (B, h, w, count)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> codebook vectors (B, D, h, w) fp32 (unit norm in l2 mode)."""
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2)  # (B, D, h, w)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, D, h, w) -> QuantizerOutput; in training mode also updates EMA/restart state."""
        batch, _, height, width = z.shape
        with torch.autocast(z.device.type, enabled=False):
            flat = self._flatten(z)  # (N, D)
            restarted = None
            if self.training and self.restart_dead_codes:
                restarted = self._restart(flat.detach())
            codebook = self.codebook()
            if self.ema and not self.l2_normalize:
                codebook = codebook.clone()  # the EMA update below rewrites the weight in place
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.entropy_weight > 0):
                distances = self._distances(flat, codebook)  # (N, K)
            indices = distances.argmin(1)  # (N,)
            quantized = F.embedding(indices, codebook)  # (N, D)
            codebook_loss = F.mse_loss(quantized, flat.detach())
            commitment_loss = F.mse_loss(flat, quantized.detach())
            loss = self.beta * commitment_loss + (0.0 if self.ema else codebook_loss)
            stats = {
                "codebook_loss": codebook_loss.detach(),
                "commitment_loss": commitment_loss.detach(),
            }
            if self.entropy_weight > 0:
                entropy = entropy_penalty(distances, self.entropy_temperature)
                loss = loss + self.entropy_weight * entropy
                stats["entropy_loss"] = entropy.detach()
            counts = self._update_state(indices, flat.detach())
            quantized = flat + (quantized - flat).detach()  # straight-through
        stats.update(self._batch_stats(counts))
        if restarted is not None:
            stats["restarted_codes"] = restarted
        quantized = quantized.view(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, D, h, w)
        indices = indices.view(batch, height, width)  # (B*h*w,) -> (B, h, w)
        return QuantizerOutput(quantized, loss, indices, stats)

    @torch.no_grad()
    def _update_state(self, indices: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Histogram (global under DDP in training), EMA and restart counters; returns counts."""
        counts = torch.bincount(indices, minlength=self.codebook_size)  # (K,)
        sums = None
        if self.training and self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)  # (K, D)
        if self.training and _distributed():
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        if sums is not None:
            decay = self.ema_decay
            self.cluster_size.mul_(decay).add_(counts.float(), alpha=1 - decay)
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = self.cluster_size.sum()
            eps = 1e-5  # Laplace smoothing keeps rarely used codes from dividing by ~0
            smoothed = (self.cluster_size + eps) / (total + self.codebook_size * eps) * total
            self.embedding.weight.copy_(self.embed_sum / smoothed[:, None])
        if self.training and self.restart_dead_codes:
            self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        self.usage_counts += counts
        return counts

    @torch.no_grad()
    def _restart(self, flat: torch.Tensor) -> torch.Tensor:
        """Replace codes unused for `restart_threshold` steps by rows of `flat` (N, D): random
        ones, or the rows of largest distance to their nearest code (repeated if n > N).

        Runs before the lookup so the autograd graph never sees the overwritten rows. Every rank
        draws, then rank 0's choice is broadcast, so RNG streams and buffers stay in step."""
        dead = (self.steps_since_used >= self.restart_threshold).nonzero().squeeze(1)  # (n,)
        if dead.numel() == 0:
            return torch.zeros((), device=flat.device)
        if self.restart_from == "error":
            errors = self._distances(flat, self.codebook()).min(1).values  # (N,)
            choice = errors.topk(min(dead.numel(), flat.shape[0])).indices  # (min(n, N),)
            choice = choice.repeat(-(-dead.numel() // choice.numel()))[: dead.numel()]  # (n,)
        else:
            choice = torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)
        replacements = flat[choice].contiguous()  # (n, D)
        if _distributed():
            dist.broadcast(replacements, src=0)
        self.embedding.weight[dead] = replacements.to(self.embedding.weight.dtype)
        if self.ema:
            self.embed_sum[dead] = replacements
            self.cluster_size[dead] = 1.0
        self.steps_since_used[dead] = 0
        return torch.tensor(float(dead.numel()), device=flat.device)


class FSQ(_CodeUsage):
    """Finite scalar quantization (Mentzer et al. 2023): no codebook, no loss.

    Each of the D = len(levels) channels is bounded with tanh and rounded to one of levels[i]
    values in [-1, 1]; the code is the mixed-radix number of the D digits, so
    codebook_size = prod(levels).
    """

    def __init__(self, levels: tuple[int, ...]) -> None:
        super().__init__(math.prod(levels))
        self.codebook_dim = len(levels)
        levels_tensor = torch.tensor(levels, dtype=torch.long)
        basis = torch.cumprod(torch.tensor((1, *levels[:-1]), dtype=torch.long), 0)
        self.register_buffer("levels", levels_tensor, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) -> values whose rounding lands in levels[i] integers around 0."""
        levels = self.levels.float()
        half = (levels - 1) * (1 + 1e-3) / 2
        offset = (self.levels % 2 == 0).float() * 0.5  # even levels sit on half-integers
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _digits_to_indices(self, rounded: torch.Tensor) -> torch.Tensor:
        digits = rounded.long() + self.levels // 2  # (..., D) in [0, levels)
        return (digits * self.basis).sum(-1)

    @torch.no_grad()
    def encode_indices(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D, h, w) -> codes (B, h, w) int64, no state change."""
        with torch.autocast(z.device.type, enabled=False):
            bounded = self._bound(z.float().permute(0, 2, 3, 1))  # (B, h, w, D)
        return self._digits_to_indices(torch.round(bounded))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> vectors (B, D, h, w) fp32 with entries in [-1, 1]."""
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels  # (B, h, w, D)
        half_width = self.levels // 2
        values = (digits - half_width).float() / half_width.float()
        return values.permute(0, 3, 1, 2)  # (B, D, h, w)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, D, h, w) -> QuantizerOutput with a zero loss."""
        with torch.autocast(z.device.type, enabled=False):
            bounded = self._bound(z.float().permute(0, 2, 3, 1))  # (B, h, w, D)
            rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through
            quantized = rounded / (self.levels // 2).float()
        indices = self._digits_to_indices(rounded.detach())  # (B, h, w)
        flat = indices.flatten()  # (B, h, w) -> (B*h*w,)
        counts = torch.bincount(flat, minlength=self.codebook_size)  # (K,)
        if self.training and _distributed():
            dist.all_reduce(counts)
        self.usage_counts += counts
        loss = torch.zeros((), device=z.device)
        quantized = quantized.permute(0, 3, 1, 2)  # (B, D, h, w)
        return QuantizerOutput(quantized, loss, indices, self._batch_stats(counts))
