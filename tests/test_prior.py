"""Prior model: config validation, causality, positions, losses, save/load, caption dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from prior_helpers import TINY, make_prior, random_batch

from prior import PRESETS, Prior, PriorConfig, drop_captions
from prior.distinct_text import image_hidden
from prior.layers import attend
from prior.rope import apply_rope, rope_real, rope_table


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_configs(name):
    config = PriorConfig.from_preset(name)
    assert config.d_model % config.num_heads == 0
    assert PriorConfig.from_preset(name, codebook_size=1024).codebook_size == 1024


def test_llamagen_b_size_and_tiny_size():
    config = PriorConfig.from_preset("B")
    assert (config.num_layers, config.d_model, config.num_heads, config.mlp_hidden) == (
        12,
        768,
        12,
        2048,
    )
    tiny = Prior(PriorConfig.from_preset("cpu-tiny", text_vocab_size=64, codebook_size=256))
    assert 1.5e6 < tiny.num_parameters() < 2.5e6  # calibration's 1.9M-parameter prior


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(d_model=30, num_heads=4), "d_model"),
        (dict(d_model=24, num_heads=4), "num_heads"),  # head_dim 6 is not divisible by 4
        (dict(mlp="relu"), "mlp"),
        (dict(norm="batchnorm"), "norm"),
        (dict(text_length=1), "text_length"),
        (dict(image_grid=(0, 4)), "image_grid"),
        (dict(dropout=1.0), "dropout"),
        (dict(text_pad_id=40), "text_pad_id"),
        (dict(codebook_size=0), "codebook_size"),
        (dict(image_loss_weight=0.0), "image_loss_weight"),
        (dict(text_loss_weight=-1.0), "text_loss_weight"),
        (dict(code_feature_dim=-1), "code_feature_dim"),
        (dict(code_feature_dim=5, code_feature_groups=(3, 3)), "code_feature_groups"),
        (dict(code_feature_dim=5, code_feature_groups=(5, 0)), "code_feature_groups"),
        (dict(text_attention="bidirectional"), "text_attention"),
        # Values of the wrong type are a ValueError too, never a TypeError from inside a check.
        (dict(image_grid=8), "image_grid"),
        (dict(image_grid=(3, 4.0)), "image_grid"),
        (dict(text_length=2.5), "text_length"),
        (dict(code_feature_dim=5, code_feature_groups=5), "code_feature_groups"),
        (dict(mlp_ratio="4"), "mlp_ratio"),
        (dict(dropout=None), "dropout"),
    ],
)
def test_config_validation_names_field_and_value(overrides, field):
    with pytest.raises(ValueError, match=rf"PriorConfig\.{field}=") as error:
        PriorConfig(**{**TINY, **overrides})
    assert "allowed" in str(error.value)


def test_unknown_preset_and_field_rejected():
    with pytest.raises(ValueError, match="allowed presets"):
        PriorConfig.from_preset("huge")
    with pytest.raises(ValueError, match="d_modle"):
        PriorConfig.from_preset("cpu-tiny", d_modle=64)


def test_forward_shapes_and_image_head_never_covers_text_ids():
    model = make_prior(text_loss_weight=0.125, image_loss_weight=0.875)
    text, codes = random_batch(model.config)
    out = model(text, codes)
    assert out.image_logits.shape == (3, 12, 24)
    assert model.image_head.out_features == model.config.codebook_size < 40
    assert out.text_loss is not None and out.text_loss.ndim == 0
    torch.testing.assert_close(out.loss, 0.875 * out.image_loss + 0.125 * out.text_loss)
    flat = model(text, codes.flatten(1))
    torch.testing.assert_close(flat.image_logits, out.image_logits)
    assert make_prior().text_head is None and model(text, codes).image_logits.dtype == torch.float32


def test_tied_image_head_is_the_code_rows_of_the_image_embedding():
    """Tied logits are `hidden @ E[:codebook_size].T`: BOI (the extra row) is never a target,
    there is no separate head weight, and a gradient through the logits reaches E."""
    model = make_prior(tie_image_embeddings=True)
    text, codes = random_batch(model.config)
    assert model.image_head is None and "image_head.weight" not in model.state_dict()
    hidden = torch.randn(5, model.config.d_model)
    expected = hidden @ model.image_embedding.weight[:24].T
    torch.testing.assert_close(model.image_logits(hidden), expected)
    out = model(text, codes)
    assert out.image_logits.shape == (3, 12, 24)
    out.image_loss.backward()
    grad = model.image_embedding.weight.grad
    unused = torch.ones(25, dtype=torch.bool)
    unused[codes.flatten()] = False
    unused[model.boi_id] = False  # BOI is an input at every image sequence's start
    # Codes that are neither inputs nor targets still get a gradient through the logits.
    assert unused[:24].any() and (grad[:24][unused[:24]].abs().sum(-1) > 0).all()


def test_initial_loss_is_uniform_and_bad_inputs_are_refused():
    model = Prior(PriorConfig(**TINY))
    text, codes = random_batch(model.config)
    torch.testing.assert_close(model(text, codes).image_loss, torch.tensor(math.log(24)))
    with pytest.raises(ValueError, match="image_codes holds ids"):
        model(text, codes + 24)
    with pytest.raises(ValueError, match="text_ids has shape"):
        model(text[:, :-1], codes)
    with pytest.raises(ValueError, match="image_codes has shape"):
        model(text, codes[:, :2])


def sequence_hidden(model: Prior, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    flat = codes.flatten(1)
    inputs = torch.cat([flat.new_full((flat.shape[0], 1), model.boi_id), flat[:, :-1]], dim=1)
    return model.backbone(model.embed(text, inputs))  # (B, T + N, D)


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(norm="layernorm", mlp="gelu"),
        dict(tie_image_embeddings=True, code_feature_dim=5),
        dict(text_attention="self"),
    ],
)
@pytest.mark.parametrize("position", [2, 5, 7, 9, 17])
def test_causality_future_tokens_never_change_past(config, position):
    """Changing the input at sequence index `position` leaves every earlier output bit-exact
    in value (within 1e-6) and changes the output at `position` itself."""
    model = make_prior(**config)
    text, codes = random_batch(model.config)
    before = sequence_hidden(model, text, codes)
    text2, codes2 = text.clone(), codes.clone().flatten(1)
    if position < model.config.text_length:
        text2[:, position] = (text2[:, position] + 1) % model.config.text_vocab_size
    else:  # sequence index T + k holds code k - 1 (index T is BOI)
        k = position - model.config.text_length - 1
        codes2[:, k] = (codes2[:, k] + 1) % model.config.codebook_size
    after = sequence_hidden(model, text2, codes2)
    torch.testing.assert_close(after[:, :position], before[:, :position], atol=1e-6, rtol=0)
    assert (after[:, position] - before[:, position]).abs().max() > 1e-3


def test_rope_depends_only_on_relative_position_and_prefix_is_not_zeroed():
    config = PriorConfig(**TINY)
    rotations = rope_table(config)  # (L, Dh/2, (cos, sin))
    assert rotations.shape == (6 + 1 + 12, config.head_dim // 2, 2)
    # The prefix rows are real rotations (cos² + sin² = 1), not LlamaGen's all-zero rows.
    torch.testing.assert_close(rotations.pow(2).sum(-1), torch.ones(rotations.shape[:2]))
    assert (rotations[1:7, :, 1].abs().sum(dim=1) > 0).all()
    q, k = torch.randn(2, 1, 1, 1, 1, config.head_dim).unbind(0)

    def score(i: int, j: int) -> torch.Tensor:
        return (apply_rope(q, rotations[i : i + 1]) * apply_rope(k, rotations[j : j + 1])).sum()

    # Image cells (row 1, col 2) -> (row 0, col 1) and (row 2, col 3) -> (row 1, col 2):
    # the same 2D offset gives the same score; another offset with the same raster distance
    # (row 2, col 0) -> (row 0, col 3) does not.
    image = config.text_length + 1
    torch.testing.assert_close(score(image + 6, image + 1), score(image + 11, image + 6))
    assert not torch.allclose(score(image + 6, image + 1), score(image + 8, image + 3))


def test_rope_real_arithmetic_path_equals_complex_path():
    """The torch.compile path (real arithmetic) computes the eager complex multiply."""
    rotations = rope_table(PriorConfig(**TINY))[:5]
    x = torch.randn(2, 5, 2, 2, 16)
    real = rope_real(x.unflatten(-1, (-1, 2)), rotations[:, None, None])
    torch.testing.assert_close(real, apply_rope(x, rotations))
    assert not torch.allclose(real, x)


def test_low_precision_cast_keeps_fp32_positions():
    model = make_prior()
    text, codes = random_batch(model.config)
    expected = model(text, codes).image_loss
    model.to(torch.bfloat16)
    assert model.rope.dtype == torch.float32 and model.image_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model(text, codes).image_loss, expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_attention_on_cpu_is_computed_in_fp32(is_causal, dtype):
    """bf16 inputs, or fp32 ones under autocast (which would run SDPA in bf16), get fp32 SDPA."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = torch.randn(3, 2, 2, 5, 8, generator=generator).to(dtype).unbind(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(query, key, value, is_causal=is_causal)
    expected = F.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), is_causal=is_causal
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype), atol=0, rtol=0)


