"""Regression tests for reviewed defects of the prior, the pipeline and the data layer: clear
ValueErrors for bad input, pure sampling, devices, and data options that were ignored."""

from __future__ import annotations

import json
import re

import datasets
import pytest
import torch
from PIL import Image
from prior_helpers import make_prior, random_batch
from test_images import png, write_shard
from test_pipeline import PROMPTS, seeded, tiny_prior, tiny_vqgan
from test_rerank import tiny_scorer

import pipelines.text_to_image as text_to_image
from pipelines import PipelineConfig, TextToImagePipeline
from pipelines.data import sources
from pipelines.data.codes import CODES_FORMAT, CODES_META, CODES_VERSION, read_codes_meta
from pipelines.data.decode import ImageDecodeError, decode_image
from pipelines.data.images import load_image_caption_dataset
from pipelines.data.judge import at_judge_resolution
from pipelines.serialization import PIPELINE_CONFIG_NAME, update_pipeline_config
from prior import KVCache, Prior, TextTokenizer, code_log_likelihood, drop_captions, generate
from prior.sampling import prefill, same_device
from prior.text_tokenizer import CONFIG_NAME


@pytest.fixture(scope="module")
def text_tokenizer() -> TextTokenizer:
    captions = [*PROMPTS, "a big green ring", "a tiny yellow cross"]
    return TextTokenizer.train(captions, vocab_size=48, text_length=16, byte_fallback=False)


@pytest.fixture(scope="module")
def components(text_tokenizer):
    torch.manual_seed(0)
    return tiny_vqgan(), tiny_prior(text_tokenizer), text_tokenizer


# ------------------------------------------------------------------ splits of split-less sources
def _bare(tmp_path):
    return datasets.Dataset.from_dict({"image": [png()], "text": ["red"]})


def _saved(tmp_path):
    _bare(tmp_path).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def _tar(tmp_path):
    write_shard(tmp_path / "part-0.tar", [("a.png", png()), ("a.txt", b"red")])
    return tmp_path / "part-0.tar"


@pytest.mark.parametrize("make", [_bare, _saved, _tar], ids=["dataset", "save_to_disk", "tar"])
def test_a_source_without_splits_refuses_other_splits(tmp_path, make):
    source = make(tmp_path)
    assert sources.available_splits(source) == ["train"]
    with pytest.raises(ValueError, match=r"split='validation'.*only has split='train'"):
        load_image_caption_dataset(source, split="validation", resolution=16)
    assert len(load_image_caption_dataset(source, split="train", resolution=16)) == 1


def test_a_dataset_dict_still_gives_its_validation_split():
    table = datasets.Dataset.from_dict({"image": [png(), png()], "text": ["red", "blue"]})
    both = datasets.DatasetDict({"train": table, "validation": table.select([1])})
    validation = load_image_caption_dataset(both, split="validation", resolution=16)
    assert validation.captions == ["blue"]


# ------------------------------------------------------------------ prior: modes and caches
@pytest.mark.parametrize("text_attention", ["causal", "self"])
def test_from_pretrained_is_eval_and_likelihood_never_drops_out(tmp_path, text_attention):
    make_prior(dropout=0.5, text_attention=text_attention).save_pretrained(tmp_path / "p")
    prior = Prior.from_pretrained(tmp_path / "p")
    assert not prior.training
    text, codes = random_batch(prior.config)
    in_eval = code_log_likelihood(prior, text, codes)
    prior.train()
    first, second = code_log_likelihood(prior, text, codes), code_log_likelihood(prior, text, codes)
    assert torch.equal(first, second) and torch.equal(first, in_eval)
    assert not first.requires_grad and prior.training  # no graph, and the mode is not changed


def _cache(prior: Prior, rows: int) -> KVCache:
    cfg = prior.config
    return KVCache.allocate(num_layers=cfg.num_layers, batch_size=rows, num_heads=cfg.num_heads,
                            max_length=cfg.sequence_length + 1, head_dim=cfg.head_dim,
                            device=torch.device("cpu"), dtype=torch.float32)  # fmt: skip


def test_a_cache_under_gradient_checkpointing_with_grad_is_refused():
    prior = make_prior()
    prior.gradient_checkpointing = True
    text, codes = random_batch(prior.config)
    cache = _cache(prior, rows=3)
    cache.keys.fill_(7.0)
    with torch.enable_grad(), pytest.raises(ValueError, match="gradient_checkpointing"):
        prefill(prior, text, codes.flatten(1)[:, :2], cache)
    with torch.no_grad():
        prefill(prior, text, codes.flatten(1)[:, :2], cache)
    written = text.shape[1] + 3  # text, BOI and two codes
    assert not (cache.keys[:, :, :, :written] == 7.0).any()


