"""VQGAN model: shapes, gradients, save/load, identity, presets, taming parity, validation."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from codegrid.io import config_from_dict
from tokenizer import PRESETS, VQGAN, ImageTokenizer, VQGANConfig
from tokenizer.modules import NORMS, AttnBlock, ChannelNorm, GroupNorm

TINY = {  # taming's encoder; the "patch-encoder" variant and the tests that name it switch
    "encoder": "conv",
    "resolution": 16,
    "ch": 16,
    "ch_mult": (1, 2),
    "num_res_blocks": 1,
    "attn_resolutions": (8,),
    "mid_attention": True,  # taming's layout (the cpu-tiny preset has none)
    "z_channels": 8,
    "codebook_size": 32,
    "codebook_dim": 4,
}
VARIANTS = {
    "classic": {"l2_normalize": False, "restart_dead_codes": False},
    "l2-restart": {"l2_normalize": True, "restart_dead_codes": True},
    "ema": {"l2_normalize": False, "restart_dead_codes": True, "ema": True},
    "fsq": {"quantizer": "fsq", "fsq_levels": (4, 3, 3)},
    "patch-encoder": {"encoder": "patch", "l2_normalize": True, "restart_dead_codes": True},
}


def tiny_config(variant: str = "l2-restart", **overrides) -> VQGANConfig:
    values = {**TINY, **VARIANTS[variant], **overrides}
    if values.get("quantizer") == "fsq":  # from_preset derives the size and dim from the levels
        del values["codebook_size"], values["codebook_dim"]
    return VQGANConfig.from_preset("cpu-tiny", **values)


def tiny_model(variant: str = "l2-restart", **overrides) -> VQGAN:
    return VQGAN(tiny_config(variant, **overrides))


def images(batch: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size) * 2 - 1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encode_decode_shapes_and_code_range(variant):
    model = tiny_model(variant).eval()
    x = images(3, 16)
    codes = model.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert model.latent_shape(16, 16) == (8, 8) and model.downsample_factor == 2
    assert codes.min() >= 0 and codes.max() < model.codebook_size
    decoded = model.decode(codes)
    assert decoded.shape == (3, 3, 16, 16)
    assert decoded.min() >= -1 and decoded.max() <= 1
    out = model(x)
    assert torch.equal(out.codes, codes)  # forward and encode pick the same codes
    torch.testing.assert_close(out.reconstruction.clamp(-1, 1), decoded)
    assert out.quantizer_loss.ndim == 0 and torch.isfinite(out.quantizer_loss)
    assert {"perplexity", "batch_usage"} <= set(out.stats)
    # a non-square input uses the same code grid rule
    assert model.encode(images(1, 16)[..., :12]).shape == (1, 8, 6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_straight_through_gradient_reaches_encoder(variant):
    model = tiny_model(variant).train()
    out = model(images())
    # reconstruction only: the encoder gets gradient solely through the straight-through path
    out.reconstruction.pow(2).mean().backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["l2-restart", "ema", "fsq"])
def test_save_from_pretrained_round_trip(tmp_path, variant):
    model = tiny_model(variant).train()
    for _ in range(3):  # move EMA / restart buffers away from their initial values
        model(images(4))
    model.eval()
    model.save_pretrained(tmp_path / "vq")
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    assert loaded.config == model.config and not loaded.training
    x = images(4)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
    assert loaded.identity() == model.identity()


def test_mid_attention_off_drops_only_the_mid_attention(tmp_path):
    with_attention = set(tiny_model().state_dict())
    model = tiny_model(mid_attention=False).eval()
    removed = with_attention - set(model.state_dict())
    assert removed and all(".mid.attn_1." in key for key in removed)
    assert set(model.state_dict()) < with_attention
    x = images(2)
    assert model.decode(model.encode(x)).shape == x.shape
    model.save_pretrained(tmp_path / "vq")
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    assert loaded.config.mid_attention is False and torch.equal(loaded.encode(x), model.encode(x))


def test_channel_norm_is_local_and_keeps_the_keys(tmp_path):
    """norm="channel" normalises each position over its channels: changing one position changes
    only that position's output (GroupNorm's image-wide statistics change every position). The
    weights keep GroupNorm's names and shapes, and the option survives save/load."""
    norm = ChannelNorm(8)
    x = torch.randn(2, 8, 5, 5)
    flat = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    expected = (flat - flat.mean(-1, keepdim=True)) / (
        flat.var(-1, unbiased=False, keepdim=True) + 1e-6
    ).sqrt()
    torch.testing.assert_close(norm(x), expected.permute(0, 3, 1, 2))
    changed = x.clone()
    changed[:, :, 2, 3] += 5.0
    for module, local in ((norm, True), (torch.nn.GroupNorm(8, 8), False)):
        moved = (module(changed) - module(x)).abs().amax(dim=(0, 1)) > 1e-6  # (H, W)
        assert moved[2, 3] and (moved.sum() == 1) == local
    group, channel = tiny_model(), tiny_model(norm="channel").eval()
    shapes = {key: value.shape for key, value in group.state_dict().items()}
    assert {key: value.shape for key, value in channel.state_dict().items()} == shapes
    assert isinstance(channel.encoder.down[0].block[0].norm1, ChannelNorm)
    channel.save_pretrained(tmp_path / "vq")
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    x = images(2)
    assert loaded.config.norm == "channel" and torch.equal(loaded.encode(x), channel.encode(x))
    with pytest.raises(ValueError, match="norm='batch'"):
        tiny_config(norm="batch")


