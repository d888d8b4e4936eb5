"""TextToImagePipeline: end to end on tiny components, serialisation, determinism, validation,
thread safety. Every component is built directly (no training) so the file runs in seconds."""

from __future__ import annotations

import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from image_files import image_size
from PIL import Image

from pipelines import ImagePipelineOutput, PipelineConfig, TextToImagePipeline
from pipelines.serialization import update_pipeline_config
from prior import Prior, PriorConfig, TextTokenizer
from tokenizer import VQGAN, VQGANConfig

CAPTIONS = [
    "a large red circle in the center on a black background",
    "a small blue square in the top left on a gray background",
    "a big green ring at the bottom right on a white background",
    "there is a tiny yellow cross in the middle on a black background",
]
PROMPTS = CAPTIONS[:2]


def tiny_vqgan(codebook_size: int = 32, resolution: int = 16) -> VQGAN:
    """f4 VQGAN: 16 px images <-> 4x4 codes."""
    config = VQGANConfig(
        resolution=resolution,
        ch=8,
        ch_mult=(1, 2, 2),
        z_channels=8,
        codebook_size=codebook_size,
        codebook_dim=4,
    )
    return VQGAN(config)


def tiny_prior(text_tokenizer: TextTokenizer, **overrides) -> Prior:
    values = dict(
        text_vocab_size=text_tokenizer.vocab_size,
        text_length=text_tokenizer.text_length,
        codebook_size=32,
        image_grid=(4, 4),
        d_model=32,
        num_layers=1,
        num_heads=2,
        mlp_multiple_of=8,
        text_pad_id=text_tokenizer.pad_id,
    )
    return Prior(PriorConfig(**{**values, **overrides}))


@pytest.fixture(scope="module")
def text_tokenizer() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=48, text_length=16, byte_fallback=False)


@pytest.fixture(scope="module")
def components(text_tokenizer):
    torch.manual_seed(0)
    return tiny_vqgan(), tiny_prior(text_tokenizer), text_tokenizer


@pytest.fixture
def pipeline(components) -> TextToImagePipeline:
    return TextToImagePipeline(*components)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_end_to_end_shapes_and_ranges(pipeline):
    output = pipeline(PROMPTS, num_images_per_prompt=3, generator=seeded(0), show_progress=False)
    assert isinstance(output, ImagePipelineOutput)
    assert output.codes.shape == (6, 4, 4) and output.codes.dtype == torch.long
    assert int(output.codes.min()) >= 0 and int(output.codes.max()) < 32
    assert len(output.images) == 6
    assert all(isinstance(image, Image.Image) and image.size == (16, 16) for image in output.images)


def test_images_are_the_decoded_codes(pipeline, components):
    vqgan = components[0]
    output = pipeline(PROMPTS, generator=seeded(1), output_type="pt", show_progress=False)
    with torch.no_grad():
        expected = (vqgan.decode(output.codes) + 1) / 2  # (B, 3, H, W) in [0, 1]
    torch.testing.assert_close(output.images, expected.clamp(0, 1))


def test_output_types_agree(pipeline):
    outputs = {
        kind: pipeline(PROMPTS, generator=seeded(2), output_type=kind, show_progress=False)
        for kind in ("pil", "np", "pt")
    }
    pt, np_images = outputs["pt"].images, outputs["np"].images
    assert pt.shape == (2, 3, 16, 16) and pt.dtype == torch.float32
    assert np_images.shape == (2, 16, 16, 3) and np_images.dtype == np.float32
    assert pt.min() >= 0.0 and pt.max() <= 1.0
    np.testing.assert_array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())
    pil_pixels = np.stack([np.asarray(image) for image in outputs["pil"].images])
    np.testing.assert_array_equal(pil_pixels, np.round(np_images * 255).astype(np.uint8))


