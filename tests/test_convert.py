"""Parity of the checkpoint converters with the reference implementations from their own pip
packages (taming-transformers-rom1504 modules, diffusers VQModel, transformers JanusVQVAE) and with
LlamaGen's key layout. Each reference gets a random init and a tiny config, is saved in its own
checkpoint format, converted, and compared: identical codes on random images, decode within
1e-5 (fp32), and a strict key mapping (an extra key is an error naming it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from convert_references import (
    CODEBOOK,
    TamingVQ,
    diffusers_decode,
    diffusers_encode,
    lightning_checkpoint,
    llamagen_decode,
    llamagen_encode,
    perturb_,
    random_images,
    taming_yaml,
    tiny_janus,
    tiny_vqmodel,
    to_llamagen_key,
)
from safetensors.torch import load_file, save_file

from tokenizer import PRESETS, VQGAN
from tokenizer.convert import (
    convert_diffusers,
    convert_janus,
    convert_llamagen,
    convert_taming,
    convert_tokenizer,
)
from tokenizer.convert_llamagen import infer_llamagen_config
from tokenizer.convert_taming import taming_config

ATOL = 1e-5
TAMING_CASES = {
    # name: (ddconfig overrides, n_embed, embed_dim); small stand-ins for the published layouts
    "f16-1024": ({"ch_mult": [1, 2], "attn_resolutions": [16]}, CODEBOOK, 32),
    "f16-16384": ({"ch_mult": [1, 2], "attn_resolutions": [16]}, 2 * CODEBOOK, 32),
    "f8": ({"ch_mult": [1, 1, 2], "attn_resolutions": [8], "z_channels": 4}, CODEBOOK, 4),
}


def assert_parity(ours: VQGAN, reference: torch.nn.Module, ref_encode, ref_decode, images) -> float:
    """Codes identical; decodes within ATOL in fp32 (unclamped, and clamped as `decode` returns),
    and within 1e-10 in fp64, which shows the fp32 gap is rounding only. Returns the fp32 gap."""
    codes = ours.encode(images)
    expected = ref_encode(images)
    assert codes.shape == expected.shape and codes.dtype == torch.long
    assert torch.equal(codes, expected)
    assert codes.unique().numel() > 1  # a constant code map would hide an orientation bug
    with torch.no_grad():
        target = ref_decode(codes)
        unclamped = ours.decode_latents(ours.quantize.lookup(codes))
        diff = (unclamped - target).abs().max().item()
        assert diff <= ATOL, diff
        assert (ours.decode(codes) - target.clamp(-1, 1)).abs().max().item() <= ATOL
        ours.double(), reference.double()
        weight = ours.quantize.embedding.weight  # (K, D) fp64; our lookup itself is fp32
        weight = F.normalize(weight, dim=-1) if ours.config.l2_normalize else weight
        latents = F.embedding(codes, weight).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)
        exact = ours.decode_latents(latents) - ref_decode(codes)
        assert exact.abs().max().item() <= 1e-10
    return diff


# ----------------------------------------------------------------------------------- taming
def make_taming(tmp_path: Path, monkeypatch, case: str, nested: bool = False):
    overrides, n_embed, embed_dim = TAMING_CASES[case]
    ddconfig = {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3,
                "out_ch": 3, "ch": 32, "num_res_blocks": 1, "dropout": 0.0, **overrides}  # fmt: skip
    reference = perturb_(TamingVQ(ddconfig, n_embed, embed_dim), seed=0)
    state_dict = dict(reference.state_dict())
    state_dict["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)  # dropped on load
    state_dict["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    values = taming_yaml(ddconfig, n_embed, embed_dim)
    if nested:  # a cond_transformer checkpoint: the VQGAN is first_stage_model.*
        state_dict = {f"first_stage_model.{k}": v for k, v in state_dict.items()}
        state_dict["transformer.tok_emb.weight"] = torch.randn(n_embed, 16)
        stage = values["model"]
        values = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer",
                            "params": {"first_stage_config": stage, "transformer_config": {}}}}  # fmt: skip
    ckpt, config = tmp_path / "last.ckpt", tmp_path / "model.yaml"
    torch.save(lightning_checkpoint(state_dict, monkeypatch), ckpt)
    config.write_text(yaml.safe_dump(values))
    return reference, ckpt, config


@pytest.mark.parametrize(
    ("case", "nested"), [(c, False) for c in TAMING_CASES] + [("f16-1024", True)]
)
def test_taming_parity(tmp_path, monkeypatch, case, nested):
    reference, ckpt, config = make_taming(tmp_path, monkeypatch, case, nested)
    monkeypatch.delitem(sys.modules, "pytorch_lightning")  # the converter must not need it
    ours = convert_taming(ckpt, config)
    assert_parity(ours, reference, reference.encode_codes, reference.decode_codes, random_images())


@pytest.mark.parametrize(
    ("name", "n_embed", "ddconfig"),
    [
        ("taming-f16-1024", 1024, {"ch_mult": [1, 1, 2, 2, 4], "attn_resolutions": [16]}),
        ("taming-f16-16384", 16384, {"ch_mult": [1, 1, 2, 2, 4], "attn_resolutions": [16]}),
        (
            "taming-f8-16384",
            16384,
            {"ch_mult": [1, 2, 2, 4], "attn_resolutions": [32], "z_channels": 4},
        ),
    ],
)
def test_published_taming_yaml_matches_preset(name, n_embed, ddconfig):
    """The published YAMLs' numbers (taming configs/, LDM vq-f8) give our presets exactly."""
    dd = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
          "ch": 128, "num_res_blocks": 2, "dropout": 0.0, **ddconfig}  # fmt: skip
    config, nested = taming_config(taming_yaml(dd, n_embed, dd["z_channels"]))
    assert config == PRESETS[name] and not nested


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": "taming.models.vqgan.GumbelVQ"}, "Gumbel"),
        ({"params.remap": "used.npy"}, "remap"),
        ({"ddconfig.double_z": True}, "double_z"),
        ({"target": "taming.models.vqgan.EMAVQ"}, "EMAVQ"),
    ],
)
def test_taming_refuses_unsupported(change, message):
    dd = {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3,
          "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
    values = taming_yaml(dd, 64, 8)
    for key, value in change.items():
        if key == "target":
            values["model"]["target"] = value
        elif key.startswith("params."):
            values["model"]["params"][key.split(".")[1]] = value
        else:
            values["model"]["params"]["ddconfig"][key.split(".")[1]] = value
    with pytest.raises(ValueError, match=message):
        taming_config(values)


# --------------------------------------------------------------------------------- LlamaGen
@pytest.fixture
def llamagen(tmp_path):
    """LlamaGen VQ layout (attention at the lowest level only, 8-dim l2 codebook) from taming's
    modules, which LlamaGen's match (research notes 2.3), saved as vq_train.py does."""
    ddconfig = {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3,
                "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                "attn_resolutions": [16], "dropout": 0.0}  # fmt: skip
    reference = perturb_(TamingVQ(ddconfig, CODEBOOK, 8), seed=1)
    state_dict = {to_llamagen_key(k, 2): v for k, v in reference.state_dict().items()}
    state_dict["quantize.codebook_used"] = torch.zeros(1024)
    args = argparse.Namespace(vq_model="VQ-16", codebook_size=CODEBOOK, codebook_l2_norm=True)
    path = tmp_path / "vq_ds16_c2i.pt"
    checkpoint = {"model": state_dict, "optimizer": {"state": {}}, "steps": 10, "args": args}
    torch.save(checkpoint, path)
    return reference, path


def test_llamagen_parity(llamagen, tmp_path):
    reference, path = llamagen
    ours = convert_llamagen(path, resolution=32)
    assert ours.config.l2_normalize and ours.config.codebook_dim == 8
    assert ours.config.attn_resolutions == (16,)
    encode = lambda images: llamagen_encode(reference, images)  # noqa: E731
    decode = lambda codes: llamagen_decode(reference, codes)  # noqa: E731
    assert_parity(ours, reference, encode, decode, random_images())


def test_llamagen_preset_mismatch_is_named(llamagen):
    _, path = llamagen
    with pytest.raises(ValueError, match="ch_mult"):
        convert_llamagen(path, "VQ-8", resolution=32)
    with pytest.raises(ValueError, match="'ema' entry"):
        convert_llamagen(path, checkpoint_key="ema")
    inferred = infer_llamagen_config(torch.load(path, weights_only=False)["model"], 32)
    wrong = dataclasses.replace(inferred, codebook_dim=4)
    with pytest.raises(ValueError, match=r"'quantize\.embedding\.weight' has shape \(64, 8\)"):
        convert_llamagen(path, wrong)


# -------------------------------------------------------------------------------- diffusers
@pytest.mark.parametrize(
    ("legacy_attention_names", "mid_attention"), [(False, True), (True, True), (False, False)]
)
def test_diffusers_parity(tmp_path, legacy_attention_names, mid_attention):
    """mid_attention=False is aMUSEd's layout (`mid_block_add_attention=False`)."""
    reference = tiny_vqmodel(mid_block_add_attention=mid_attention)
    reference.save_pretrained(tmp_path / "vq")
    if legacy_attention_names:  # diffusers < 0.14 wrote query/key/value/proj_attn
        weights = tmp_path / "vq" / "diffusion_pytorch_model.safetensors"
        names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        tensors = load_file(str(weights))
        for new, old in names.items():
            tensors = {k.replace(f".{new}.", f".{old}."): v for k, v in tensors.items()}
        save_file(tensors, str(weights))
    ours = convert_diffusers(tmp_path / "vq")
    assert ours.config.attn_resolutions == (16,) and ours.config.ch_mult == (1, 2)
    assert ours.config.mid_attention is mid_attention
    assert any(".mid.attn_1." in key for key in ours.state_dict()) is mid_attention
    encode = lambda images: diffusers_encode(reference, images)  # noqa: E731
    decode = lambda codes: diffusers_decode(reference, codes)  # noqa: E731
    assert_parity(ours, reference, encode, decode, random_images())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"norm_type": "spatial"}, "norm_type='spatial'"),
        ({"up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D")}, "attention levels"),
        ({"norm_num_groups": 16}, "norm_num_groups=16"),
    ],
)
def test_diffusers_refuses_unsupported(tmp_path, overrides, message):
    tiny_vqmodel(**overrides).save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_diffusers(tmp_path / "vq")