# ------------------------------------------------------------------ sampling arguments
@pytest.mark.parametrize("shape", [(5,), (2, 6), (3, 5), (1, 1, 6)])
def test_a_null_caption_of_the_wrong_shape_is_named(shape):
    prior = make_prior()
    text, _ = random_batch(prior.config, batch=3)
    null = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape(f"null_ids has shape {tuple(shape)}")):
        drop_captions(text, null, p=0.5)
    with pytest.raises(ValueError, match=r"null_text_ids has shape"):
        generate(prior, text, null_text_ids=null, guidance_scale=2.0, generator=seeded(0))


@pytest.mark.parametrize("shape", [(6,), (1, 6), (3, 6)])
def test_allowed_null_caption_shapes_still_work(shape):
    prior = make_prior()
    text, _ = random_batch(prior.config, batch=3)
    null = torch.zeros(shape, dtype=torch.long)
    assert drop_captions(text, null, p=1.0).eq(0).all()
    codes = generate(prior, text, null_text_ids=null, guidance_scale=2.0, generator=seeded(0))
    assert codes.shape == (3, *prior.config.image_grid)


def test_a_generator_list_with_none_is_refused():
    prior = make_prior()
    text, _ = random_batch(prior.config, batch=3)
    with pytest.raises(ValueError, match=r"None at rows \[1\]"):
        generate(prior, text, generator=[seeded(0), None, seeded(2)])


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("cpu", "cpu", True),
        ("cuda:0", "cuda:1", False),
        ("cuda:1", "cuda:1", True),
        ("cuda", "cuda:0", True),  # no index: the current device (cuda:0 without GPUs too)
        ("cuda", "cuda:1", torch.cuda.is_available() and torch.cuda.current_device() == 1),
        ("cpu", "cuda:0", False),
        ("meta", "cpu", False),
    ],
)
def test_same_device_compares_the_index_too(first, second, same):
    assert same_device(first, second) is same


# ------------------------------------------------------------------ pipeline
class MetaTokenizer(torch.nn.Module):
    """An image tokenizer whose weights live on the meta device; it records where its codes
    arrive and returns black images on the CPU."""

    can_decode, codebook_size, downsample_factor = True, 32, 4

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.seen: list[torch.device] = []

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        return height // 4, width // 4

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.seen.append(codes.device)
        return torch.zeros(codes.shape[0], 3, 16, 16)  # (B, 3, H, W)

    def identity(self) -> dict:
        return {"class": "MetaTokenizer"}


def test_codes_are_decoded_on_the_image_tokenizers_device(components):
    _, prior, text_tokenizer = components
    tokenizer = MetaTokenizer()
    scorer = tiny_scorer(text_tokenizer)
    pipeline = TextToImagePipeline(tokenizer, prior, text_tokenizer, scorer=scorer)
    pipeline.decode(torch.zeros(2, 4, 4, dtype=torch.long))
    pipeline.sample_candidates(PROMPTS, 2, generator=seeded(0), show_progress=False)
    assert tokenizer.seen and set(tokenizer.seen) == {torch.device("meta")}