def test_same_seed_same_images_different_seed_different(pipeline):
    first = pipeline(PROMPTS, num_images_per_prompt=2, generator=seeded(3), output_type="np")
    again = pipeline(PROMPTS, num_images_per_prompt=2, generator=seeded(3), output_type="np")
    other = pipeline(PROMPTS, num_images_per_prompt=2, generator=seeded(4), output_type="np")
    assert torch.equal(first.codes, again.codes)
    np.testing.assert_array_equal(first.images, again.images)
    assert not torch.equal(first.codes, other.codes)


@pytest.mark.parametrize("max_batch_size", [1, 2, 5])
@pytest.mark.parametrize("count", [2, 6], ids=["per-prompt", "per-image"])
def test_generator_list_does_not_depend_on_chunking(pipeline, max_batch_size, count):
    def generators() -> list[torch.Generator]:
        return [seeded(10 + index) for index in range(count)]

    reference = pipeline(PROMPTS, num_images_per_prompt=3, generator=generators())
    chunked = pipeline(
        PROMPTS, num_images_per_prompt=3, generator=generators(), max_batch_size=max_batch_size
    )
    assert torch.equal(reference.codes, chunked.codes)


def test_per_prompt_generator_fixes_that_prompts_images(pipeline):
    """Prompt 1's images depend on its own generator only, not on the other prompts'."""
    one = pipeline(PROMPTS, num_images_per_prompt=2, generator=[seeded(5), seeded(6)])
    two = pipeline(PROMPTS, num_images_per_prompt=2, generator=[seeded(7), seeded(6)])
    assert torch.equal(one.codes[2:], two.codes[2:])
    alone = pipeline(PROMPTS[1], num_images_per_prompt=2, generator=[seeded(6)])
    assert torch.equal(one.codes[2:], alone.codes)


def test_defaults_come_from_the_config(components):
    pipeline = TextToImagePipeline(*components, config={"resolution": 16, "guidance_scale": 3.0})
    implicit = pipeline(PROMPTS, generator=seeded(8))
    explicit = pipeline(PROMPTS, generator=seeded(8), guidance_scale=3.0)
    assert torch.equal(implicit.codes, explicit.codes)


def test_save_then_load_gives_identical_images(pipeline, tmp_path):
    pipeline.config = dataclasses.replace(pipeline.config, guidance_scale=2.0, top_k=20)
    folder = pipeline.save_pretrained(tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["image_tokenizer"] == ["tokenizer", "VQGAN"]
    assert index["prior"] == ["prior", "Prior"]
    assert index["text_tokenizer"] == ["prior", "TextTokenizer"]
    loaded = TextToImagePipeline.from_pretrained(folder)
    assert loaded.config == pipeline.config
    before = pipeline(PROMPTS, num_images_per_prompt=2, generator=seeded(9), output_type="np")
    after = loaded(PROMPTS, num_images_per_prompt=2, generator=seeded(9), output_type="np")
    assert torch.equal(before.codes, after.codes)
    np.testing.assert_array_equal(before.images, after.images)


def test_readme_example(pipeline, tmp_path, monkeypatch):
    pipeline.save_pretrained(tmp_path / "outputs/demo/pipeline")
    monkeypatch.chdir(tmp_path)
    # --- README, "Python example" section (five lines; ruff wraps the long one) ---
    import torch

    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained("outputs/demo/pipeline")
    images = pipe(
        "a large red circle in the center on a black background",
        generator=torch.Generator().manual_seed(0),
    ).images
    images[0].save("red_circle.png")
    # ---
    assert len(images) == 1
    assert image_size(tmp_path / "red_circle.png") == (16, 16)


def test_update_pipeline_config_is_read_back(pipeline, tmp_path):
    folder = pipeline.save_pretrained(tmp_path / "pipe")
    update_pipeline_config(folder, guidance_scale=2.5)
    assert TextToImagePipeline.from_pretrained(folder).config.guidance_scale == 2.5
    with pytest.raises(ValueError, match="guidance_scale"):
        update_pipeline_config(folder, guidance_scale=-1.0)
    assert TextToImagePipeline.from_pretrained(folder).config.guidance_scale == 2.5


def test_from_pretrained_override_component(pipeline, components, tmp_path):
    folder = pipeline.save_pretrained(tmp_path / "pipe")
    other_vqgan = tiny_vqgan()
    loaded = TextToImagePipeline.from_pretrained(folder, image_tokenizer=other_vqgan)
    assert loaded.image_tokenizer is other_vqgan


def test_to_moves_and_casts(components):
    pipeline = TextToImagePipeline(tiny_vqgan(), tiny_prior(components[2]), components[2])
    assert pipeline.to("cpu", torch.float64) is pipeline
    assert pipeline.device == torch.device("cpu")
    assert next(pipeline.prior.parameters()).dtype == torch.float64
    output = pipeline(PROMPTS, generator=seeded(0), output_type="pt")
    assert output.images.dtype == torch.float32 and output.codes.shape == (2, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"prompt": []}, "empty list"),
        ({"prompt": ["ok", 3]}, "only str"),
        ({"prompt": None}, "prompt must be"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"num_images_per_prompt": -2}, "num_images_per_prompt"),
        ({"num_images_per_prompt": 1.5}, "num_images_per_prompt"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"guidance_scale": -0.5}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 33}, "top_k"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"output_type": "latent"}, "output_type"),
        ({"generator": [torch.Generator()] * 3}, "generators"),
        ({"generator": "seed"}, "generator"),
    ],
)
def test_bad_arguments_raise_value_error(pipeline, kwargs, name):
    arguments = {"prompt": PROMPTS, "show_progress": False, **kwargs}
    with pytest.raises(ValueError, match=name):
        pipeline(**arguments)