# ------------------------------------------------------------------------------------ Janus
def janus_reference_with_unit_rows(reference):
    """The reference with its codebook rows l2-normalised, as the converter stores them."""
    with torch.no_grad():
        reference.quantize.embedding.weight.copy_(
            F.normalize(reference.quantize.embedding.weight, dim=-1)
        )
    encode = lambda images: reference.encode(images).image_tokens.view(images.shape[0], 8, 8)  # noqa: E731
    decode = lambda codes: reference.decode(codes.reshape(codes.shape[0], -1))  # noqa: E731  (B, h*w)
    return encode, decode


@pytest.mark.parametrize("layout", ["vqvae_folder", "full_janus_folder", "instance"])
def test_janus_parity(tmp_path, layout):
    reference = tiny_janus()
    if layout == "instance":
        ours = convert_janus(reference)
    elif layout == "vqvae_folder":
        reference.save_pretrained(tmp_path / "janus-vq")
        ours = convert_janus(tmp_path / "janus-vq")
    else:  # composite layout: config.json with vq_config, weights under model.vqmodel.*
        folder = tmp_path / "janus"
        folder.mkdir()
        vq_config = {"embed_dim": 8, "num_embeddings": CODEBOOK, "latent_channels": 32,
                     "base_channels": 32, "channel_multiplier": [1, 2], "num_res_blocks": 1,
                     "num_patches": 8}  # fmt: skip
        (folder / "config.json").write_text(
            json.dumps({"model_type": "janus", "vq_config": vq_config})
        )
        tensors = {f"model.vqmodel.{k}": v.contiguous() for k, v in reference.state_dict().items()}
        tensors["model.language_model.embed_tokens.weight"] = torch.randn(10, 4)
        save_file(tensors, str(folder / "model.safetensors"))
        ours = convert_janus(folder)
    norms = ours.quantize.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert_parity(ours, reference, *janus_reference_with_unit_rows(reference), random_images())


