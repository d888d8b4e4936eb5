"""The bad-data corpus through the data layer: exact counts, warnings, captions and pixels."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from bad_data_corpus import CORPUS_RESOLUTION, build_bad_data_corpus, build_bad_data_tar

from pipelines.data.decode import ImageDecodeError, decode_image
from pipelines.data.images import load_image_caption_dataset

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_bad_data_corpus(tmp_path_factory.mktemp("bad-data") / "corpus")


@pytest.fixture(scope="module", params=["folder", "tar"])
def loaded(request, corpus, tmp_path_factory):
    """(expected corpus, dataset, warning messages) for the folder and the tar shard."""
    if request.param == "tar":
        corpus = build_bad_data_tar(tmp_path_factory.mktemp("bad-tar") / "corpus.tar", corpus)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_image_caption_dataset(corpus.root, resolution=CORPUS_RESOLUTION)
    return corpus, dataset, [str(warning.message) for warning in caught]


def test_exact_counts_and_one_warning(loaded):
    corpus, dataset, messages = loaded
    assert dict(dataset.report.counts) == dict(corpus.expected_counts)
    assert len(dataset) == dataset.report.num_valid == corpus.num_valid
    skipped = [case for case in corpus.cases if case.outcome != "used"]
    assert dataset.report.num_skipped == len(skipped) + sum(corpus.metadata_problems.values())
    summary = [message for message in messages if message.startswith("data source")]
    assert len(summary) == 1
    for reason in corpus.expected_counts:  # each reason is named, with its first examples
        assert f"{reason}={corpus.expected_counts[reason]} (e.g. " in summary[0]


def test_every_valid_image_used_with_its_caption(loaded):
    corpus, dataset, _ = loaded
    by_name = {name.split(":", 1)[-1]: index for index, name in enumerate(dataset.names)}
    assert sorted(by_name) == sorted(case.name for case in corpus.used)
    for case in corpus.used:
        assert dataset.captions[by_name[case.name]] == case.caption, case.name
    index = by_name["gray16.png"]  # the 10,000-character caption is kept whole
    assert len(dataset.captions[index]) == 10_000


def test_pixels_and_sizes(corpus):
    """Decoded values per case: 16-bit scaled, alpha composited on white, EXIF applied."""
    for case in corpus.used:
        image = decode_image(corpus.root / case.name)
        assert image.mode == "RGB"
        assert image.size == case.size, case.name
        pixels = np.asarray(image).astype(int)  # (H, W, 3)
        for (x, y), expected, tolerance in case.pixels:
            difference = np.abs(pixels[y, x] - np.asarray(expected)).max()
            assert difference <= tolerance, (case.name, (x, y), pixels[y, x].tolist(), expected)


def test_skipped_cases_raise_their_reason(corpus):
    for case in corpus.cases:
        if case.outcome == "used":
            continue
        with pytest.raises(ImageDecodeError) as error:
            decode_image(corpus.root / case.name)
        assert error.value.reason == case.outcome, case.name


def test_items_are_tensors_in_range(loaded):
    corpus, dataset, _ = loaded
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset))
    batch = next(iter(loader))
    assert batch["image"].shape == (corpus.num_valid, 3, CORPUS_RESOLUTION, CORPUS_RESOLUTION)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    small = dataset.names.index(next(n for n in dataset.names if n.endswith("small.png")))
    green = batch["image"][small]  # 12x10 resized up: still pure green
    assert torch.allclose(green[1], torch.ones(16, 16)) and torch.all(green[0] == -1)


def test_file_changed_after_validation_is_replaced_not_fatal(tmp_path):
    corpus = build_bad_data_corpus(tmp_path / "corpus")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = load_image_caption_dataset(corpus.root, resolution=CORPUS_RESOLUTION)
    (corpus.root / dataset.names[0]).write_bytes(b"")
    with pytest.warns(UserWarning, match="is now unreadable"):
        item = dataset[0]
    assert item["caption"] == dataset.captions[1]