@pytest.mark.parametrize(
    ("prior_overrides", "vqgan_kwargs", "message"),
    [
        ({"codebook_size": 64}, {}, "codebook mismatch"),
        ({"image_grid": (8, 8)}, {}, "grid mismatch"),
        ({}, {"resolution": 32}, "grid mismatch"),
        ({"text_length": 12}, {}, "text length mismatch"),
        ({"text_vocab_size": 20}, {}, "text vocabulary mismatch"),
        (
            {"text_pad_id": 1, "text_loss_weight": 0.125},
            {},
            "text pad id mismatch: text_tokenizer.pad_id=0",
        ),
    ],
)
def test_component_mismatch_fails_at_construction(
    text_tokenizer, prior_overrides, vqgan_kwargs, message
):
    prior = tiny_prior(text_tokenizer, **prior_overrides)
    with pytest.raises(ValueError, match=message):
        TextToImagePipeline(tiny_vqgan(**vqgan_kwargs), prior, text_tokenizer)


def test_pad_id_is_only_checked_for_a_prior_with_a_text_loss(text_tokenizer):
    """text_pad_id marks only the text loss's ignored targets: a prior without a text loss
    samples the same whatever it says, so another pad id is accepted."""
    prior = tiny_prior(text_tokenizer, text_pad_id=1)
    TextToImagePipeline(tiny_vqgan(), prior, text_tokenizer)


@pytest.mark.parametrize(
    ("field", "value"), [("guidance_scale", -1.0), ("max_batch_size", 0), ("top_p", 2.0)]
)
def test_bad_config_raises(components, field, value):
    with pytest.raises(ValueError, match=field):
        TextToImagePipeline(*components, config=PipelineConfig(resolution=16, **{field: value}))


class WrappedTokenizer:
    """An adapter: satisfies the ImageTokenizer protocol but has no save_pretrained."""

    can_decode = True

    def __init__(self, vqgan: VQGAN) -> None:
        self.vqgan = vqgan
        self.codebook_size = vqgan.codebook_size
        self.downsample_factor = vqgan.downsample_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        return self.vqgan.latent_shape(height, width)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vqgan.encode(images)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode(codes)

    def identity(self) -> dict:
        return {"class": "WrappedTokenizer"}


