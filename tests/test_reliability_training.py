"""Reliability of the training jobs (issue 8, items 1-4): exact resume after SIGKILLs at named
points, fallback from a corrupt checkpoint, disk-full and read-only checkpoint writes, and
non-finite losses skipped in agreement across ranks."""

from __future__ import annotations

import errno
import json

import pytest
import torch
import train_prior
import train_scorer
import train_tokenizer
from accelerate import Accelerator
from bad_data_corpus import build_bad_data_corpus
from common import checkpoint as checkpoint_module
from common.checkpoint import CheckpointWriteError, list_checkpoints, verify_checkpoint
from common.guards import NonFiniteLossError
from training_helpers import (
    PRIOR_ARGS,
    SCORER_ARGS,
    TOKENIZER_ARGS,
    assert_same_weights,
    cli,
    make_codes,
    make_text_tokenizer,
    read_sample_log,
    reset_process_state,
    run_forked,
    run_two_ranks,
    weights,
)

pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("fresh_process_state")]

# Three kills at three different points (plus a fourth), each followed by --resume.
KILLS = ("mid-step:3", "mid-file:1", "before-rename:1", "after-temp-write:2")
# Every kind of resumable state: GAN phase, LeCam EMAs, weight EMA, dead-code restarts (torch
# RNG), random flips (per-item generators), Adam moments and the LR schedule.
TOKENIZER_RUN = cli(
    TOKENIZER_ARGS,
    "--max-steps 6 --checkpoint-every 2 --ema-decay 0.9 --restart-threshold 2",
    "--disc-weight 0.5 --disc-start 2 --disc-warmup-steps 1 --lecam-weight 0.01 --flip",
)
PRIOR_RUN = cli(
    PRIOR_ARGS, "--max-steps 6 --checkpoint-every 2 --ema-decay 0.9 --caption-dropout 0.5"
)


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    return make_codes(tmp_path_factory.mktemp("codes"))[0]


def metric_lines(out) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput (the only value allowed to differ)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "steps_per_second"} for row in rows]


def kill_corrupt_resume(module, argv, tmp_path, final_file):
    """Uninterrupted reference; then KILLS, a truncated newest checkpoint, and a last resume.
    Final weights and every metric line must equal the reference's, bit for bit."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert run_forked(module, [*argv, "--output-dir", str(reference)]) == 0
    for fault in KILLS:
        assert run_forked(module, [*argv, "--output-dir", str(run), "--resume"], fault) == -9
    committed = list_checkpoints(run / "checkpoints")
    assert [folder.name for folder in committed] == ["step-00000002", "step-00000004"]
    damaged = committed[-1] / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    assert run_forked(module, [*argv, "--output-dir", str(run), "--resume"]) == 0
    log = (run / "train.log").read_text()
    assert f"{damaged} is truncated or altered" in log and "falling back" in log
    assert "resumed from" in log and "step-00000002 at step 2" in log
    assert_same_weights(weights(reference / final_file), weights(run / final_file), exact=True)
    assert metric_lines(run) == metric_lines(reference)


def test_tokenizer_resumes_exactly_after_kills_and_a_corrupt_checkpoint(tmp_path):
    kill_corrupt_resume(train_tokenizer, TOKENIZER_RUN, tmp_path, "final/model.safetensors")


def test_prior_resumes_exactly_after_kills_and_a_corrupt_checkpoint(codes, tmp_path):
    argv = [*PRIOR_RUN, "--codes", str(codes)]
    kill_corrupt_resume(train_prior, argv, tmp_path, "final/prior/model.safetensors")


def test_scorer_resumes_exactly_after_kills_and_a_corrupt_checkpoint(tmp_path):
    text_tokenizer = make_text_tokenizer(tmp_path)
    argv = cli(SCORER_ARGS, "--max-steps 6 --checkpoint-every 2 --ema-decay 0.9")
    argv += cli("--text-tokenizer", text_tokenizer)
    kill_corrupt_resume(train_scorer, argv, tmp_path, "final/model.safetensors")


def _fail_on_second_checkpoint(monkeypatch, kind):
    """Make the second checkpoint's write fail like a full disk or a read-only mount."""
    calls = {"count": 0}
    if kind == "disk-full":
        write_file = checkpoint_module.write_file

        def failing(path, data):
            calls["count"] += 1
            if calls["count"] > 3:  # the first checkpoint writes 3 files of its own
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            write_file(path, data)

        monkeypatch.setattr(checkpoint_module, "write_file", failing)
        return "No space left on device"
    save_state = Accelerator.save_state

    def read_only(self, output_dir=None, **kwargs):
        calls["count"] += 1
        if calls["count"] > 1:
            raise OSError(errno.EROFS, "Read-only file system", str(output_dir))
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", read_only)
    return "Read-only file system"


@pytest.mark.parametrize("kind", ["disk-full", "read-only"])
def test_failed_checkpoint_write_is_a_clear_error_and_keeps_the_previous(
    tmp_path, monkeypatch, kind
):
    reason = _fail_on_second_checkpoint(monkeypatch, kind)
    out = tmp_path / "run"
    argv = cli(TOKENIZER_ARGS, "--output-dir", out, "--max-steps 4 --checkpoint-every 2")
    with pytest.raises(CheckpointWriteError) as caught:
        train_tokenizer.train(train_tokenizer.parse_args(argv))
    message = str(caught.value)
    assert f"could not write checkpoint {out / 'checkpoints' / 'step-00000004'}" in message
    assert reason in message and "ckpt.tmp" in message
    assert f"{out / 'checkpoints' / 'step-00000002'} is intact" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert verify_checkpoint(out / "checkpoints" / "step-00000002")["step"] == 2


