"""Sampling image codes from a `Prior`, and the caption dropout that trains it for guidance.

`generate` is a pure function: it reads the model's weights and nothing else, allocates its
KV cache per call and draws randomness only from the `generator` it is given, so one model can
serve several threads at once. Speed levers (issue 7, item 2): a static preallocated cache,
text prefilled once, one token per step written in place, the conditional and unconditional
rows of classifier-free guidance (CFG) in one batch, sampling on the model's device, and an
optional `torch.compile` of the decode step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prior.cache import KVCache
from prior.model import Prior, check_id_range, check_text_ids


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf. logits (..., V) -> (..., V).

    Ties follow Hugging Face `TopKLogitsWarper`: all logits >= the k-th largest value are kept,
    so ties at the threshold can keep more than k tokens. `top_k` > V keeps everything.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} is invalid; allowed: an int >= 1 (or None for no limit)")
    top_k = min(top_k, logits.shape[-1])
    threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < threshold, -math.inf)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is
    >= top_p, always at least one token. logits (..., V) -> (..., V) with the rest at -inf.

    Semantics of Hugging Face `TopPLogitsWarper` (min_tokens_to_keep=1): sort ascending, remove
    tokens whose cumulative probability is <= 1 - top_p. The cumulative sums are computed on the
    sorted values exactly as HF does, so the kept count is identical; among tied tokens at the
    cut, HF's unstable sort picks arbitrarily, while here the lower token ids are kept.
    """
    if not (isinstance(top_p, int | float) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} is invalid; allowed: a float in (0, 1] (or None)")
    vocab = logits.shape[-1]
    # Sorting the reversed row stably puts higher ids first among ties, so they go first.
    sorted_logits, order = torch.sort(logits.flip(-1), dim=-1, stable=True)  # (..., V) ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (..., V)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[..., -1] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, vocab - 1 - order, remove_sorted)
    return logits.masked_fill(remove, -math.inf)


def mix_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """`uncond + guidance_scale * (cond - uncond)` in fp32 (Ho & Salimans 2022, in logit space
    as LlamaGen does). `torch.lerp` evaluates it exactly at the end points: scale 1 returns
    `cond` bit for bit and scale 0 returns `uncond`."""
    return torch.lerp(uncond.float(), cond.float(), float(guidance_scale))


