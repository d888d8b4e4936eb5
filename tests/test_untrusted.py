"""Untrusted files (issue 8, item 7): a malicious pickle checkpoint is refused by every converter
that reads pickles and nothing in it runs; loading local files never touches the network."""

from __future__ import annotations

import argparse
import os
import socket

import pytest
import torch
import yaml

from tokenizer.convert import convert_diffusers, convert_llamagen, convert_taming
from tokenizer.convert_common import CheckpointStub, load_pickled_checkpoint

pytestmark = pytest.mark.reliability


class RunsCommand:
    """Unpickling this calls os.system: what a booby-trapped checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def taming_yaml(path) -> None:
    dd = {"double_z": False, "z_channels": 32, "resolution": 16, "in_channels": 3, "out_ch": 3,
          "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
    params = {"embed_dim": 8, "n_embed": 16, "ddconfig": dd}
    path.write_text(
        yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": params}})
    )


@pytest.mark.parametrize(
    ("source", "hiding_place"),
    [
        ("taming", "state_dict"),
        ("taming", "callbacks"),
        ("llamagen", "model"),
        ("llamagen", "args"),
        ("diffusers", "bin"),
    ],
)
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, source, hiding_place):
    marker = tmp_path / "pwned"
    payload = RunsCommand(f"touch {marker}")
    checkpoint = {"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "model": {}}
    if hiding_place in ("state_dict", "model"):
        checkpoint[hiding_place] = {"encoder.conv_in.weight": payload}
    elif hiding_place == "bin":
        checkpoint = {"encoder.conv_in.weight": payload}
    else:
        checkpoint[hiding_place] = {"ModelCheckpoint": payload}
    if source == "diffusers":
        folder = tmp_path / "vq"
        folder.mkdir()
        (folder / "config.json").write_text(
            '{"_class_name": "VQModel", "block_out_channels": [32]}'
        )
        path = folder / "diffusion_pytorch_model.bin"
    else:
        path = tmp_path / ("last.ckpt" if source == "taming" else "vq.pt")
    torch.save(checkpoint, path)
    taming_yaml(tmp_path / "model.yaml")
    safe_before = set(torch.serialization.get_safe_globals())

    with pytest.raises(ValueError, match=r"was refused.*posix\.system|was refused.*os\.system"):
        if source == "taming":
            convert_taming(path, tmp_path / "model.yaml")
        elif source == "llamagen":
            convert_llamagen(path)
        else:
            convert_diffusers(path.parent)
    assert not marker.exists()
    assert set(torch.serialization.get_safe_globals()) == safe_before  # the stubs were scoped

    # The fixture really is malicious: an unsafe load (never done by the converters) runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_known_harmless_globals_load_as_inert_stubs(tmp_path):
    path = tmp_path / "vq.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-4, vq_model="VQ-16")}, path)
    loaded = load_pickled_checkpoint(path)
    assert isinstance(loaded["args"], CheckpointStub)
    assert vars(loaded["args"]) == {"lr": 1e-4, "vq_model": "VQ-16"}


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_pickled_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pickled_checkpoint(tmp_path / "missing.ckpt")


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or DNS lookup fails; the Hub libraries are not in offline mode,
    so a download attempt would reach the socket layer and fail the test."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_local_sources_never_touch_the_network(tmp_path, no_network):
    from diffusers import VQModel
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig, JanusVQVAE, JanusVQVAEConfig

    from tokenizer.adapters import ChameleonAdapter, DiffusersVQAdapter
    from tokenizer.convert import convert_janus, convert_tokenizer

    VQModel(block_out_channels=(32,), latent_channels=32, num_vq_embeddings=16,
            sample_size=16).save_pretrained(tmp_path / "vq")  # fmt: skip
    janus = JanusVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=32, base_channels=32,
                             channel_multiplier=[1, 2], num_res_blocks=1, num_patches=8)  # fmt: skip
    JanusVQVAE(janus).save_pretrained(tmp_path / "janus")
    chameleon = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=32,
                                     resolution=16, base_channels=32, channel_multiplier=[1, 2],
                                     num_res_blocks=1, attn_resolutions=[])  # fmt: skip
    ChameleonVQVAE(chameleon).save_pretrained(tmp_path / "chameleon")

    assert convert_diffusers(tmp_path / "vq").codebook_size == 16
    assert convert_janus(tmp_path / "janus").codebook_size == 16
    assert DiffusersVQAdapter.from_pretrained(tmp_path / "vq").codebook_size == 16
    assert ChameleonAdapter.from_pretrained(tmp_path / "chameleon").codebook_size == 16
    with pytest.raises(FileNotFoundError, match="converters never download"):
        convert_tokenizer("llamagen", "FoundationVision/LlamaGen")