def test_per_image_generators_sample_in_batches_and_rows_stay_independent(components, monkeypatch):
    pipeline = TextToImagePipeline(*components)
    calls = []

    def counting_generate(*args, **kwargs):
        calls.append(len(kwargs["generator"]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(text_to_image, "generate", counting_generate)
    seeds = range(20, 26)
    whole = pipeline(PROMPTS, num_images_per_prompt=3, generator=[seeded(s) for s in seeds])
    assert calls == [6]  # one batch of six rows, not six calls
    for index, seed in enumerate(seeds):
        alone = pipeline(PROMPTS[index // 3], generator=[seeded(seed)], show_progress=False)
        assert torch.equal(alone.codes[0], whole.codes[index])


def test_a_config_dict_with_unknown_keys_is_a_value_error(components):
    with pytest.raises(ValueError, match=r"unknown PipelineConfig field\(s\) \['guidance'\]"):
        TextToImagePipeline(*components, config={"guidance": 2.0})
    pipeline = TextToImagePipeline(*components, config={"guidance_scale": 2.0})
    assert pipeline.config == PipelineConfig(resolution=16, guidance_scale=2.0)


def test_update_pipeline_config_names_unknown_fields(components, tmp_path):
    folder = TextToImagePipeline(*components).save_pretrained(tmp_path / "pipe")
    before = (folder / PIPELINE_CONFIG_NAME).read_text()
    with pytest.raises(ValueError, match=r"unknown PipelineConfig field\(s\) \['topk'\]"):
        update_pipeline_config(folder, topk=4)
    assert (folder / PIPELINE_CONFIG_NAME).read_text() == before


# ------------------------------------------------------------------ text tokenizer files
def test_a_malformed_text_tokenizer_config_names_the_file_and_field(text_tokenizer, tmp_path):
    folder = text_tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads((folder / CONFIG_NAME).read_text())
    with pytest.raises(ValueError, match="text_length=0"):
        TextTokenizer.from_pretrained(folder, text_length=0)  # 0 is a value, not "not given"
    del config["pad_id"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME} has no field 'pad_id'"):
        TextTokenizer.from_pretrained(folder)


# ------------------------------------------------------------------ extracted codes metadata
META = {"format": CODES_FORMAT, "version": CODES_VERSION, "tokenizer": {"class": "VQGAN"},
        "latent_shape": [4, 4], "resolution": 16, "codebook_size": 32, "splits": {}}  # fmt: skip


def test_missing_codes_meta_message_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        read_codes_meta(tmp_path)
    assert f"--out {tmp_path} " in str(error.value) and "{path}" not in str(error.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"version": 0}, f"version=0 but this code reads version {CODES_VERSION}; re-extract"),
        ({"version": None}, "version=None"),
        ({"tokenizer": None}, "field 'tokenizer' is None"),
        ({"latent_shape": None}, "field 'latent_shape'"),
        ({"resolution": None}, "field 'resolution'"),
        ({"codebook_size": None}, "field 'codebook_size'"),
        ({"splits": None}, "field 'splits'"),
    ],
)
def test_codes_meta_version_and_fields_are_checked(tmp_path, change, match):
    meta = {key: value for key, value in {**META, **change}.items() if value is not None}
    (tmp_path / CODES_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match) as error:
        read_codes_meta(tmp_path)
    assert CODES_META in str(error.value)
    (tmp_path / CODES_META).write_text(json.dumps(META))
    assert read_codes_meta(tmp_path) == META


# ------------------------------------------------------------------ image data
def _shards(tmp_path) -> None:
    for shard in range(2):
        samples = []
        for index in range(5):
            samples.append((f"d/s{shard}_{index}.png", png((40 * index, 0, 0))))
            samples.append((f"d/s{shard}_{index}.txt", f"shard {shard} item {index}".encode()))
        write_shard(tmp_path / f"part-{shard}.tar", samples)


def _stream_captions(source, num_samples) -> list[str]:
    stream = load_image_caption_dataset(source, streaming=True, num_samples=num_samples)
    return [item["caption"] for item in stream]


@pytest.mark.parametrize("num_samples", [3, 7, 100])
def test_streaming_tar_reads_only_the_first_num_samples(tmp_path, num_samples):
    _shards(tmp_path)
    indexed = load_image_caption_dataset(tmp_path, num_samples=num_samples)
    assert _stream_captions(tmp_path, num_samples) == indexed.captions
    assert len(indexed) == min(num_samples, 10)


@pytest.mark.parametrize("iterable", [True, False], ids=["IterableDataset", "Dataset"])
@pytest.mark.parametrize("num_samples", [2, 9])
def test_streaming_datasets_read_only_the_first_num_samples(iterable, num_samples):
    table = datasets.Dataset.from_dict({"image": [png()] * 4, "text": list("abcd")})
    source = table.to_iterable_dataset() if iterable else table
    assert _stream_captions(source, num_samples) == list("abcd")[:num_samples]


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(sources.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sources.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(sources.dist, "get_world_size", lambda: world)


def test_streaming_num_samples_refuses_a_shared_multi_shard_stream(monkeypatch):
    """take() splits per shard when ranks share a stream: refused, not read wrongly."""
    table = datasets.Dataset.from_dict({"image": [png()] * 8, "text": list("abcdefgh")})
    _as_rank(monkeypatch, 0, 2)
    with pytest.raises(ValueError, match="2-shard streaming dataset read by 2 ranks"):
        _stream_captions(table.to_iterable_dataset(num_shards=2), 2)


def test_streaming_num_samples_shares_the_first_rows_of_one_shard(monkeypatch):
    table = datasets.Dataset.from_dict({"image": [png()] * 8, "text": list("abcdefgh")})
    read = []
    for rank in (0, 1):
        _as_rank(monkeypatch, rank, 2)
        read += _stream_captions(table.to_iterable_dataset(num_shards=1), 3)
    assert sorted(read) == list("abc")


def test_a_dataset_whose_files_all_vanished_raises_value_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(png())
    with pytest.warns(UserWarning, match="missing_caption=2"):  # the load's data report
        dataset = load_image_caption_dataset(tmp_path, resolution=16)
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").unlink()
    with (
        pytest.warns(UserWarning, match="now unreadable"),
        pytest.raises(ValueError, match=r"none of the 2 validated items .* a\.png"),
    ):
        dataset[0]


@pytest.mark.parametrize("error", [IsADirectoryError, PermissionError])
def test_an_unreadable_path_is_a_counted_missing_file(tmp_path, monkeypatch, error):
    path = tmp_path / "x.png"
    if error is IsADirectoryError:
        path.mkdir()
    else:
        path.write_bytes(png())
        monkeypatch.setattr(type(path), "read_bytes", lambda self: (_ for _ in ()).throw(error()))
    with pytest.raises(ImageDecodeError, match="cannot be read") as caught:
        decode_image(path)
    assert caught.value.reason == "missing_file"


@pytest.mark.parametrize(("side", "judged"), [(16, 16), (24, 24), (32, 32), (64, 32)])
def test_judge_resolution_only_shrinks(side, judged):
    (image,) = at_judge_resolution([Image.new("RGB", (side, side))])
    assert image.size == (judged, judged)