# ------------------------------------------------------------------------ strictness, CLI
def add_key(path: Path, key: str) -> None:
    """Add one tensor to a saved checkpoint in its own format."""
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        tensors[key] = torch.zeros(1)
        save_file(tensors, str(path))
        return
    checkpoint = torch.load(path, weights_only=False)  # our own fixture file
    entry = "state_dict" if "state_dict" in checkpoint else "model"
    checkpoint[entry][key] = torch.zeros(1)
    torch.save(checkpoint, path)


@pytest.mark.parametrize(
    ("source", "extra"),
    [
        ("taming", "encoder.down.0.block.0.extra.weight"),
        ("taming", "cond_stage_model.weight"),
        ("llamagen", "encoder.conv_blocks.0.res.0.extra.weight"),
        ("llamagen", "quantize.ema_embedding"),
        ("diffusers", "encoder.mid_block.resnets.0.time_emb_proj.weight"),
        ("diffusers", "decoder.up_blocks.0.upsamplers.1.conv.weight"),
        ("janus", "decoder.up.0.attn.0.scale"),
    ],
)
def test_unmapped_key_is_an_error_naming_it(tmp_path, monkeypatch, llamagen, source, extra):
    if source == "taming":
        _, path, config = make_taming(tmp_path, monkeypatch, "f16-1024")
        target = path
    elif source == "llamagen":
        path, config = llamagen[1], None
        target = path
    elif source == "diffusers":
        tiny_vqmodel().save_pretrained(tmp_path / "vq")
        path, config = tmp_path / "vq", None
        target = path / "diffusion_pytorch_model.safetensors"
    else:
        tiny_janus().save_pretrained(tmp_path / "janus")
        path, config = tmp_path / "janus", None
        target = path / "model.safetensors"
    add_key(target, extra)
    with pytest.raises(ValueError, match=re.escape(repr(extra))):
        convert_tokenizer(source, path, config)


