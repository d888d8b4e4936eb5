"""scripts/extract_codes.py: smoke runs, resume, flips, identity checks and two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import extract_codes
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from bad_data_corpus import build_bad_data_corpus

from pipelines.data.codes import CODES_META, load_codes, read_codes_meta
from pipelines.data.images import load_image_caption_dataset
from tokenizer import VQGAN, VQGANConfig


def tiny_vqgan(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    config = VQGANConfig.from_preset("cpu-tiny", resolution=32, ch=8, ch_mult=(1, 1, 2),
                                     z_channels=8, codebook_size=16, codebook_dim=4)  # fmt: skip
    return VQGAN(config).eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer") / "vqgan"
    tiny_vqgan().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; leave no shared state behind."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class SimulatedKill(Exception):
    """Stands for the job dying mid-run (the shards written so far stay on disk)."""


def shapes_argv(tokenizer_dir, out, *extra):
    return ["--tokenizer", str(tokenizer_dir), "--data", "shapes", "--out", str(out),
            "--num-samples", "10", "--num-validation-samples", "3", "--shard-size", "4",
            "--batch-size", "3", *extra]  # fmt: skip


def run(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return extract_codes.main(extract_codes.parse_args(argv))


def rows(path, split="train"):
    table = load_codes(path, split).with_format("numpy")[:]
    keys = ("caption", "codes", "flipped", "source_index", "position")
    return {key: np.asarray(table[key]).tolist() for key in keys}


def test_resume_after_interruption_and_idempotent_rerun(tokenizer_dir, tmp_path, monkeypatch):
    calls, kills = [], []
    real = extract_codes.encode_shard

    def flaky(*args, **kwargs):
        calls.append(args[2][0])  # first index of the shard
        if len(calls) == 2 and not kills:
            kills.append(True)
            raise SimulatedKill("in the second shard")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_codes, "encode_shard", flaky)
    out = tmp_path / "codes"
    with pytest.raises(SimulatedKill):
        run(shapes_argv(tokenizer_dir, out))
    assert not (out / CODES_META).exists()
    calls.clear()
    run(shapes_argv(tokenizer_dir, out))
    assert calls == [4, 8, 0]  # train shards 1 and 2, validation shard 0; train shard 0 kept
    calls.clear()
    run(shapes_argv(tokenizer_dir, out))
    assert calls == []  # finished: nothing is encoded again
    fresh = run(shapes_argv(tokenizer_dir, tmp_path / "fresh"))
    assert rows(out) == rows(fresh) and rows(out, "validation") == rows(fresh, "validation")
    meta = read_codes_meta(out)
    assert meta["tokenizer"] == VQGAN.from_pretrained(tokenizer_dir).identity()
    assert meta["latent_shape"] == [8, 8] and meta["codes_dtype"] == "int16"
    assert (
        meta["splits"]["train"]["num_rows"] == 10 and meta["splits"]["validation"]["num_rows"] == 3
    )


def test_codes_match_the_tokenizer_and_flip_swaps_left_right(tokenizer_dir, tmp_path):
    out = run(shapes_argv(tokenizer_dir, tmp_path / "codes", "--flip", "--splits", "train"))
    table = load_codes(out, "train")
    assert len(table) == 20 and table.features["codes"].dtype == "int16"
    source = load_image_caption_dataset("shapes", split="train", num_samples=10, resolution=32)
    images = torch.stack([source[index]["image"] for index in range(10)])  # (10, 3, 32, 32)
    model = VQGAN.from_pretrained(tokenizer_dir)
    with torch.inference_mode():
        expected = model.encode(torch.cat([images, images.flip(-1)]))  # (20, 8, 8)
    codes = torch.as_tensor(np.asarray(table.with_format("numpy")[:]["codes"]))  # (20, 8, 8)
    assert torch.equal(codes[0::2], expected[:10]) and torch.equal(codes[1::2], expected[10:])
    sides = 0
    for original, mirror in zip(table.select(range(0, 20, 2)), table.select(range(1, 20, 2))):
        assert mirror["flipped"] and not original["flipped"]
        assert mirror["position"] == extract_codes.swap_left_right(original["position"])
        assert mirror["caption"] == extract_codes.swap_left_right(original["caption"])
        sides += "left" in original["caption"] or "right" in original["caption"]
    assert sides > 0  # the swap was exercised
    swapped = extract_codes.swap_left_right("upper left, right; bright leftover")
    assert swapped == "upper right, left; bright leftover"  # whole words only


def test_other_tokenizer_is_refused(tokenizer_dir, tmp_path):
    out = run(shapes_argv(tokenizer_dir, tmp_path / "codes", "--splits", "validation"))
    other = tiny_vqgan(seed=1)
    with pytest.raises(ValueError, match=r"extracted with tokenizer .*weights_sha256.*re-run"):
        load_codes(out, "validation", expected_identity=other.identity())
    identity = VQGAN.from_pretrained(tokenizer_dir).identity()
    load_codes(out, "validation", expected_identity=identity, expected_latent_shape=(8, 8))
    with pytest.raises(ValueError, match=r"\[8, 8\] grid .* expects \[16, 16\]"):
        load_codes(out, "validation", expected_latent_shape=(16, 16))
    with pytest.raises(ValueError, match="split='train'"):
        load_codes(out, "train")
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    with pytest.raises(ValueError, match="--overwrite"):
        run(shapes_argv(other_dir, out, "--splits", "validation"))
    run(shapes_argv(other_dir, out, "--splits", "validation", "--overwrite"))
    assert read_codes_meta(out)["tokenizer"] == other.identity()


def test_two_processes_give_the_same_rows(tokenizer_dir, tmp_path, repo_root):
    """`accelerate launch` with 2 CPU processes (gloo). Forking the test process instead
    (accelerate.debug_launcher) deadlocks in OpenMP once torch has run a parallel op."""
    argv = shapes_argv(tokenizer_dir, tmp_path / "two", "--flip")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
              "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    # No ACCELERATE_USE_CPU: the job itself must turn CPU mode on when CUDA is missing, or
    # accelerate 1.15 would make each rank a world of 1 and the job would stop with its error.
    # No visible GPU either, so the 2 ranks are CPU processes on any machine.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    environment.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run([*launch, str(repo_root / "scripts" / "extract_codes.py"), *argv],
                            capture_output=True, text=True, timeout=300, env=environment)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0" in result.stderr and "rank 1" not in result.stderr  # one progress bar
    one = run(shapes_argv(tokenizer_dir, tmp_path / "one", "--flip"))
    for split in ("train", "validation"):
        assert rows(tmp_path / "two", split) == rows(one, split)


@pytest.mark.reliability
def test_bad_data_corpus_extraction(tokenizer_dir, tmp_path):
    corpus = build_bad_data_corpus(tmp_path / "corpus")
    argv = ["--tokenizer", str(tokenizer_dir), "--data", str(corpus.root), "--out",
            str(tmp_path / "codes"), "--resolution", "16", "--validation-fraction", "0.25", "--flip"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = extract_codes.main(extract_codes.parse_args(argv))
    messages = [str(warning.message) for warning in caught]
    assert any("captions are stored unchanged" in message for message in messages)
    assert any("corrupt=4 (e.g." in message for message in messages)  # the run log names files
    meta = read_codes_meta(out)
    sizes = [meta["splits"][split]["num_rows"] for split in ("train", "validation")]
    assert sizes == [24, 8] and sum(sizes) == 2 * corpus.num_valid  # each image and its mirror
    assert meta["splits"]["train"]["report"]["counts"] == dict(corpus.expected_counts)
    assert meta["latent_shape"] == [4, 4]
    captions = [*load_codes(out, "train")["caption"], *load_codes(out, "validation")["caption"]]
    assert sorted(captions) == sorted(2 * [case.caption for case in corpus.used])


def test_help_and_argument_errors(capsys):
    with pytest.raises(SystemExit) as exit_code:
        extract_codes.parse_args(["--help"])
    assert exit_code.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--tokenizer", "--data", "--out", "--splits", "--validation-fraction",
                 "--resolution", "--num-samples", "--num-validation-samples", "--seed", "--flip",
                 "--batch-size", "--num-workers", "--shard-size", "--image-column",
                 "--caption-column", "--missing-caption", "--overwrite"):  # fmt: skip
        assert flag in text
    for argv in (["--batch-size", "0"], ["--validation-fraction", "1.5"]):
        with pytest.raises(SystemExit):
            extract_codes.parse_args(["--tokenizer", "t", "--out", "o", *argv])