def test_nonfinite_steps_are_skipped_and_leave_the_model_untouched(tmp_path, monkeypatch):
    """Steps 2 and 3 get a NaN loss: both are skipped and counted, and everything a forward
    rewrites in place (restarted codes, restart counters, BatchNorm statistics) is restored,
    so the checkpoints after steps 1 and 3 hold identical models and optimizer states."""
    monkeypatch.setenv("CODEGRID_FAULT", "nan-loss:2-3")
    out = tmp_path / "run"
    argv = cli(
        TOKENIZER_ARGS,
        "--output-dir",
        out,
        "--max-steps 4 --checkpoint-every 1",
        "--keep-checkpoints 10 --restart-threshold 1 --max-nonfinite-steps 3",
        "--disc-weight 0.5 --disc-start 0 --disc-warmup-steps 0",
    )
    job = train_tokenizer.train(train_tokenizer.parse_args(argv))
    rows = [row for row in metric_lines(out) if "skipped" in row]
    assert [row["skipped"] for row in rows] == [0.0, 1.0, 1.0, 0.0]
    assert rows[-1]["nonfinite_total"] == 2 and job.ctx.guard.total == 2
    first, third = out / "checkpoints" / "step-00000001", out / "checkpoints" / "step-00000003"
    for name in ("model.safetensors", "model_1.safetensors"):
        assert (first / name).read_bytes() == (third / name).read_bytes(), name
    for name in ("optimizer.bin", "optimizer_1.bin"):  # Adam moments and step counts (lr differs)
        before, after = (
            torch.load(folder / name, weights_only=True)["state"] for folder in (first, third)
        )
        assert before.keys() == after.keys()
        for key in before:
            assert all(torch.equal(before[key][k], after[key][k]) for k in before[key]), (name, key)
    assert all(
        torch.isfinite(v).all() for v in weights(out / "final" / "model.safetensors").values()
    )


def test_too_many_nonfinite_steps_stop_the_job_naming_the_last_good_checkpoint(
    codes, tmp_path, monkeypatch
):
    monkeypatch.setenv("CODEGRID_FAULT", "nan-loss:3-")
    out = tmp_path / "run"
    argv = cli(
        PRIOR_ARGS,
        "--codes",
        codes,
        "--output-dir",
        out,
        "--max-steps 8 --checkpoint-every 2 --max-nonfinite-steps 2",
    )
    with pytest.raises(
        NonFiniteLossError, match=r"2 non-finite steps in a row \(last at step 4"
    ) as caught:
        train_prior.train(train_prior.parse_args(argv))
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step-00000002'}" in str(caught.value)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert not (out / "final").exists()


def test_a_nan_on_one_rank_makes_both_ranks_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEGRID_FAULT", "nan-loss:2@1")  # rank 1's 2nd step only
    out = tmp_path / "run"
    argv = cli(TOKENIZER_ARGS, "--output-dir", out, "--max-steps 3 --batch-size 4 --disc-weight 0")
    rank0, rank1 = run_two_ranks(train_tokenizer, argv, tmp_path)
    assert_same_weights(rank0, rank1, exact=True)
    rows = [row for row in metric_lines(out) if "skipped" in row]  # written by rank 0
    assert [row["skipped"] for row in rows] == [0.0, 1.0, 0.0]


def test_both_jobs_train_over_the_bad_data_corpus(tmp_path):
    """Every valid image of the corpus is trained on, every invalid one is counted in the run
    log by reason, and the prior trains on codes extracted from it (emoji, CJK, non-UTF-8 and
    10,000-character captions included)."""
    import extract_codes

    corpus = build_bad_data_corpus(tmp_path / "corpus")
    tokenizer_run, codes, prior_run = tmp_path / "tokenizer", tmp_path / "codes", tmp_path / "prior"
    argv = cli(TOKENIZER_ARGS, "--data", corpus.root, "--output-dir", tokenizer_run)
    argv += cli("--max-steps 1 --record-sample-indices --batch-size", corpus.num_valid)
    with pytest.warns(UserWarning, match=f"{corpus.num_valid} valid; bad_metadata_line="):
        train_tokenizer.train(train_tokenizer.parse_args(argv))
    assert sorted(read_sample_log(tokenizer_run, 0)[0]) == list(range(corpus.num_valid))
    reset_process_state()
    argv = cli("--tokenizer", tokenizer_run / "final", "--data", corpus.root, "--out", codes)
    with pytest.warns(UserWarning, match="data source"):
        extract_codes.main(extract_codes.parse_args(argv + cli("--resolution 16")))
    reset_process_state()
    argv = cli(PRIOR_ARGS, "--codes", codes, "--image-tokenizer", tokenizer_run / "final")
    argv += cli("--output-dir", prior_run, "--max-steps 2 --batch-size 4")
    with pytest.warns(UserWarning, match="a caption of 10000 tokens was truncated"):
        job = train_prior.train(train_prior.parse_args(argv))
    assert job.ctx.state.step == 2
    assert (prior_run / "final" / "prior" / "model.safetensors").is_file()
    for log in (tokenizer_run / "train.log", prior_run / "train.log"):
        text = log.read_text()
        assert f"{corpus.num_valid} valid" in text
        for reason, count in corpus.expected_counts.items():
            assert f"{reason}={count} (e.g. " in text, (log, reason)
