"""scripts/train_prior.py: a 2-step smoke run then --resume, refusal of another tokenizer's
codes, argument validation, --help, a time budget, and a 2-process run that must equal a
1-process run with the same global batch."""

from __future__ import annotations

import json
import math

import pytest
import torch
import train_prior
from common.code_features import matte_features, mean_decoded_patches
from image_files import image_size
from training_helpers import (
    PRIOR_ARGS,
    assert_same_weights,
    cli,
    make_codes,
    read_sample_log,
    run_two_ranks,
)

from pipelines.data.codes import load_codes
from prior import Prior, PriorConfig, TextTokenizer
from tokenizer import VQGAN, VQGANConfig

pytestmark = pytest.mark.usefixtures("fresh_process_state")


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    """(codes folder, the VQGAN folder that made them)."""
    return make_codes(tmp_path_factory.mktemp("codes"))


def train(codes_dir, out, *extra):
    argv = cli(PRIOR_ARGS, "--codes", codes_dir, "--output-dir", out, *extra)
    return train_prior.train(train_prior.parse_args(argv))


def test_two_steps_then_resume(codes, tmp_path):
    codes_dir, vqgan_dir = codes
    out = tmp_path / "run"
    flags = cli("--image-tokenizer", vqgan_dir, "--checkpoint-every 2 --ema-decay 0.9")
    train(codes_dir, out, "--max-steps 2 --report-to tensorboard", flags)
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    grid_size = image_size(out / "images" / "samples-00000002.png")
    assert grid_size == (2 * (16 + 2) + 2, 16 + 4)  # 2 decoded 16 px samples, 2 px padding

    job = train(codes_dir, out, "--max-steps 4 --resume", flags)
    assert job.ctx.state.step == 4 and "resumed from" in (out / "train.log").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
    val = [row["val_loss"] for row in rows if "val_loss" in row]
    assert len(val) == 2 and all(0 < loss < 2 * math.log(64) for loss in val)  # nats per token
    assert image_size(out / "curves.png") == (2 * 420, 320)  # loss and lr panels
    prior = Prior.from_pretrained(out / "final" / "prior")
    text = TextTokenizer.from_pretrained(out / "final" / "text_tokenizer")
    assert prior.config.codebook_size == 64 and tuple(prior.config.image_grid) == (4, 4)
    assert text.text_length == prior.config.text_length == 20
    assert prior(text(["a red circle"]), torch.zeros(1, 4, 4, dtype=torch.long)).image_loss > 0
    identity = json.loads((out / "final" / "image_tokenizer_identity.json").read_text())
    assert identity == VQGAN.from_pretrained(vqgan_dir).identity()


@pytest.mark.parametrize(
    "kind, compute, dim, groups",
    [
        ("patches", mean_decoded_patches, 3 * 4 * 4, ()),  # 16 px images, 4 x 4 codes: f = 4
        ("matte", matte_features, 4 * 4 + 6, (16, 6)),  # alpha per pixel, then two colours
    ],
)
def test_code_features_are_computed_from_the_tokenizers_decoded_codes(
    codes, tmp_path, kind, compute, dim, groups
):
    """--code-features: the prior's feature buffer holds each code's features over the training
    codes (computed once, saved with the weights and loaded back), in the kind's groups."""
    codes_dir, vqgan_dir = codes
    out = tmp_path / "run"
    flags = cli("--image-tokenizer", vqgan_dir, f"--code-features {kind}")
    job = train(codes_dir, out, "--max-steps 2", flags)
    assert f"code features: {kind} over" in (out / "train.log").read_text()
    prior = Prior.from_pretrained(out / "final" / "prior")
    assert prior.config.code_feature_dim == dim and prior.config.code_feature_groups == groups
    train_codes = load_codes(codes_dir, "train").with_format("torch", columns=["codes"])
    grids = train_codes[: len(job.train[1])]["codes"].long()
    expected = compute(VQGAN.from_pretrained(vqgan_dir), grids, 64)
    torch.testing.assert_close(prior.code_features.features, expected)
    assert expected.abs().sum() > 0