@pytest.mark.parametrize("encoder", ["patch", "conv"])
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_decodes_the_same_with_and_without_autograd(tmp_path, norm, encoder):
    """Without autograd the blocks write swish and the residual in place; with norm="none" the
    norm hands back its input, which must survive for the residual. The decoded images match
    the autograd forward, norm="none" leaves the decoder without norm weights, and every norm
    survives save/load."""
    model = tiny_model(norm=norm, encoder=encoder).eval()
    codes = torch.randint(0, model.codebook_size, (2, 4, 4))
    latents = model.quantize.lookup(codes)  # (B, D, h, w)
    with torch.no_grad():
        fast = model.decode_latents(latents)
    torch.testing.assert_close(fast, model.decode_latents(latents).detach())
    norm_keys = [key for key in model.state_dict() if key.startswith("decoder.") and ".norm" in key]
    assert (norm_keys == []) == (norm == "none")  # the patch encoder keeps its own ChannelNorms
    if norm == "layer":  # one group: GroupNorm's keys, one mean and variance per image
        assert model.decoder.norm_out.num_groups == 1 and norm_keys
    model.save_pretrained(tmp_path / "vq")
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    assert loaded.config.norm == norm and torch.equal(loaded.decode(codes), model.decode(codes))


@pytest.mark.parametrize("encoder", ["patch", "conv"])
def test_patch_encoder_codes_see_only_their_own_patch(tmp_path, encoder):
    """encoder="patch": a latent is a function of its own f x f patch, so changing pixels outside
    a patch never changes its latent, and identical patches get identical codes. taming's
    convolutional encoder (GroupNorm, mid attention) lets every pixel move every latent."""
    model = tiny_model(encoder=encoder, attn_resolutions=()).eval()
    f = model.downsample_factor
    x = images(2)
    changed = x.clone()
    changed[:, :, f:, :] = -x[:, :, f:, :]  # every patch row but the first
    with torch.no_grad():
        moved = (model.encoder(changed) - model.encoder(x)).abs().amax(dim=(0, 1)) > 1e-6
    assert moved[1:].all()  # (h, w): the changed rows moved
    assert (not moved[0].any()) == (encoder == "patch")
    if encoder == "conv":
        return
    flat = torch.full((1, 3, 16, 16), 0.3)  # one colour everywhere: one code everywhere
    assert model.encode(flat).unique().numel() == 1
    assert {"encoder.conv_in.weight", "encoder.blocks.0.fc1.weight"} <= set(model.state_dict())
    model.save_pretrained(tmp_path / "vq")
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    assert loaded.config.encoder == "patch" and torch.equal(loaded.encode(x), model.encode(x))