def test_missing_key_is_an_error_naming_it(tmp_path):
    tiny_vqmodel().save_pretrained(tmp_path / "vq")
    weights = tmp_path / "vq" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=re.escape("'decoder.up.0.block.0.nin_shortcut.weight'")):
        convert_diffusers(tmp_path / "vq")


def test_cli_converts_and_verifies(tmp_path, monkeypatch, capsys):
    import convert_tokenizer as cli

    reference, ckpt, config = make_taming(tmp_path, monkeypatch, "f8")
    out = tmp_path / "converted"
    args = cli.parse_args(
        ["--from", "taming", str(ckpt), "--config", str(config), "--out", str(out)]
    )
    capsys.readouterr()  # taming's modules print while the fixture builds them
    identity = cli.main(args)
    assert json.loads(capsys.readouterr().out)["weights_sha256"] == identity["weights_sha256"]
    model = VQGAN.from_pretrained(out)
    assert torch.equal(model.encode(random_images()), reference.encode_codes(random_images()))
    assert dataclasses.asdict(model.config)["z_channels"] == 4
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli.main(args)
    with pytest.raises(ValueError, match="drop --config"):
        convert_tokenizer("diffusers", tmp_path, config)
    with pytest.raises(FileNotFoundError, match="never download"):
        convert_tokenizer("janus", "deepseek-ai/Janus-Pro-1B")
