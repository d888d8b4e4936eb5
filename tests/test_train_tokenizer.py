"""scripts/train_tokenizer.py: a 2-step smoke run then --resume, argument validation, --help,
and a 2-process run that must equal a 1-process run with the same global batch."""

from __future__ import annotations

import json

import pytest
import torch
import train_tokenizer
from image_files import image_size
from training_helpers import (
    TOKENIZER_ARGS,
    assert_same_weights,
    cli,
    read_sample_log,
    run_two_ranks,
)

from tokenizer import VQGAN

pytestmark = pytest.mark.usefixtures("fresh_process_state")


def train(out, *extra):
    argv = cli(TOKENIZER_ARGS, "--output-dir", out, *extra)
    return train_tokenizer.train(train_tokenizer.parse_args(argv))


def metric_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_then_resume(tmp_path):
    out = tmp_path / "run"
    gan = "--disc-weight 0.5 --disc-start 1 --disc-warmup-steps 0 --lecam-weight 0.01"
    flags = cli(gan, "--ema-decay 0.9 --checkpoint-every 2 --edge-weight 1")
    flags += cli("--code-search-candidates 2")
    train(out, "--max-steps 2 --report-to tensorboard --eval-every 2", flags)
    assert (out / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert (out / "images" / "reconstruction-00000002.png").is_file()
    assert json.loads((out / "args.json").read_text())["max_steps"] == 2

    job = train(out, "--max-steps 4 --resume", flags)
    assert job.ctx.state.step == 4
    assert job.ctx.state.job["disc_started_at"] == 1  # the GAN phase survived the resume
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "step-00000002" in log
    rows = metric_rows(out)
    steps = [row for row in rows if "rec_loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]  # the resume left no duplicates
    assert all("d_loss" in row and "lr" in row for row in steps[1:])
    assert "g_loss" in steps[-1] and "perplexity" in steps[-1]
    validation = [row for row in rows if "val_psnr" in row]
    assert [row["step"] for row in validation] == [2, 4]
    assert all(0 < row["val_usage"] <= 1 and row["val_psnr"] > 0 for row in validation)
    # losses, GAN losses, PSNR, perplexity, lr: 420 x 320 each
    assert image_size(out / "curves.png") == (5 * 420, 320)
    for folder in ("final", "best"):
        model = VQGAN.from_pretrained(out / folder)
        codes = model.encode(torch.zeros(1, 3, 16, 16))
        assert codes.shape == (1, 4, 4) and model.config.code_search_candidates == 2
        assert 0 <= int(codes.min()) <= int(codes.max()) < model.codebook_size == 1024


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("--batch-size 0", "--batch-size=0 is invalid; allowed: a number > 0"),
        ("--learning-rate -0.001", "--learning-rate=-0.001"),
        ("--preset tiny", r"--preset='tiny' is invalid; allowed: one of \['cpu-tiny'"),
        ("--resolution 18", "--resolution=18 is invalid; allowed: a multiple of the downsample"),
        ("--mixed-precision fp8", r"--mixed-precision='fp8'.*'bf16'"),
        ("--quantizer rq", r"--quantizer='rq'.*'fsq'"),
        ("--ema-decay 1.0", r"--ema-decay=1.0 is invalid; allowed: a number in \[0, 1\)"),
        ("--disc-layers 3", "--disc-layers=3 is invalid for --resolution 16; allowed: at most 2"),
        ("--edge-weight -1", "--edge-weight=-1.0 is invalid"),
        ("--channel-shuffle 1.5", r"--channel-shuffle=1.5 is invalid; allowed: a number in \[0,"),
        ("--min-steps 0", "--min-steps=0 is invalid; allowed: a number > 0"),
        ("--code-search-candidates 0", "--code-search-candidates=0 is invalid; allowed: a num"),
        ("--code-search-threshold -1", "--code-search-threshold=-1.0 is invalid"),
        (
            "--quantizer fsq --fsq-levels 4,4 --code-search-candidates 2",
            r"code_search_candidates=2 is invalid; allowed: 1 with quantizer='fsq'",
        ),
        ("--min-steps 10", "--min-steps=10 needs --time-budget-minutes"),
        ("--time-budget-minutes 2 --time-limit-minutes 1", "--time-limit-minutes=1.0 is below"),
    ],
)
def test_bad_arguments_name_flag_value_and_allowed(tmp_path, extra, message):
    argv = cli(TOKENIZER_ARGS, "--output-dir", tmp_path, "--max-steps 1", extra)
    with pytest.raises(ValueError, match=message):
        train_tokenizer.parse_args(argv)


def test_steps_are_required(tmp_path):
    with pytest.raises(ValueError, match="--max-steps and --time-budget-minutes"):
        train_tokenizer.parse_args(["--output-dir", str(tmp_path)])


def test_help_explains_every_flag(capsys):
    parser = train_tokenizer.build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []
    with pytest.raises(SystemExit):
        train_tokenizer.parse_args(["--help"])
    text = capsys.readouterr().out
    plain = "--disc-weight 0 --perceptual-weight 0 --quantizer vq\n--no-l2-normalize --no-restart"
    assert plain in text


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks x 4 images == 1 rank x 8 images: identical ranks, allclose weights, and the ranks
    read disjoint halves of the single process's batches.

    Adam's epsilon is 1e-3 here: with the default 1e-8 Adam divides float rounding noise in the
    gradient of parameters whose exact gradient is zero (conv biases before a GroupNorm with one
    channel per group) by that noise's own magnitude, turning 1e-10 differences into +-lr
    updates; the data-parallel path, not Adam's conditioning, is under test."""
    flags = "--max-steps 3 --record-sample-indices --disc-weight 0 --learning-rate 3e-3"
    flags += " --adam-epsilon 1e-3"
    single = train(tmp_path / "one", flags, "--batch-size 8")
    reference = {k: v.detach().clone() for k, v in single.vqgan.state_dict().items()}
    torch.manual_seed(0)  # the jobs seed with --seed 0 too: this is their initial model
    initial = VQGAN(single.vqgan.config).state_dict()
    moved = max((reference[k].float() - initial[k].float()).abs().max() for k in initial)
    assert moved > 1e-3  # the steps changed the weights far beyond the tolerance below
    argv = cli(TOKENIZER_ARGS, "--output-dir", tmp_path / "two", flags, "--batch-size 4")
    rank0, rank1 = run_two_ranks(train_tokenizer, argv, tmp_path)
    assert_same_weights(rank0, rank1, exact=True)
    assert_same_weights(reference, rank0, exact=False, atol=1e-5)
    seen = [read_sample_log(tmp_path / "two", rank) for rank in range(2)]
    for step, indices in enumerate(read_sample_log(tmp_path / "one", 0)):
        assert not set(seen[0][step]) & set(seen[1][step])
        assert sorted(seen[0][step] + seen[1][step]) == sorted(indices)