def test_inference_path_equals_the_autograd_path():
    """ResnetBlocks run swish and the residual add in place when autograd is off (and the model
    may be channels_last for CPU inference): the same values as the differentiable path."""
    model = tiny_model().eval()
    x = images(2)
    expected = model.decoder(model.encoder(x))  # autograd on: out-of-place ops
    assert expected.requires_grad
    with torch.inference_mode():
        torch.testing.assert_close(model.decoder(model.encoder(x)), expected.detach())
        last = model.to(memory_format=torch.channels_last)
        batch = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(last.decoder(last.encoder(batch)), expected.detach())


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        VQGAN.from_pretrained(tmp_path / "missing")
    tiny_model("ema").save_pretrained(tmp_path / "vq")
    config_path = tmp_path / "vq" / "config.json"
    values = json.loads(config_path.read_text())
    values["ema"] = False  # the EMA buffers in the weights are now unexpected keys
    config_path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"unexpected keys.*cluster_size"):
        VQGAN.from_pretrained(tmp_path / "vq")


def test_identity_is_deterministic_and_sensitive():
    torch.manual_seed(1)
    first = tiny_model()
    torch.manual_seed(1)
    second = tiny_model()
    identity = first.identity()
    assert identity == second.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["codebook_size"] == 32 and identity["latent_shape"] == [8, 8]
    assert identity["downsample_factor"] == 2 and identity["class"] == "VQGAN"
    with torch.no_grad():
        second.decoder.conv_out.bias[0] += 1e-3
    assert second.identity()["weights_sha256"] != identity["weights_sha256"]
    assert second.identity()["config_sha256"] == identity["config_sha256"]
    assert tiny_model(beta=0.5).identity()["config_sha256"] != identity["config_sha256"]


def test_satisfies_image_tokenizer_protocol():
    model = tiny_model()
    assert isinstance(model, ImageTokenizer)
    assert model.can_decode is True
    assert not isinstance(object(), ImageTokenizer)


def test_input_validation():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="multiple of the VQGAN downsample factor 2"):
        model.encode(images(1, 15))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(ValueError, match="integer tensor"):
        model.decode(torch.zeros(1, 8, 8))


def test_bf16_autocast_keeps_quantizer_in_fp32():
    model = tiny_model("l2-restart", entropy_weight=0.1).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
    assert out.quantizer_loss.dtype == torch.float32
    assert out.stats["entropy_loss"].dtype == torch.float32
    out.quantizer_loss.backward()
    assert model.encoder.conv_in.weight.grad is not None


def record_input_dtypes(monkeypatch, namespace, name: str) -> list:
    """Wrap `namespace.name` so each call appends its first argument's dtype to the list."""
    seen, original = [], getattr(namespace, name)

    def recording(x, *args, **kwargs):
        seen.append(x.dtype)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(namespace, name, recording)
    return seen


def test_group_norm_runs_in_fp32_under_cpu_autocast_and_keeps_the_keys(monkeypatch):
    import tokenizer.modules as modules

    group_norm = F.group_norm
    seen = record_input_dtypes(monkeypatch, modules.F, "group_norm")
    norm = GroupNorm(4, 8, eps=1e-6)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    expected = group_norm(x.float(), 4, norm.weight, norm.bias, 1e-6).bfloat16()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert norm.state_dict().keys() == torch.nn.GroupNorm(4, 8).state_dict().keys()
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.float()).dtype == torch.float32  # fp32 input under autocast
    norm.bfloat16()(x)  # bf16 weights too
    assert seen == [torch.float32, torch.float32]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_under_cpu_autocast_normalises_nchw_and_keeps_the_layout(monkeypatch, layout):
    """oneDNN's bf16 convolutions hand GroupNorm channels-last tensors; it normalises an NCHW
    copy (the fast kernel) and returns the input's layout, with the values of nn.GroupNorm."""
    import tokenizer.modules as modules

    layouts, group_norm = [], F.group_norm

    def recording(x, *args, **kwargs):
        layouts.append(x.is_contiguous())
        return group_norm(x, *args, **kwargs)

    monkeypatch.setattr(modules.F, "group_norm", recording)
    norm = GroupNorm(4, 8, eps=1e-6)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0)).bfloat16()
    x = x.contiguous(memory_format=layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert layouts == [True]
    assert out.is_contiguous(memory_format=layout) and out.dtype == torch.bfloat16
    expected = group_norm(x.float().contiguous(), 4, norm.weight, norm.bias, 1e-6).bfloat16()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_attention_block_runs_sdpa_in_fp32_under_cpu_autocast(monkeypatch):
    """AttnBlock goes through codegrid.precision's SDPA: fp32 on CPU under bf16 autocast (the
    bf16 CPU backward was 6x slower), with bf16 weights too; outputs close to the fp32 block."""
    import codegrid.precision as precision

    seen = record_input_dtypes(monkeypatch, precision.F, "scaled_dot_product_attention")
    torch.manual_seed(0)
    block = AttnBlock(8)
    x = torch.randn(2, 8, 4, 4)
    expected = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert seen == [torch.float32, torch.float32]
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)
    block.bfloat16()(x.bfloat16())
    assert seen[-1] == torch.float32


