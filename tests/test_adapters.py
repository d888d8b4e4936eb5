"""Adapters for external VQ models (transformers ChameleonVQVAE and Emu3VQVAE, a live diffusers
VQModel): codes come out as (B, h, w) in the model's own spatial order, decode matches the wrapped
model (or fails clearly), identity hashes the wrapped model, and code extraction plus two prior
training steps run on the codes."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from convert_references import perturb_

from tokenizer import ImageTokenizer
from tokenizer.adapters import (
    ChameleonAdapter,
    DiffusersVQAdapter,
    Emu3Adapter,
    flat_codes_to_grid,
)

CODEBOOK = 64
HEIGHT, WIDTH = 16, 24  # not square, so a transposed reshape cannot pass


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, HEIGHT, WIDTH, generator=generator) * 2 - 1  # (B, 3, H, W)


def chameleon():
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    config = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=CODEBOOK, latent_channels=32,
                                  resolution=16, base_channels=32, channel_multiplier=[1, 2],
                                  num_res_blocks=1, attn_resolutions=[])  # fmt: skip
    return ChameleonAdapter(perturb_(ChameleonVQVAE(config), seed=0))


def emu3():
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    config = Emu3VQVAEConfig(codebook_size=CODEBOOK, embed_dim=4, latent_channels=4,
                             base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                             attn_resolutions=[], hidden_size=64)  # fmt: skip
    return Emu3Adapter(perturb_(Emu3VQVAE(config), seed=1), resolution=16)


def diffusers_vq():
    from diffusers import VQModel

    model = VQModel(block_out_channels=(32, 64), layers_per_block=1, latent_channels=32,
                    down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
                    vq_embed_dim=8, num_vq_embeddings=CODEBOOK, sample_size=16)  # fmt: skip
    return DiffusersVQAdapter(perturb_(model, seed=2))


ADAPTERS = {"chameleon": chameleon, "emu3": emu3, "diffusers": diffusers_vq}


def nearest_codes(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Independent reference: the nearest codebook row at every latent position (b, i, j)."""
    distances = torch.cdist(latents.permute(0, 2, 3, 1), codebook[None])  # (B, h, w, K)
    return distances.argmin(-1)  # (B, h, w)


def reference_codes(name: str, adapter) -> torch.Tensor:
    """Codes computed position by position from the wrapped model's own latents."""
    model, pixels = adapter.model, adapter.to_model_pixels(images())
    with torch.no_grad():
        if name == "chameleon":
            latents = model.quant_conv(model.encoder(pixels))  # (B, D, h, w)
        elif name == "diffusers":
            latents = model.encode(pixels).latents  # (B, D, h, w)
        else:  # Emu3 returns per-image (h, w) grids already: use them as they come
            sizes = torch.tensor([[HEIGHT, WIDTH]] * pixels.shape[0])
            return torch.stack(list(model.encode(pixels, image_sizes=sizes).image_tokens))
    return nearest_codes(latents, model.quantize.embedding.weight)


@pytest.mark.parametrize("name", ADAPTERS)
def test_encode_returns_grid_in_spatial_order(name):
    adapter = ADAPTERS[name]()
    assert isinstance(adapter, ImageTokenizer)
    codes = adapter.encode(images())
    assert codes.shape == (2, HEIGHT // 2, WIDTH // 2) and codes.dtype == torch.long
    assert adapter.latent_shape(HEIGHT, WIDTH) == tuple(codes.shape[1:])
    assert codes.min() >= 0 and codes.max() < adapter.codebook_size == CODEBOOK
    assert codes.unique().numel() > 1
    assert torch.equal(codes, reference_codes(name, adapter))
    with pytest.raises(ValueError, match="multiple of the downsample factor 2"):
        adapter.encode(torch.zeros(1, 3, 15, 16))


def test_flat_codes_to_grid_is_row_major():
    grid = torch.arange(2 * 3 * 4).view(2, 3, 4)  # (B, h, w)
    flat = grid.permute(0, 1, 2).reshape(-1)  # what argmin over (b, h, w)-ordered rows gives
    assert torch.equal(flat_codes_to_grid(flat, 2, 3, 4), grid)
    with pytest.raises(ValueError, match="got 24 codes for a"):
        flat_codes_to_grid(flat, 2, 4, 4)


@pytest.mark.parametrize("name", ["emu3", "diffusers"])
def test_decode_matches_wrapped_model(name):
    adapter = ADAPTERS[name]()
    codes = adapter.encode(images())
    decoded = adapter.decode(codes)
    assert decoded.shape == (2, 3, HEIGHT, WIDTH) and adapter.can_decode
    assert decoded.min() >= -1 and decoded.max() <= 1
    model = adapter.model
    with torch.no_grad():
        if name == "emu3":
            pixels = model.decode(codes)  # (B, 3, H, W), CLIP-normalised
        else:
            quantized = F.embedding(codes, model.quantize.embedding.weight).permute(0, 3, 1, 2)
            pixels = model.decoder(model.post_quant_conv(quantized))  # [-1, 1] model
    expected = adapter.from_model_pixels(pixels)
    assert (decoded - expected).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="codes must lie in"):
        adapter.decode(codes + CODEBOOK)


