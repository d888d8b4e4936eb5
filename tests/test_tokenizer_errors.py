"""Clear errors on malformed tokenizer inputs: converter configs and checkpoints with missing
entries or broken JSON, adapter folders without config or VQ weights, adapter code checks, and
the adapter's pixel statistics following the wrapped model's device and dtype."""

from __future__ import annotations

import json
import re

import pytest
import torch
from convert_references import taming_yaml
from safetensors.torch import save_file
from torch import nn

from tokenizer.adapters import ChameleonAdapter, ExternalTokenizerAdapter
from tokenizer.convert_common import _unsafe_globals
from tokenizer.convert_diffusers import diffusers_config, read_diffusers_folder
from tokenizer.convert_llamagen import infer_llamagen_config
from tokenizer.convert_taming import taming_config

pytestmark = pytest.mark.reliability

DDCONFIG = {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3,
            "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
            "attn_resolutions": [16], "dropout": 0.0}  # fmt: skip
DIFFUSERS = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 32,
             "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
             "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
             "num_vq_embeddings": 64, "vq_embed_dim": 8, "sample_size": 32}  # fmt: skip


@pytest.mark.parametrize(
    ("section", "field"),
    [("ddconfig", name) for name in ("resolution", "ch", "ch_mult", "out_ch", "attn_resolutions")]
    + [("params", "n_embed"), ("params", "embed_dim")],
)
def test_taming_yaml_missing_field_is_named(section, field):
    values = taming_yaml(dict(DDCONFIG), 64, 8)
    assert taming_config(values, source="model.yaml")[0].codebook_size == 64  # complete: loads
    params = values["model"]["params"]
    del (params["ddconfig"] if section == "ddconfig" else params)[field]
    with pytest.raises(
        ValueError, match=re.escape(f"model.yaml: required key '{section}.{field}'")
    ):
        taming_config(values, source="model.yaml")


@pytest.mark.parametrize(
    "field", ["block_out_channels", "down_block_types", "layers_per_block", "num_vq_embeddings"]
)
def test_diffusers_config_missing_field_is_named(field):
    assert diffusers_config(dict(DIFFUSERS), "cfg.json").codebook_size == 64  # complete: loads
    values = {key: value for key, value in DIFFUSERS.items() if key != field}
    with pytest.raises(ValueError, match=re.escape(f"cfg.json: required key '{field}'")):
        diffusers_config(values, "cfg.json")


@pytest.mark.parametrize(("text", "message"), [("{not json", "not valid JSON"), ("[1]", "list")])
def test_diffusers_broken_config_json_names_the_file(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'config.json'))}.*{message}"):
        read_diffusers_folder(tmp_path)


def llamagen_state_dict() -> dict[str, torch.Tensor]:
    return {
        "encoder.conv_in.weight": torch.zeros(32, 3, 3, 3),
        "encoder.conv_blocks.0.res.0.conv1.weight": torch.zeros(32, 32, 3, 3),
        "encoder.conv_blocks.1.attn.0.q.weight": torch.zeros(64, 64, 1, 1),  # level 1 lacks res.0
        "quant_conv.weight": torch.zeros(8, 32, 1, 1),
        "quantize.embedding.weight": torch.zeros(64, 8),
        "decoder.conv_out.weight": torch.zeros(3, 32, 3, 3),
    }


@pytest.mark.parametrize(
    ("drop", "missing"),
    [
        ("quant_conv.weight", "quant_conv.weight"),
        ("decoder.conv_out.weight", "decoder.conv_out.weight"),
        (None, "encoder.conv_blocks.1.res.0.conv1.weight"),
    ],
)
def test_llamagen_missing_key_is_named(drop, missing):
    state_dict = llamagen_state_dict()
    state_dict.pop(drop, None)
    with pytest.raises(ValueError, match=re.escape(f"ckpt.pt: required key '{missing}'")):
        infer_llamagen_config(state_dict, 32, source="ckpt.pt")


@pytest.mark.parametrize("kind", ["empty", "text", "zip_header", "truncated_checkpoint"])
def test_unsafe_globals_scan_survives_unreadable_files(tmp_path, kind):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(4)}, path)
    contents = {"empty": b"", "text": b"garbage" * 10, "zip_header": b"PK\x03\x04junk"}
    path.write_bytes(contents.get(kind, path.read_bytes()[:200]))
    assert _unsafe_globals(path) == []