def drop_captions(
    text_ids: torch.Tensor,
    null_ids: torch.Tensor,
    p: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace each row of text_ids (B, T) by the null caption with probability p (CFG training).

    `null_ids` is the empty caption's ids, (T,) or (1, T) or (B, T), e.g. `TextTokenizer.null_ids`.
    Pure: returns a new tensor; the draw uses only `generator` (on text_ids' device).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout p={p!r} is invalid; allowed: a probability in [0, 1]")
    batch, length = text_ids.shape
    null_ids = null_rows(null_ids, batch, length, "null_ids").to(text_ids.device)  # (1 or B, T)
    drop = torch.rand(text_ids.shape[0], generator=generator, device=text_ids.device) < p  # (B,)
    return torch.where(drop[:, None], null_ids, text_ids)  # (B, T)


def null_rows(null_ids: torch.Tensor, batch: int, length: int, name: str) -> torch.Tensor:
    """The null caption's ids, (T,), (1, T) or (B, T), as rows (1, T) or (B, T); any other
    shape raises ValueError naming `name`, its shape and the allowed ones."""
    shape = tuple(null_ids.shape)
    if shape not in ((length,), (1, length), (batch, length)):
        raise ValueError(
            f"{name} has shape {shape}; allowed: ({length},), (1, {length}) or ({batch}, "
            f"{length}), the empty caption's ids (TextTokenizer.null_ids) for text_length="
            f"{length} and {batch} captions"
        )
    return null_ids.reshape(-1, length)  # (1 or B, T)


def prefill(
    prior: Prior,
    text_ids: torch.Tensor,
    codes: torch.Tensor,
    cache: KVCache | None,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run [text][BOI][codes] from position 0 and return the logits for the next code.

    text_ids (R, T), codes (R, n) with 0 <= n < h*w -> fp32 logits (R, codebook_size). With a
    cache, keys and values of all T + 1 + n positions are stored; without one this is a plain
    full forward (the no-cache reference). `table`: `prior.image_table()`, if computed already.
    """
    boi = codes.new_full((codes.shape[0], 1), prior.boi_id)
    table = prior.image_table() if table is None else table
    inputs = prior.embed(text_ids, torch.cat([boi, codes], dim=1), table)  # (R, T + 1 + n, D)
    hidden = prior.backbone(inputs, 0, cache)  # (R, T + 1 + n, D)
    return prior.image_logits(hidden[:, -1], table)  # (R, V)


def decode_step(
    prior: Prior, codes: torch.Tensor, position: int, cache: KVCache, table: torch.Tensor
) -> torch.Tensor:
    """Feed one code per row, codes (R,) at sequence `position`, -> logits (R, codebook_size).

    The code k of the grid sits at position text_length + 1 + k; `table` is
    `prior.image_table()`, computed once per generate call.
    """
    inputs = F.embedding(codes[:, None], table)  # (R, 1, D)
    hidden = prior.backbone(inputs, position, cache)  # (R, 1, D)
    return prior.image_logits(hidden[:, 0], table)  # (R, V)


def sample_next(
    logits: torch.Tensor,
    *,
    guidance: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (R, V), with R = 2B (conditional rows first) when `guidance` is set, else R = B
    -> sampled ids (B,) in [0, V).

    Draws with `torch.multinomial(generator=...)`, or, given `uniform` (B,) in [0, 1), by
    inverting each row's cumulative distribution at its own uniform number.
    """
    if guidance is not None:
        cond, uncond = logits.chunk(2, dim=0)  # (B, V) each
        logits = mix_guidance(cond, uncond, guidance)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if uniform is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = uniform[:, None].to(cdf.dtype) * cdf[:, -1:]  # (B, 1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)  # (B,)
    # right=True skips zero-probability ids; rounding can still land past the end, so cap at
    # the last id with probability mass.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)  # (B,)
    return torch.minimum(index, last)


@dataclass(frozen=True)
class _Sampler:
    """The sampling knobs of one `generate` call; `uniforms` (B, n) holds per-row draws."""

    guidance: float | None
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None
    uniforms: torch.Tensor | None

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        return sample_next(
            logits,
            guidance=self.guidance,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            generator=self.generator,
            uniform=None if self.uniforms is None else self.uniforms[:, step],
        )


@torch.inference_mode()
def generate(
    prior: Prior,
    text_ids: torch.Tensor,
    *,
    null_text_ids: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prefix_codes: torch.Tensor | None = None,
    use_cache: bool = True,
    compile_decode_step: bool | str = False,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample image codes for captions.

    Args:
        text_ids: (B, text_length) long, from `TextTokenizer`.
        null_text_ids: the empty caption's ids, (text_length,), (1, T) or (B, T). When given,
            conditional and unconditional rows run as ONE batch of 2B and the logits are mixed
            as `u + guidance_scale * (c - u)` (also at scale 1, which then equals conditional
            sampling exactly). Required when guidance_scale != 1.
        guidance_scale: >= 0; 1 is conditional sampling, 0 unconditional.
        temperature: > 0, divides the (mixed) logits. top_k: int >= 1 or None; top_p: (0, 1]
            or None (HF tie conventions, see `top_k_filter` and `top_p_filter`).
        generator: the only source of randomness, on the model's device. One generator drives
            `torch.multinomial` for the whole batch; a list of B generators (diffusers style,
            no None) gives each row its own stream, drawn up front, so a row's codes do not
            depend on which other rows share the batch.
        prefix_codes: (B, n) long, 0 <= n <= h*w, the first n codes in raster order (image
            completion); they are returned unchanged.
        use_cache: False recomputes the full forward every step (the slow reference).
        compile_decode_step: wrap the one-token step in `torch.compile` (a GPU option); True
            for the default backend, or a backend name such as "eager".
        progress: called as progress(done, total) after each sampled code.

    Returns:
        (B, h, w) long codes in [0, codebook_size).
    """
    cfg = prior.config
    device = prior.image_embedding.weight.device
    batch, prefix = _validate(prior, text_ids, prefix_codes, generator, device)
    _validate_knobs(guidance_scale, temperature, top_k, top_p)
    if null_text_ids is None and guidance_scale != 1.0:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs null_text_ids (the empty caption's ids, "
            "TextTokenizer.null_ids); pass them or use guidance_scale=1.0"
        )
    rows = _with_null_rows(text_ids, null_text_ids, cfg)  # (B or 2B, T)
    uniforms, new = None, cfg.num_image_tokens - prefix.shape[1]
    if isinstance(generator, Sequence):
        uniforms = torch.stack([torch.rand(new, generator=g, device=device) for g in generator])
        generator = None
    guidance = None if null_text_ids is None else guidance_scale
    sampler = _Sampler(guidance, temperature, top_k, top_p, generator, uniforms)
    codes = torch.empty(batch, cfg.num_image_tokens, dtype=torch.long, device=device)
    codes[:, : prefix.shape[1]] = prefix
    loop = _cached_loop if use_cache else _uncached_loop
    loop(prior, rows, codes, prefix.shape[1], sampler, progress, compile_decode_step)
    return codes.view(batch, *cfg.image_grid)  # (B, h, w)


def _with_null_rows(text_ids, null_text_ids, config) -> torch.Tensor:
    """(B, T) -> (2B, T) with the null caption's rows after the conditional ones, if given."""
    if null_text_ids is None:
        return text_ids
    batch = text_ids.shape[0]
    null = null_rows(null_text_ids, batch, config.text_length, "null_text_ids")  # (1 or B, T)
    null = null.to(text_ids.device).expand(batch, -1)  # (B, T)
    check_text_ids(null, config)
    return torch.cat([text_ids, null], dim=0)  # (2B, T)


def _cached_loop(prior, rows, codes, start, sampler, progress, compile_decode_step) -> None:
    """Fill codes[:, start:] in place: prefill once, then one cached step per code."""
    cfg, total = prior.config, codes.shape[1]
    if start == total:
        return
    step = decode_step
    if compile_decode_step:
        backend = compile_decode_step if isinstance(compile_decode_step, str) else "inductor"
        step = torch.compile(decode_step, dynamic=True, backend=backend)
    weight = prior.image_embedding.weight
    dtype = weight.dtype
    if torch.is_autocast_enabled(weight.device.type):
        dtype = torch.get_autocast_dtype(weight.device.type)
    cache = KVCache.allocate(
        num_layers=cfg.num_layers,
        batch_size=rows.shape[0],
        num_heads=cfg.num_heads,
        # One spare slot: the last step would otherwise attend to the whole buffer, a contiguous
        # view where every earlier step's is strided, and torch.compile would compile the step a
        # second time for it (seen with TORCH_LOGS=recompiles).
        max_length=cfg.sequence_length + 1,
        head_dim=cfg.head_dim,
        device=weight.device,
        dtype=dtype,
    )
    repeats, table = rows.shape[0] // codes.shape[0], prior.image_table()
    logits = prefill(prior, rows, codes[:, :start].repeat(repeats, 1), cache, table)  # (R, V)
    for index in range(start, total):
        codes[:, index] = sampler(logits, index - start)
        if progress is not None:
            progress(index + 1 - start, total - start)
        if index + 1 < total:
            position = cfg.text_length + 1 + index
            row_codes = codes[:, index].repeat(repeats)  # (R,)
            logits = step(prior, row_codes, position, cache, table)  # (R, V)


def _uncached_loop(prior, rows, codes, start, sampler, progress, compile_decode_step) -> None:
    """Fill codes[:, start:] in place, recomputing the whole sequence for every code."""
    total, repeats = codes.shape[1], rows.shape[0] // codes.shape[0]
    table = prior.image_table()
    for index in range(start, total):
        logits = prefill(prior, rows, codes[:, :index].repeat(repeats, 1), None, table)  # (R, V)
        codes[:, index] = sampler(logits, index - start)
        if progress is not None:
            progress(index + 1 - start, total - start)


def _validate(prior, text_ids, prefix_codes, generator, device) -> tuple[int, torch.Tensor]:
    """Check inputs; returns the batch size and the prefix codes (B, n) on `device`."""
    cfg = prior.config
    if text_ids.device != device:
        raise ValueError(f"text_ids are on {text_ids.device} but the prior is on {device}")
    check_text_ids(text_ids, cfg)
    batch = text_ids.shape[0]
    generators = generator if isinstance(generator, Sequence) else [generator]
    if isinstance(generator, Sequence) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for {batch} captions; pass one per row")
    if isinstance(generator, Sequence) and any(item is None for item in generator):
        missing = [index for index, item in enumerate(generator) if item is None]
        raise ValueError(
            f"generator list has None at rows {missing[:5]}; a None row would draw from torch's "
            "global RNG, so pass a torch.Generator for every row (or generator=None for all)"
        )
    for item in generators:
        if item is not None and not same_device(item.device, device):
            raise ValueError(
                f"generator is on {item.device} but sampling runs on {device}; create it "
                f"there: torch.Generator(device={str(device)!r}).manual_seed(seed)"
            )
    if prefix_codes is None:
        return batch, torch.empty(batch, 0, dtype=torch.long, device=device)
    prefix_codes = prefix_codes.to(device)
    if prefix_codes.dim() != 2 or prefix_codes.shape[0] != batch:
        raise ValueError(
            f"prefix_codes has shape {tuple(prefix_codes.shape)}; expected (B={batch}, n) codes "
            "in raster order"
        )
    if prefix_codes.shape[1] > cfg.num_image_tokens:
        raise ValueError(
            f"prefix_codes has {prefix_codes.shape[1]} codes; allowed: at most h*w="
            f"{cfg.num_image_tokens}"
        )
    check_id_range(prefix_codes, cfg.codebook_size, "prefix_codes", "codebook_size")
    return batch, prefix_codes


def same_device(first: torch.device | str, second: torch.device | str) -> bool:
    """Whether two devices are the same one; an accelerator device without an index ("cuda")
    means the current one, as torch.Generator("cuda") does."""
    return _indexed(torch.device(first)) == _indexed(torch.device(second))


def _indexed(device: torch.device) -> torch.device:
    if device.type == "cpu" or device.index is not None:
        return device
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device.type, 0)


def _validate_knobs(guidance_scale, temperature, top_k, top_p) -> None:
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale={guidance_scale!r} is invalid; allowed: a float >= 0")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} is invalid; allowed: a float > 0")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid; allowed: an int >= 1 or None")
    if top_p is not None and not (isinstance(top_p, int | float) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} is invalid; allowed: a float in (0, 1] or None")