def test_text_attention_flag_reaches_the_saved_config(codes, tmp_path):
    codes_dir, _ = codes
    train(codes_dir, tmp_path / "run", "--max-steps 1 --text-attention self")
    prior = Prior.from_pretrained(tmp_path / "run" / "final" / "prior")
    assert prior.config.text_attention == "self"
    assert PriorConfig.from_preset("cpu-tiny").text_attention == "causal"  # the default


def test_codes_of_another_tokenizer_are_refused(codes, tmp_path):
    codes_dir, _ = codes
    torch.manual_seed(1)
    other = VQGAN(VQGANConfig.from_preset("cpu-tiny", resolution=16, ch=8, codebook_size=64))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="weights_sha256"):
        train(codes_dir, tmp_path / "run", "--max-steps 1 --image-tokenizer", tmp_path / "other")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("--batch-size -2", "--batch-size=-2 is invalid; allowed: a number > 0"),
        ("--learning-rate 0", "--learning-rate=0.0 is invalid"),
        ("--preset XXL", r"--preset='XXL' is invalid; allowed: one of \['B', 'L', 'XL', 'cpu-t"),
        ("--text-length 2", "--text-length=2 is invalid; allowed: an integer >= 3"),
        ("--caption-dropout 1.5", r"--caption-dropout=1.5 is invalid; allowed: a number in \[0,"),
        ("--text-model-type wordpiece", r"--text-model-type='wordpiece'.*'bpe'"),
        ("--code-features patches", r"--code-features=patches decodes the codes and needs --im"),
    ],
)
def test_bad_arguments_name_flag_value_and_allowed(tmp_path, extra, message):
    argv = cli(PRIOR_ARGS, "--codes c --output-dir", tmp_path, "--max-steps 1", extra)
    with pytest.raises(ValueError, match=message):
        train_prior.parse_args(argv)


def test_help_explains_every_flag():
    parser = train_prior.build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []


def test_two_processes_equal_one_process_with_the_same_global_batch(codes, tmp_path):
    """2 ranks x 2 accumulated micro-batches x 2 rows == 1 rank x 8 rows, with caption dropout
    (its draw depends on the sample's position in the global batch, not on the rank) and, on the
    ranks only, activation checkpointing (which must not change the numbers)."""
    codes_dir, _ = codes
    flags = "--max-steps 3 --record-sample-indices --caption-dropout 0.5 --adam-epsilon 1e-3"
    single = train(codes_dir, tmp_path / "one", flags, "--batch-size 8")
    reference = {k: v.detach().clone() for k, v in single.prior.state_dict().items()}
    assert (reference["norm.weight"] - 1).abs().max() > 1e-4  # ones at init: the steps moved it
    argv = cli(PRIOR_ARGS, "--codes", codes_dir, "--output-dir", tmp_path / "two", flags)
    argv += cli("--text-tokenizer", tmp_path / "one" / "text_tokenizer")
    argv += cli("--batch-size 2 --gradient-accumulation-steps 2 --gradient-checkpointing")
    rank0, rank1 = run_two_ranks(train_prior, argv, tmp_path)
    assert_same_weights(rank0, rank1, exact=True)
    assert_same_weights(reference, rank0, exact=False, atol=1e-5)
    seen = [read_sample_log(tmp_path / "two", rank) for rank in range(2)]
    for step, indices in enumerate(read_sample_log(tmp_path / "one", 0)):
        ranks = [seen[rank][2 * step] + seen[rank][2 * step + 1] for rank in range(2)]  # 2 micro
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == sorted(indices)


def test_time_budget_fixes_and_records_the_step_count(codes, tmp_path):
    codes_dir, _ = codes
    out = tmp_path / "run"
    flags = "--time-budget-minutes 0.03 --max-steps 100000 --checkpoint-every 1000"
    job = train(codes_dir, out, flags)
    total = job.ctx.budget.total_steps
    assert 31 <= total < 100000 and job.ctx.state.step == total  # 1 untimed + 30 measured
    assert job.ctx.budget.elapsed() < 0.03 * 60 + 30  # in budget, with slack for a busy CPU
    assert f"-> {total} steps in total" in (out / "train.log").read_text()
    state = json.loads(
        (out / "checkpoints" / f"step-{total:08d}" / "trainer_state.json").read_text()
    )
    assert state["total_steps"] == total
