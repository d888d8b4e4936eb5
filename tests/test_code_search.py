"""Code search (`tokenizer.code_search`): the nearest codes when it cannot or need not swap, the
per-position optimum with a decoder without context (checked by brute force), and the VQGAN
option's validation, ranking and save/load."""

import dataclasses
import hashlib
import json
import math

import pytest
import torch

from tokenizer import VQGAN, VQGANConfig
from tokenizer.code_search import search_codes, window_error

FACTOR, GRID, CODES = 4, 6, 12


def palette_decoder(palette: torch.Tensor):
    """A decoder without context: code k is a flat f x f patch of colour palette[k]."""

    def decode(codes: torch.Tensor) -> torch.Tensor:
        flat = palette[codes].permute(0, 3, 1, 2)  # (B, 3, h, w)
        return flat.repeat_interleave(FACTOR, 2).repeat_interleave(FACTOR, 3)  # (B, 3, H, W)

    return decode


def toy_problem(seed: int, num_candidates: int):
    generator = torch.Generator().manual_seed(seed)
    palette = torch.rand(CODES, 3, generator=generator) * 2 - 1  # (K, 3)
    images = torch.rand(3, 3, GRID * FACTOR, GRID * FACTOR, generator=generator) * 2 - 1
    scores = torch.rand(3, GRID, GRID, CODES, generator=generator)
    candidates = scores.topk(num_candidates, dim=-1).indices  # (B, h, w, R), distinct codes
    return palette_decoder(palette), images, candidates


def patch_errors(decode, images, candidates) -> torch.Tensor:
    """Squared error of each position's own patch under each candidate: (B, h, w, R)."""
    errors = []
    for rank in range(candidates.shape[-1]):
        error = (decode(candidates[..., rank]) - images).pow(2).sum(1, keepdim=True)
        errors.append(torch.nn.functional.avg_pool2d(error, FACTOR).squeeze(1) * FACTOR**2)
    return torch.stack(errors, dim=-1)


@pytest.mark.parametrize("num_candidates", [2, 3, 5])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 3.0])
def test_without_decoder_context_each_code_is_the_best_candidate_beyond_the_threshold(
    num_candidates, threshold
):
    decode, images, candidates = toy_problem(num_candidates, num_candidates)
    errors = patch_errors(decode, images, candidates)  # (B, h, w, R)
    # Brute force: the best of the other candidates, taken only where it beats the nearest
    # code's own patch error by more than the threshold (first of equals, as the search).
    best_rank = errors[..., 1:].argmin(-1) + 1  # (B, h, w)
    best_error = errors.gather(-1, best_rank[..., None]).squeeze(-1)
    swap = best_error < errors[..., 0] - threshold
    best_code = candidates.gather(-1, best_rank[..., None]).squeeze(-1)
    expected = torch.where(swap, best_code, candidates[..., 0])
    found = search_codes(decode, images, candidates, threshold)
    assert torch.equal(found, expected)
    if threshold == 0.0:
        assert swap.any(), "the toy problem must give the search something to swap"
        assert (
            window_error(decode(found), images, FACTOR).sum()
            < window_error(decode(candidates[..., 0]), images, FACTOR).sum()
        )


def test_one_candidate_or_an_unreachable_threshold_keeps_the_nearest_codes():
    decode, images, candidates = toy_problem(0, 4)
    assert torch.equal(search_codes(decode, images, candidates[..., :1], 0.0), candidates[..., 0])
    assert torch.equal(search_codes(decode, images, candidates, math.inf), candidates[..., 0])


def tiny_vqgan(**overrides) -> VQGAN:
    torch.manual_seed(0)
    config = VQGANConfig.from_preset(
        "cpu-tiny", resolution=16, codebook_size=64, norm="none", **overrides
    )
    return VQGAN(config).eval()


def test_nearest_indices_are_ranked_by_distance_and_start_at_the_encoded_code():
    model = tiny_vqgan()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = model.quant_conv(model.encoder(images))  # (B, D, h, w)
    ranked = model.quantize.nearest_indices(latents, 5)  # (B, h, w, 5)
    assert torch.equal(ranked[..., 0], model.encode(images))
    flat = torch.nn.functional.normalize(latents, dim=1).permute(0, 2, 3, 1)  # (B, h, w, D)
    distances = (flat[..., None, :] - model.quantize.codebook()[ranked]).pow(2).sum(-1)
    assert (distances.diff(dim=-1) >= -1e-6).all()
    assert (ranked.sort(dim=-1).values.diff(dim=-1) != 0).all(), "a code is ranked twice"


def test_vqgan_code_search_is_deterministic_and_survives_save_and_load(tmp_path):
    model = tiny_vqgan(code_search_candidates=3, code_search_threshold=0.1)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    codes = model.encode(images)
    nearest = VQGAN(dataclasses.replace(model.config, code_search_candidates=1)).eval()
    nearest.load_state_dict(model.state_dict())
    assert codes.shape == (4, 4, 4) and codes.dtype == torch.int64
    assert not torch.equal(codes, nearest.encode(images)), "random weights should swap some codes"
    assert torch.equal(codes, model.encode(images))
    model.save_pretrained(tmp_path)
    loaded = VQGAN.from_pretrained(tmp_path).eval()
    assert loaded.config.code_search_candidates == 3
    assert loaded.config.code_search_threshold == 0.1
    assert torch.equal(loaded.encode(images), codes)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"codebook_size": 64, "code_search_candidates": 0}, "code_search_candidates"),
        ({"codebook_size": 64, "code_search_candidates": 65}, "code_search_candidates"),
        ({"codebook_size": 64, "code_search_threshold": -0.1}, "code_search_threshold"),
        (
            {"quantizer": "fsq", "fsq_levels": (4, 4), "code_search_candidates": 2},
            "code_search_candidates",
        ),
    ],
)
def test_invalid_code_search_settings_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        VQGANConfig.from_preset("cpu-tiny", **overrides)


def test_identity_covers_the_search_only_when_it_searches():
    """Codes extracted before the search existed keep their tokenizer identity; codes made
    with a search are refused by the same weights without it (and the other way round)."""
    nearest = tiny_vqgan()
    config = dataclasses.asdict(nearest.config)
    del config["code_search_candidates"], config["code_search_threshold"]
    before = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    assert nearest.identity()["config_sha256"] == before

    def identity(**fields):
        model = VQGAN(dataclasses.replace(nearest.config, **fields))
        model.load_state_dict(nearest.state_dict())
        return model.identity()

    assert identity(code_search_threshold=0.9) == nearest.identity()  # unused without a search
    searched = identity(code_search_candidates=2)
    assert searched["config_sha256"] != before
    assert searched["weights_sha256"] == nearest.identity()["weights_sha256"]
    assert identity(code_search_candidates=2, code_search_threshold=0.9) != searched
