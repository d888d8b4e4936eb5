"""scripts/train_scorer.py: a 2-step smoke run then --resume, that it learns to match Shapes
images with their captions, argument validation, and a 2-process run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import train_scorer
from image_files import image_size
from training_helpers import (
    SCORER_ARGS,
    assert_same_weights,
    cli,
    make_text_tokenizer,
    run_two_ranks,
    weights,
)

from pipelines import ImageTextScorer
from pipelines.data.shapes import make_shapes_dataset
from prior import TextTokenizer

pytestmark = pytest.mark.usefixtures("fresh_process_state")


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    return make_text_tokenizer(tmp_path_factory.mktemp("text"))


def train(text_tokenizer, out, *extra):
    argv = cli(SCORER_ARGS, "--text-tokenizer", text_tokenizer, "--output-dir", out, *extra)
    return train_scorer.train(train_scorer.parse_args(argv))


def test_two_steps_then_resume(text_tokenizer, tmp_path):
    out = tmp_path / "run"
    train(text_tokenizer, out, "--max-steps 2 --checkpoint-every 2")
    job = train(text_tokenizer, out, "--max-steps 4 --checkpoint-every 2 --resume")
    assert job.ctx.state.step == 4 and "resumed from" in (out / "train.log").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
    (last,) = [row for row in rows if "val_loss" in row and row["step"] == 4]
    assert 0 <= last["val_accuracy"] <= 1 and last["val_loss"] > 0
    assert image_size(out / "curves.png") == (4 * 420, 320)  # four panels in a row
    scorer = ImageTextScorer.from_pretrained(out / "final")
    tokenizer = TextTokenizer.from_pretrained(text_tokenizer)
    assert scorer.config.text_vocab_size == tokenizer.vocab_size
    assert scorer.config.text_pad_id == tokenizer.pad_id and scorer.config.channels == (4, 8)
    assert (out / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_scorer_learns_to_match_images_and_captions(text_tokenizer, tmp_path):
    """After 150 steps the scorer ranks each validation image's own caption above the others
    of its chunk of 16 far more often than chance (1 in 16)."""
    out = tmp_path / "run"
    flags = "--max-steps 150 --batch-size 16 --num-train-samples 400 --learning-rate 3e-3"
    job = train(text_tokenizer, out, flags, "--channels 8,16,16 --embed-dim 32 --pooled-grid 4")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = [row["val_accuracy"] for row in rows if "val_accuracy" in row][-1]
    assert accuracy > 0.3, accuracy
    dataset = make_shapes_dataset("validation", 8, resolution=16, seed=0)
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in dataset["image"]]))
    images = pixels.float().permute(0, 3, 1, 2) / 127.5 - 1  # (8, 3, H, W) in [-1, 1]
    text = job.text_tokenizer(list(dataset["caption"]))
    with torch.no_grad():
        matched = job.scorer.similarity(images, text)  # (8,)
        mismatched = job.scorer.similarity(images, text.roll(1, dims=0))  # (8,)
    assert float(matched.mean()) > float(mismatched.mean())


@pytest.mark.parametrize(
    "flags, match",
    [
        ("--batch-size 1", "--batch-size"),
        ("--channels 0,8", "--channels"),
        ("--embed-dim 0", "embed-dim"),
        ("--weight-decay -1", "weight-decay"),
    ],
)
def test_bad_flags_raise(text_tokenizer, tmp_path, flags, match):
    argv = cli(SCORER_ARGS, "--text-tokenizer", text_tokenizer, "--output-dir", tmp_path, flags)
    with pytest.raises(ValueError, match=match):
        train_scorer.parse_args([*argv, "--max-steps", "2"])


def test_missing_text_tokenizer_is_a_clear_error(tmp_path):
    argv = cli(SCORER_ARGS, "--text-tokenizer", tmp_path / "none", "--output-dir", tmp_path)
    with pytest.raises(FileNotFoundError, match="--text-tokenizer"):
        train_scorer.parse_args([*argv, "--max-steps", "2"])


@pytest.mark.slow
def test_two_processes_stay_in_step_and_export(text_tokenizer, tmp_path):
    """Each rank contrasts its own batch; DDP's averaged gradients keep the weights equal."""
    out = tmp_path / "two"
    argv = cli(SCORER_ARGS, "--text-tokenizer", text_tokenizer, "--output-dir", out)
    rank0, rank1 = run_two_ranks(train_scorer, [*argv, "--max-steps", "2"], tmp_path)
    assert_same_weights(rank0, rank1, exact=True)
    initial = ImageTextScorer(ImageTextScorer.from_pretrained(out / "final").config).state_dict()
    assert not torch.equal(initial["logit_scale"], rank0["logit_scale"])  # it trained
    assert_same_weights(weights(out / "final" / "model.safetensors"), rank0, exact=True)