def test_bf16_autocast_forward_and_backward_stay_close_to_fp32():
    model = make_prior(code_feature_dim=5, code_feature_groups=(3, 2)).train()
    text, codes = random_batch(model.config)
    expected = model(text, codes).image_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(text, codes).image_loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=0.05, rtol=0.02)
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = Prior(PriorConfig(**TINY, text_loss_weight=0.1)).train()
    text, codes = random_batch(model.config, batch=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(text, codes).image_loss.item()
    for _ in range(25):
        out = model(text, codes)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.image_loss.item() < 0.3 * first


def test_self_text_attention_keeps_words_apart_and_image_positions_read_them_all():
    """text_attention="self": changing text token j leaves every other text position's hidden
    state exactly as it was (causal attention changes the later ones), and still changes the
    image positions, which attend to all text."""
    for mode, later_text_changes in (("self", False), ("causal", True)):
        model = make_prior(text_attention=mode)
        text, codes = random_batch(model.config)
        length = model.config.text_length
        before = sequence_hidden(model, text, codes)
        text2 = text.clone()
        text2[:, 2] = (text2[:, 2] + 1) % model.config.text_vocab_size
        after = sequence_hidden(model, text2, codes)
        others = [index for index in range(length) if index != 2]
        moved = (after[:, others] - before[:, others]).abs().max().item()
        assert (moved > 1e-3) == later_text_changes, (mode, moved)
        assert (after[:, length:] - before[:, length:]).abs().max() > 1e-3
    mask = make_prior(text_attention="self").attention_mask(length + 3)  # (T + 3, T + 3)
    assert torch.equal(mask[:length, :length], torch.eye(length, dtype=torch.bool))
    assert mask[length:, :].sum(1).tolist() == [length + 1, length + 2, length + 3]  # BOI on


@pytest.mark.parametrize("text_attention", ["causal", "self"])
def test_gradient_checkpointing_gives_the_same_gradients(text_attention):
    model = make_prior(dropout=0.0, text_attention=text_attention).train()
    text, codes = random_batch(model.config)
    model(text, codes).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(text, codes).loss.backward()
    for expected, parameter in zip(plain, model.parameters()):
        torch.testing.assert_close(parameter.grad, expected)


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(norm="layernorm", mlp="gelu"),
        dict(tie_image_embeddings=True, code_feature_dim=5, code_feature_groups=(3, 2)),
    ],
)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_distinct_text_pass_equals_the_full_sequence_pass(config, checkpointing):
    """With text_attention="self" the forward runs each distinct text id once
    (prior/distinct_text.py); its image logits and every gradient equal those of the backbone
    over the whole sequence, with repeated ids and pads in the captions."""
    model = make_prior(text_attention="self", **config).train()
    model.gradient_checkpointing = checkpointing
    text, codes = random_batch(model.config, batch=4)
    text[:, -2:] = 0  # pads
    text[1, :3] = text[0, :3]  # ids shared across captions and positions
    text[2, 1] = text[2, 0]
    length = model.config.text_length
    full = model.image_logits(sequence_hidden(model, text, codes)[:, length:])  # (B, N, V)
    expected_loss = F.cross_entropy(full.flatten(0, 1), codes.flatten())
    expected = torch.autograd.grad(expected_loss, list(model.parameters()))
    out = model(text, codes)
    torch.testing.assert_close(out.image_logits, full, atol=1e-5, rtol=1e-5)
    inputs = torch.cat([codes.new_full((4, 1), model.boi_id), codes.flatten(1)[:, :-1]], dim=1)
    hidden = image_hidden(model, text, model.embed(text, inputs)[:, length:])  # (B, N, D)
    torch.testing.assert_close(model.image_logits(hidden), full, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(out.loss, list(model.parameters())), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_dropout_only_in_training_mode():
    model = make_prior(dropout=0.5)
    text, codes = random_batch(model.config)
    torch.testing.assert_close(model(text, codes).loss, model(text, codes).loss)
    model.train()
    assert model(text, codes).loss.item() != model(text, codes).loss.item()


def test_code_features_add_an_mlp_of_each_codes_features_to_its_rows():
    """With code_feature_dim, a code's embedding row (input and tied head alike) is its free row
    plus MLP(features); codes with equal features and equal free rows get equal logits, BOI gets
    no feature term, and the MLP learns through the loss."""
    model = make_prior(tie_image_embeddings=True, code_feature_dim=5)
    features = model.code_features.features
    features[3] = features[4]
    with torch.no_grad():
        model.image_embedding.weight[3] = model.image_embedding.weight[4]
    table = model.image_table()  # (V + 1, D)
    embedded = model.code_features.down(F.gelu(model.code_features.up(features)))
    torch.testing.assert_close(table[:24], model.image_embedding.weight[:24] + embedded)
    torch.testing.assert_close(table[24], model.image_embedding.weight[24])  # BOI
    hidden = torch.randn(5, model.config.d_model)
    logits = model.image_logits(hidden)
    torch.testing.assert_close(logits, hidden @ table[:24].T)
    torch.testing.assert_close(logits[:, 3], logits[:, 4])
    text, codes = random_batch(model.config)
    model(text, codes).image_loss.backward()
    assert model.code_features.up.weight.grad.abs().sum() > 0
    assert "code_features.features" in model.state_dict()  # saved with the weights
    fresh = Prior(PriorConfig(**TINY, tie_image_embeddings=True, code_feature_dim=5))
    rows = fresh.image_embedding.weight
    assert rows[:24].abs().sum() == 0 and rows[24].abs().sum() > 0  # codes start as features


def test_code_feature_groups_sum_one_mlp_per_group():
    """With code_feature_groups, the feature embedding is the sum of one MLP per group of
    features, with no weight across groups: changing one group's features moves only its term,
    and the masked-out weights get no gradient."""
    model = make_prior(tie_image_embeddings=True, code_feature_dim=5, code_feature_groups=(3, 2))
    embedding = model.code_features
    with torch.no_grad():
        embedding.features.normal_()
    width = model.config.d_model
    up, down = embedding.up.weight, embedding.down.weight  # (5, 2D), (2D, D)
    first = F.gelu(embedding.features[:, :3] @ up[:3, :width]) @ down[:width]
    second = F.gelu(embedding.features[:, 3:] @ up[3:, width:]) @ down[width:]
    torch.testing.assert_close(embedding(), first + second)
    embedding().sum().backward()
    assert up.grad[:3, width:].abs().sum() == 0 and up.grad[3:, :width].abs().sum() == 0
    assert up.grad[:3, :width].abs().sum() > 0 and up.grad[3:, width:].abs().sum() > 0
    single = make_prior(tie_image_embeddings=True, code_feature_dim=5)
    assert single.code_features.up.weight.shape == (5, width)  # one group: the plain MLP


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize(
    "features",
    [dict(), dict(code_feature_dim=5), dict(code_feature_dim=5, code_feature_groups=(4, 1))],
)
def test_save_and_from_pretrained_round_trip(tmp_path, tie, features):
    model = make_prior(
        text_loss_weight=0.1,
        norm="layernorm",
        tie_image_embeddings=tie,
        **features,
    )
    text, codes = random_batch(model.config)
    model.save_pretrained(tmp_path / "prior")
    loaded = Prior.from_pretrained(tmp_path / "prior")
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(text, codes).image_logits, model(text, codes).image_logits)
    assert sorted((tmp_path / "prior").iterdir()) == [
        tmp_path / "prior" / "config.json",
        tmp_path / "prior" / "model.safetensors",
    ]


def test_drop_captions_rate_determinism_and_rows():
    text = torch.randint(4, 40, (20000, 6))
    null = torch.tensor([2, 3, 0, 0, 0, 0])
    dropped = drop_captions(text, null, p=0.1, generator=torch.Generator().manual_seed(1))
    again = drop_captions(text, null, p=0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dropped, again)
    is_null = (dropped == null).all(dim=1)
    assert torch.equal(dropped[~is_null], text[~is_null])
    assert abs(is_null.float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_captions(text, null, p=0.0), text)
    assert (drop_captions(text[:5], null[None], p=1.0) == null).all()
    with pytest.raises(ValueError, match=r"p=1\.5"):
        drop_captions(text, null, p=1.5)