def test_matches_taming_reference():
    """Our state_dict loads into taming's Encoder/Decoder with strict=True and gives the same
    outputs; the quantizer equals taming's VectorQuantizer2 with the beta fix (legacy=False)."""
    taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
    taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")
    # taming's GroupNorm always has 32 groups, so channels must be multiples of 32
    config = VQGANConfig.from_preset(
        "cpu-tiny", **{**TINY, **VARIANTS["classic"], "ch": 32, "z_channels": 32}
    )
    model = VQGAN(config).eval()
    ddconfig = {
        "ch": 32,
        "out_ch": 3,
        "ch_mult": config.ch_mult,
        "num_res_blocks": 1,
        "attn_resolutions": config.attn_resolutions,
        "in_channels": 3,
        "resolution": 16,
        "z_channels": 32,
        "double_z": False,
        "dropout": 0.0,
    }
    encoder, decoder = taming_model.Encoder(**ddconfig), taming_model.Decoder(**ddconfig)
    quantizer = taming_quantize.VectorQuantizer2(32, 4, beta=0.25, legacy=False)
    state = model.state_dict()
    for prefix, module in (("encoder.", encoder), ("decoder.", decoder), ("quantize.", quantizer)):
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    x = images(2)
    with torch.no_grad():
        h = encoder(x)
        torch.testing.assert_close(model.encoder(x), h, rtol=1e-5, atol=1e-5)
        z = model.quant_conv(h)
        ours = model.quantize(z)
        theirs, loss, (_, _, indices) = quantizer(z)
        assert torch.equal(ours.indices.flatten(), indices.flatten())
        torch.testing.assert_close(ours.quantized, theirs)
        torch.testing.assert_close(ours.loss, loss)
        reference = decoder(model.post_quant_conv(theirs))
        torch.testing.assert_close(model.decode_latents(ours.quantized), reference)


def test_taming_f16_preset_matches_taming_parameters():
    taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
    config = PRESETS["taming-f16-1024"]
    with torch.device("meta"):
        model = VQGAN(config)
        ddconfig = {
            "ch": 128,
            "out_ch": 3,
            "ch_mult": config.ch_mult,
            "num_res_blocks": 2,
            "attn_resolutions": config.attn_resolutions,
            "in_channels": 3,
            "resolution": 256,
            "z_channels": 256,
            "double_z": False,
        }
        encoder, decoder = taming_model.Encoder(**ddconfig), taming_model.Decoder(**ddconfig)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}
    theirs |= {f"decoder.{k}": tuple(v.shape) for k, v in decoder.state_dict().items()}
    theirs |= {"quantize.embedding.weight": (1024, 256)}
    theirs |= {f"{n}.weight": (256, 256, 1, 1) for n in ("quant_conv", "post_quant_conv")}
    theirs |= {f"{n}.bias": (256,) for n in ("quant_conv", "post_quant_conv")}
    assert ours == theirs and len(ours) == 343


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("taming-f16-1024", 72.1),
        ("taming-f16-16384", 76.1),
        ("llamagen-vq16", 71.9),
        ("taming-f8-16384", 67.7),
    ],
)
def test_large_presets_parameter_counts(name, millions):
    with torch.device("meta"):
        model = VQGAN(VQGANConfig.from_preset(name))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions
    assert model.latent_shape(256, 256) == (
        (16, 16) if "f16" in name or "vq16" in name else (32, 32)
    )