def test_adapter_tokenizer_samples_but_is_not_serialisable(components, tmp_path):
    vqgan, prior, text_tokenizer = components
    pipeline = TextToImagePipeline(WrappedTokenizer(vqgan), prior, text_tokenizer)
    direct = TextToImagePipeline(vqgan, prior, text_tokenizer)
    assert pipeline.config.resolution == 16  # from the grid and the downsample factor
    adapted = pipeline(PROMPTS, generator=seeded(0), output_type="np")
    expected = direct(PROMPTS, generator=seeded(0), output_type="np")
    np.testing.assert_array_equal(adapted.images, expected.images)
    with pytest.raises(ValueError, match="not serialisable"):
        pipeline.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    folder = direct.save_pretrained(tmp_path / "pipe")
    loaded = TextToImagePipeline.from_pretrained(folder, image_tokenizer=WrappedTokenizer(vqgan))
    assert isinstance(loaded.image_tokenizer, WrappedTokenizer)


@pytest.mark.reliability
def test_failed_save_keeps_the_previous_folder(pipeline, tmp_path, monkeypatch):
    folder = pipeline.save_pretrained(tmp_path / "pipe")
    reference = pipeline(PROMPTS, generator=seeded(0)).codes

    def broken(directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.prior, "save_pretrained", broken)
    with pytest.raises(OSError, match="No space"):
        pipeline.save_pretrained(folder)
    with pytest.raises(OSError, match="No space"):
        pipeline.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pipe"]  # no temporary leftovers
    loaded = TextToImagePipeline.from_pretrained(folder)
    assert torch.equal(loaded(PROMPTS, generator=seeded(0)).codes, reference)


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        ("delete_index", FileNotFoundError, "model_index.json"),
        ("import_string", ValueError, "allowed entries"),
        ("bad_config", ValueError, "top_p"),
    ],
)
def test_from_pretrained_rejects_bad_folders(pipeline, tmp_path, edit, error, match):
    folder = pipeline.save_pretrained(tmp_path / "pipe")
    if edit == "delete_index":
        (folder / "model_index.json").unlink()
    elif edit == "import_string":
        index = json.loads((folder / "model_index.json").read_text())
        index["prior"] = ["os", "system"]
        (folder / "model_index.json").write_text(json.dumps(index))
    else:
        config = json.loads((folder / "pipeline_config.json").read_text())
        (folder / "pipeline_config.json").write_text(json.dumps({**config, "top_p": 7}))
    with pytest.raises(error, match=match):
        TextToImagePipeline.from_pretrained(folder)


@pytest.mark.reliability
def test_four_threads_match_single_calls(pipeline):
    """The same pipeline object, called from 4 threads at once, gives every call's lone result."""
    calls = [
        {"prompt": PROMPTS, "num_images_per_prompt": 4, "generator": 100},
        {"prompt": CAPTIONS[2], "num_images_per_prompt": 6, "generator": 101, "top_k": 8},
        {"prompt": CAPTIONS, "guidance_scale": 1.0, "generator": 102, "max_batch_size": 3},
        {"prompt": CAPTIONS[::-1], "guidance_scale": 3.0, "temperature": 0.7, "generator": 103},
    ]

    def run(call: dict) -> torch.Tensor:
        arguments = {**call, "generator": seeded(call["generator"]), "show_progress": False}
        return pipeline(**arguments, output_type="pt")

    alone = [run(call) for call in calls]
    barrier = threading.Barrier(len(calls))

    def run_together(call: dict):
        barrier.wait()  # start all four calls at the same moment
        return run(call)

    for _ in range(2):
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            together = list(pool.map(run_together, calls))
        for lone, concurrent in zip(alone, together):
            assert torch.equal(lone.codes, concurrent.codes)
            assert torch.equal(lone.images, concurrent.images)