def test_unsafe_globals_scan_does_not_hide_programming_errors(tmp_path, monkeypatch):
    def broken(file):
        raise TypeError("a bug, not a bad file")

    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", broken)
    with pytest.raises(TypeError, match="a bug"):
        _unsafe_globals(tmp_path / "model.pt")


# ---------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize(
    ("files", "error", "message"),
    [
        ({}, FileNotFoundError, "has no config.json"),
        ({"config.json": "{oops"}, ValueError, r"config\.json is not valid JSON"),
        ({"config.json": json.dumps({"model_type": "chameleon"})}, ValueError, "'model.vqmodel.'"),
    ],
)
def test_adapter_folder_errors_name_the_folder(tmp_path, files, error, message):
    folder = tmp_path / "chameleon"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    save_file({"model.layers.0.mlp.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    with pytest.raises(error, match=rf"{re.escape(str(folder))}.*{message}"):
        ChameleonAdapter.from_pretrained(folder)


def test_adapter_folder_with_foreign_keys_names_them(tmp_path):
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    config = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=8,
                                  resolution=8, base_channels=32, channel_multiplier=[1, 2],
                                  num_res_blocks=1, attn_resolutions=[])  # fmt: skip
    ChameleonVQVAE(config).save_pretrained(tmp_path / "vq")
    weights = tmp_path / "vq" / "model.safetensors"
    save_file({"wrong.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \[.*unexpected keys \['wrong\.weight'\]"):
        ChameleonAdapter.from_pretrained(tmp_path / "vq")


class ConvAdapter(ExternalTokenizerAdapter):
    """A 1x1 conv as the wrapped model: enough for the shared checks and normalisation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, codebook_size=8, downsample_factor=1, resolution=4,
                         image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 0.125))  # fmt: skip

    def _decode_model(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.zeros(codes.shape[0], 3, *codes.shape[1:])  # (B, 3, h, w)


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (torch.tensor([[[0, 9]]]), r"codes must lie in \[0, 8\); got min 0 max 9"),
        (torch.tensor([[[-1, 3]]]), r"got min -1 max 3"),
        (torch.zeros(1, 1, 2), r"integer tensor \(B, h, w\); got torch\.float32 \(1, 1, 2\)"),
        (torch.zeros(1, 1, 2, dtype=torch.bool), r"got torch\.bool \(1, 1, 2\)"),
        (torch.zeros(1, 2, dtype=torch.long), r"got torch\.int64 \(1, 2\)"),
    ],
)
def test_adapter_code_errors_name_dtype_and_range(codes, message):
    with pytest.raises(ValueError, match=message):
        ConvAdapter(nn.Conv2d(3, 3, 1)).decode(codes)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_adapter_normalisation_follows_dtype_and_input_device(dtype):
    """The statistics are exact whatever the adapter's dtype (a bf16 buffer would round 0.2
    to 0.2002), and meet the pixels on their device (a model moved without its adapter)."""
    images = torch.rand(2, 3, 4, 4) * 2 - 1  # (B, 3, H, W)
    adapter = ConvAdapter(nn.Conv2d(3, 3, 1)).to(dtype)
    used_mean, used_std = adapter._normalisation(images.device)
    assert torch.equal(used_mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(used_std.flatten(), torch.tensor([0.5, 0.25, 0.125]))
    pixels = adapter.to_model_pixels(images)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)  # (1, C, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)  # (1, C, 1, 1)
    assert pixels.dtype == dtype
    tolerance = {} if dtype == torch.float64 else {"atol": 0.05, "rtol": 0.01}
    torch.testing.assert_close(pixels.float(), ((images + 1) / 2 - mean) / std, **tolerance)
    torch.testing.assert_close(adapter.from_model_pixels(pixels), images, **tolerance)
    # Pixels on another device than the statistics (a model moved without its adapter).
    assert adapter.to_model_pixels(images.to("meta")).device.type == "meta"
    assert adapter.from_model_pixels(pixels.to("meta")).device.type == "meta"