def test_cpu_tiny_preset():
    config = VQGANConfig.from_preset("cpu-tiny")
    model = VQGAN(config)
    assert model.latent_shape(32, 32) == (8, 8) and config.codebook_size >= 256
    assert config.l2_normalize and config.restart_dead_codes and config.codebook_dim == 8
    assert not config.mid_attention  # its strays at the border made large objects unclean
    assert 0.2e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    classic = VQGANConfig.from_preset("cpu-tiny-classic")
    assert not classic.l2_normalize and not classic.restart_dead_codes and not classic.ema


def test_config_json_round_trip_and_fsq_derivation():
    config = VQGANConfig.from_preset("cpu-tiny", quantizer="fsq", fsq_levels=[4, 4, 4])
    assert config.codebook_size == 64 and config.codebook_dim == 3
    assert not config.l2_normalize and not config.restart_dead_codes
    values = json.loads(json.dumps(dataclasses.asdict(config)))
    assert config_from_dict(VQGANConfig, values) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 30}, r"resolution=30 .*multiple of the downsample factor 4"),
        ({"quantizer": "gumbel"}, r"quantizer='gumbel' .*\('vq', 'fsq'\)"),
        ({"attn_resolutions": (5,)}, r"attn_resolutions=\(5,\) .*\(32, 16, 8\)"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"codebook_size": 1}, "codebook_size=1"),
        ({"encoder": "vit"}, r"encoder='vit' .*\('conv', 'patch'\)"),
        ({"ema_decay": 1.0}, "ema_decay=1.0"),
        ({"fsq_levels": (4, 4)}, r"fsq_levels=\(4, 4\) .*quantizer='fsq'"),
        ({"quantizer": "fsq", "fsq_levels": (4, 4), "codebook_size": 10}, "codebook_size=10"),
        ({"quantizer": "fsq", "fsq_levels": (4, 1)}, "fsq_levels"),
        ({"quantizer": "fsq", "fsq_levels": (4, 4), "ema": True}, "ema=True"),
        # floats and bools pass the range checks but are not sizes
        ({"codebook_size": 1024.0}, r"codebook_size=1024\.0 .*integer"),
        ({"codebook_dim": 8.0}, r"codebook_dim=8\.0 .*integer"),
        ({"resolution": 32.0}, r"resolution=32\.0 .*integer multiple"),
        ({"restart_threshold": 20.0}, r"restart_threshold=20\.0 .*integer"),
        ({"z_channels": True}, r"z_channels=True .*integer"),
        ({"attn_resolutions": (8.0,)}, r"attn_resolutions=\(8\.0,\)"),
        ({"quantizer": "fsq", "fsq_levels": (4.0, 4)}, r"fsq_levels=\(4\.0, 4\) .*integers"),
    ],
)
def test_config_validation_names_field_and_allowed_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        VQGANConfig.from_preset("cpu-tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown VQGAN preset 'nope'.*cpu-tiny"):
        VQGANConfig.from_preset("nope")


def test_misspelt_preset_override_lists_valid_fields():
    with pytest.raises(
        ValueError,
        match=r"unknown VQGANConfig field\(s\) \['codebok_size'\]; allowed .*'codebook_size'",
    ):
        VQGANConfig.from_preset("cpu-tiny", codebok_size=64)


def test_attention_block_runs_on_the_fused_kernel():
    """q, k, v reach SDPA with a stride-1 last dimension, so the fused (flash) kernel takes
    them: restricted to it, transposed views would raise "No available kernel". The result
    equals softmax(q k^T / sqrt(C)) v written out."""
    torch.manual_seed(0)
    block = AttnBlock(8).eval()
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = block(x)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, HW)
        weights = F.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)  # (B, HW, HW)
        out = (v @ weights.transpose(1, 2)).view_as(x)  # (B, C, H, W)
        reference = x + block.proj_out(out)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