def test_chameleon_decode_is_a_clear_error():
    adapter = chameleon()
    assert adapter.can_decode is False
    with pytest.raises(NotImplementedError, match="encode-only"):
        adapter.decode(adapter.encode(images()))


@pytest.mark.parametrize("name", ADAPTERS)
def test_identity_hashes_wrapped_model_and_save_is_refused(name, tmp_path):
    adapter = ADAPTERS[name]()
    identity = adapter.identity()
    assert json.loads(json.dumps(identity)) == identity == adapter.identity()
    assert identity["codebook_size"] == CODEBOOK and identity["latent_shape"] == [8, 8]
    with torch.no_grad():
        next(adapter.model.parameters()).add_(1e-3)
    changed = adapter.identity()
    assert changed["weights_sha256"] != identity["weights_sha256"]
    assert changed["config_sha256"] == identity["config_sha256"]
    with pytest.raises(NotImplementedError, match=r"convert it with scripts/convert_tokenizer\.py"):
        adapter.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(("name", "layout"), [("chameleon", "vq_folder"),
                                             ("chameleon", "full_model_folder"),
                                             ("emu3", "vq_folder")])  # fmt: skip
def test_from_pretrained_loads_local_folders_strictly(name, layout, tmp_path):
    """A full multimodal folder keeps the VQ under model.vqmodel.*; transformers' own
    from_pretrained would silently leave it randomly initialised there."""
    from safetensors.torch import save_file

    adapter = ADAPTERS[name]()
    folder = tmp_path / name
    if layout == "vq_folder":
        adapter.model.save_pretrained(folder)
    else:
        folder.mkdir()
        vq_config = adapter.model.config.to_dict()
        (folder / "config.json").write_text(
            json.dumps({"model_type": name, "vq_config": vq_config})
        )
        tensors = {f"model.vqmodel.{k}": v for k, v in adapter.model.state_dict().items()}
        tensors["model.layers.0.mlp.weight"] = torch.zeros(2, 2)  # the language model, not read
        save_file(tensors, str(folder / "model.safetensors"))
    cls = type(adapter)
    loaded = cls.from_pretrained(folder, resolution=16)
    assert loaded.identity() == adapter.identity()


def run_job(module, argv: list[str]):
    """Run a script's main in-process, with a fresh accelerate state before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return module.main(module.parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("name", ADAPTERS)
def test_extract_codes_and_two_prior_steps(name, tmp_path, monkeypatch):
    import extract_codes
    import train_prior

    from pipelines.data.codes import load_codes

    adapter = ADAPTERS[name]()
    # extract_codes' documented hook for tokenizer kinds other than a VQGAN folder; train_prior
    # loads --image-tokenizer through the same hook and checks the codes' identity against it.
    monkeypatch.setattr(extract_codes, "load_image_tokenizer", lambda path: adapter)
    codes_dir, run_dir = tmp_path / "codes", tmp_path / "prior"
    run_job(extract_codes, ["--tokenizer", "adapter", "--data", "shapes", "--out", str(codes_dir),
                            "--resolution", "16", "--num-samples", "6",
                            "--num-validation-samples", "2", "--batch-size", "6"])  # fmt: skip
    dataset = load_codes(codes_dir, "train", expected_identity=adapter.identity())
    codes = dataset.with_format("torch")[:]["codes"].long()  # (N, h, w)
    assert codes.shape == (6, 8, 8)
    index = int(dataset[0]["source_index"])
    assert torch.equal(codes[:1], adapter.encode(shapes_image(index)))

    final = run_job(train_prior, [
        "--codes", str(codes_dir), "--image-tokenizer", "adapter", "--output-dir", str(run_dir),
        "--max-steps", "2", "--batch-size", "2", "--num-val-samples", "1", "--d-model", "32",
        "--num-layers", "1", "--num-heads", "2", "--text-vocab-size", "300", "--text-length", "8",
        "--warmup-steps", "1", "--log-every", "1", "--report-to", "none", "--no-progress", "--cpu",
    ])  # fmt: skip
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in losses if "loss" in row]
    assert len(steps) == 2 and all(0 < row["loss"] < 100 for row in steps)
    prior_config = json.loads((final / "prior" / "config.json").read_text())
    assert prior_config["codebook_size"] == adapter.codebook_size
    assert list(prior_config["image_grid"]) == [8, 8]


def shapes_image(index: int) -> torch.Tensor:
    """Shapes training image `index` at 16 px, as extract_codes reads it: (1, 3, 16, 16)."""
    from pipelines.data.images import load_image_caption_dataset

    dataset = load_image_caption_dataset("shapes", split="train", resolution=16, num_samples=6)
    return dataset[index]["image"][None]
