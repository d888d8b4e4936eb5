"""Smoke runs of make_pipeline.py, sample.py and evaluate_pipeline.py on a tiny pipeline, in
process (`main(parse_args([...]))`, what `python scripts/x.py ...` runs), plus the FID/KID path
with a small random feature network (the real Inception weights can't be downloaded here)."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import evaluate_pipeline
import make_pipeline
import numpy as np
import pytest
import sample
import torch
from common.reference import fid_kid, inception_weights, reference_metrics
from image_files import image_pixels, image_size
from PIL import Image
from test_evaluate_tokenizer import _Grey, _Lossless
from test_pipeline import PROMPTS, tiny_prior, tiny_vqgan

from pipelines import ImageTextScorer, ScorerConfig, TextToImagePipeline
from prior import TextTokenizer


@pytest.fixture(scope="module")
def component_dirs(tmp_path_factory):
    """Saved tiny components: what the training jobs export."""
    root = tmp_path_factory.mktemp("components")
    captions = [*PROMPTS, "a big pink diamond at the top right on a white background"]
    text_tokenizer = TextTokenizer.train(
        captions, vocab_size=48, text_length=24, byte_fallback=False
    )
    torch.manual_seed(0)
    tiny_vqgan().save_pretrained(root / "vqgan")
    tiny_prior(text_tokenizer).save_pretrained(root / "prior")
    text_tokenizer.save_pretrained(root / "text_tokenizer")
    return root


@pytest.fixture(scope="module")
def pipeline_dir(component_dirs):
    root = component_dirs
    args = make_pipeline.parse_args(
        [
            *("--image-tokenizer", str(root / "vqgan"), "--prior", str(root / "prior")),
            *("--text-tokenizer", str(root / "text_tokenizer"), "--out", str(root / "pipe")),
            *("--guidance-scale", "2.5", "--top-k", "16"),
        ]
    )
    return make_pipeline.main(args)


def test_make_pipeline_writes_a_loadable_folder(pipeline_dir):
    pipeline = TextToImagePipeline.from_pretrained(pipeline_dir)
    assert pipeline.config.guidance_scale == 2.5 and pipeline.config.top_k == 16
    assert pipeline.config.resolution == 16


def test_make_pipeline_missing_component(component_dirs, tmp_path):
    args = make_pipeline.parse_args(
        [
            *(
                "--image-tokenizer",
                str(tmp_path / "nope"),
                "--prior",
                str(component_dirs / "prior"),
            ),
            *("--text-tokenizer", str(component_dirs / "text_tokenizer"), "--out", str(tmp_path)),
        ]
    )
    with pytest.raises(FileNotFoundError, match="--image-tokenizer"):
        make_pipeline.main(args)


def test_sample_writes_pngs_grid_and_index(pipeline_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n\n  a blue square  \n")
    out = tmp_path / "samples"
    argv = [PROMPTS[0], "--pipeline", str(pipeline_dir), "--prompts-file", str(prompts_file)]
    argv += ["--num-images-per-prompt", "2", "--seed", "3", "--out", str(out)]
    sample.main(sample.parse_args(argv))
    records = json.loads((out / "prompts.json").read_text())
    assert [record["prompt"] for record in records] == [
        PROMPTS[0], PROMPTS[0], "a red circle", "a red circle", "a blue square", "a blue square"
    ]  # fmt: skip
    assert all(image_size(out / record["file"]) == (16, 16) for record in records)
    assert image_size(out / "grid.png") == (
        2 * 16 + 3 * 2,
        3 * 16 + 4 * 2,
    )  # one row per prompt, 2 px padding
    assert "[2] a blue square" in capsys.readouterr().out
    # the same seed reproduces the files exactly
    again = tmp_path / "again"
    sample.main(sample.parse_args([*argv[:-1], str(again)]))
    for record in records:
        assert np.array_equal(
            image_pixels(out / record["file"]),
            image_pixels(again / record["file"]),
        )


def test_sample_passes_the_rerank_flags(pipeline_dir, tmp_path):
    """--num-candidates and --likelihood-weight reach the pipeline: the files are the images
    of the same reranked call made in Python, and differ from one sample per image."""
    out = tmp_path / "reranked"
    argv = [PROMPTS[0], PROMPTS[1], "--pipeline", str(pipeline_dir), "--seed", "5"]
    sample.main(sample.parse_args([*argv, "--out", str(out), "--num-candidates", "4",
                                   "--likelihood-weight", "1", "--no-progress"]))  # fmt: skip
    pipeline = TextToImagePipeline.from_pretrained(pipeline_dir)
    generators = [torch.Generator().manual_seed(5 + index) for index in range(2)]
    expected = pipeline(
        [PROMPTS[0], PROMPTS[1]], num_candidates=4, likelihood_weight=1.0,
        generator=generators, output_type="np", show_progress=False,
    ).images  # fmt: skip
    written = np.stack([image_pixels(out / f"p{index:03d}_00.png") for index in range(2)])
    assert np.array_equal(written, (expected * 255).round().astype(np.uint8))
    plain = tmp_path / "plain"
    sample.main(sample.parse_args([*argv, "--out", str(plain), "--no-progress"]))
    first = np.stack([image_pixels(plain / f"p{index:03d}_00.png") for index in range(2)])
    assert not np.array_equal(first, written)


def test_sample_without_prompts_fails(pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        sample.main(sample.parse_args(["--pipeline", str(pipeline_dir), "--out", str(tmp_path)]))


def test_evaluate_sweep_stores_best_scale(pipeline_dir, tmp_path):
    pipeline = TextToImagePipeline.from_pretrained(pipeline_dir)
    folder = pipeline.save_pretrained(tmp_path / "pipe")  # a copy: the sweep rewrites its config
    argv = ["--pipeline", str(folder), "--num-prompts", "3", "--held-out"]
    argv += ["--sweep-guidance", "1,2", "--num-validation-prompts", "3", "--tokenizer-images", "6"]
    argv += ["--out", str(tmp_path / "eval.json")]
    report = evaluate_pipeline.main(evaluate_pipeline.parse_args(argv))
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    sweep = report["sweep"]
    assert [row["guidance_scale"] for row in sweep["results"]] == [1.0, 2.0]
    best = max(sweep["results"], key=lambda row: row["all_correct"])["guidance_scale"]
    rerank = {"num_candidates": 1, "likelihood_weight": 0.0}  # saved defaults: no reranking
    assert sweep["chosen"] == {"guidance_scale": best, "temperature": 1.0, "top_k": 16, **rerank}
    assert TextToImagePipeline.from_pretrained(folder).config.guidance_scale == best
    test = report["test"]
    assert test["with_cfg"]["seen"]["guidance_scale"] == best
    assert test["without_cfg"]["held_out"]["guidance_scale"] == 1.0
    for group in ("seen", "held_out"):
        row = test["with_cfg"][group]
        assert row["count"] == 3 and 0.0 <= row["all_correct"] <= 1.0
    assert report["reconstruction"].keys() == {"seen", "held_out"}
    assert all(row["count"] == 3 for row in report["reconstruction"].values())
    tokenizer = report["tokenizer"]
    assert tokenizer["num_images"] == 6 and 0 < tokenizer["codebook_usage"] <= 1
    assert np.isfinite(tokenizer["psnr_db"])


def test_evaluate_chooses_the_rerank_weight_on_validation(component_dirs, tmp_path):
    root = component_dirs
    text_tokenizer = TextTokenizer.from_pretrained(root / "text_tokenizer")
    torch.manual_seed(1)
    ImageTextScorer(
        ScorerConfig(text_tokenizer.vocab_size, text_tokenizer.pad_id, (4, 8), 2, 8)
    ).save_pretrained(root / "scorer")
    folder = make_pipeline.main(
        make_pipeline.parse_args(
            [
                *("--image-tokenizer", str(root / "vqgan"), "--prior", str(root / "prior")),
                *(
                    "--text-tokenizer",
                    str(root / "text_tokenizer"),
                    "--scorer",
                    str(root / "scorer"),
                ),
                *("--out", str(tmp_path / "pipe"), "--num-candidates", "3"),
            ]
        )
    )
    assert TextToImagePipeline.from_pretrained(folder).config.num_candidates == 3
    argv = ["--pipeline", str(folder), "--num-prompts", "4", "--held-out"]
    argv += ["--sweep-temperature", "1,0.5", "--sweep-likelihood-weight", "0,0.1"]
    argv += ["--num-validation-prompts", "4", "--guidance-scale", "1"]
    report = evaluate_pipeline.main(evaluate_pipeline.parse_args(argv))
    rows = report["sweep"]["results"]
    pairs = [(row["temperature"], row["likelihood_weight"]) for row in rows]
    assert pairs == [(1.0, 0.0), (1.0, 0.1), (0.5, 0.0), (0.5, 0.1)]
    best = max(rows, key=lambda row: row["all_correct"])
    assert report["sweep"]["chosen"]["likelihood_weight"] == best["likelihood_weight"]
    assert (
        TextToImagePipeline.from_pretrained(folder).config.likelihood_weight
        == (best["likelihood_weight"])
    )
    for row in [*rows, *report["test"]["with_cfg"].values()]:
        assert row["num_candidates"] == 3
        # Any reranker's pick is one of the candidates, so it can't beat "some candidate right".
        assert row["any_candidate"] >= row["all_correct"]
        assert row["any_candidate"] >= row["first_candidate"]["all_correct"]
    # Scale 1 draws without CFG already: the row is reused, not sampled again.
    assert report["test"]["without_cfg"] == report["test"]["with_cfg"]
    # A one-sample evaluation of this folder draws one sample, whatever its saved default.
    one = evaluate_pipeline.main(
        evaluate_pipeline.parse_args(
            ["--pipeline", str(folder), "--num-prompts", "2", "--num-candidates", "1"]
        )
    )
    assert one["test"]["with_cfg"]["seen"]["num_candidates"] == 1
    assert "first_candidate" not in one["test"]["with_cfg"]["seen"]
    with pytest.raises(ValueError, match="--num-candidates > 1"):
        evaluate_pipeline.main(
            evaluate_pipeline.parse_args(
                [
                    "--pipeline",
                    str(folder),
                    "--num-candidates",
                    "1",
                    "--sweep-likelihood-weight",
                    "0,1",
                ]
            )
        )


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("held_out", [False, True])
def test_reconstruction_ceiling_judges_the_test_renders(held_out, resolution, monkeypatch):
    """A lossless tokenizer passes every test render, seen or held-out, at 32 px and resized
    from 64 px; a grey one passes none; and the records judged are the test prompts' own."""
    pipeline = SimpleNamespace(config=SimpleNamespace(resolution=resolution), device="cpu")
    pipeline.image_tokenizer = _Lossless()
    dataset = evaluate_pipeline.shapes_split("test", 30, held_out, 0, resolution)
    judged = []
    judge = evaluate_pipeline.judge_reconstructions

    def recording_judge(tokenizer, renders, records, batch_size, device):
        judged.append(records)
        return judge(tokenizer, renders, records, batch_size, device)

    monkeypatch.setattr(evaluate_pipeline, "judge_reconstructions", recording_judge)
    perfect = evaluate_pipeline.reconstruction_ceiling(pipeline, dataset, batch=8)
    assert perfect["count"] == 30 and perfect["all_correct"] == 1.0
    assert judged[0] == evaluate_pipeline.shapes_prompts("test", 30, held_out, 0)
    pipeline.image_tokenizer = _Grey()
    grey = evaluate_pipeline.reconstruction_ceiling(pipeline, dataset, batch=8)
    assert grey["all_correct"] == 0.0 and grey["color"] == 0.0


def test_evaluate_prompt_sets_are_disjoint_by_split_and_pair():
    validation = evaluate_pipeline.shapes_prompts("validation", 20, False, 0)
    seen = evaluate_pipeline.shapes_prompts("test", 20, False, 0)
    held_out = evaluate_pipeline.shapes_prompts("test", 20, True, 0)
    assert not any(record["held_out"] for record in validation + seen)
    assert all(record["held_out"] for record in held_out)
    assert [r["caption"] for r in validation] != [r["caption"] for r in seen]


@pytest.mark.parametrize(
    ("flag", "text"),
    [("--sweep-guidance", "1,x"), ("--sweep-guidance", "-1"), ("--sweep-guidance", ""),
     ("--sweep-temperature", "0"), ("--sweep-top-k", "1.5")],
)  # fmt: skip
def test_evaluate_rejects_bad_sweep(flag, text):
    with pytest.raises(SystemExit):
        evaluate_pipeline.parse_args(["--pipeline", "p", flag, text])


def test_sweep_grid_is_the_product_of_the_lists():
    args = evaluate_pipeline.parse_args(
        ["--pipeline", "p", "--sweep-guidance", "1,2", "--sweep-top-k", "0,8"]
    )
    assert args.sweep == [
        {"guidance_scale": 1.0, "top_k": None}, {"guidance_scale": 1.0, "top_k": 8},
        {"guidance_scale": 2.0, "top_k": None}, {"guidance_scale": 2.0, "top_k": 8},
    ]  # fmt: skip


class TinyFeatures(torch.nn.Module):
    """A random conv net standing in for InceptionV3 (torchmetrics feature=nn.Module)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, 2, 1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, 2, 1),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 255.0)  # uint8 (N, 3, H, W) -> (N, 16)


def test_fid_kid_with_a_small_feature_network():
    torch.manual_seed(0)
    real = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    same = fid_kid(real, real.clone(), TinyFeatures())
    darker = fid_kid(real, real // 3, TinyFeatures())
    assert abs(same["fid"]) < 1e-3
    assert darker["fid"] > 100 * max(abs(same["fid"]), 1e-4) and darker["kid"] > same["kid"]


def test_reference_dir_fid_path_and_missing_weights_message(pipeline_dir, tmp_path, capsys):
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(reference / f"{index}.png")
        (reference / f"{index}.txt").write_text(PROMPTS[index % 2])
    args = argparse.Namespace(
        reference_dir=reference,
        reference_split=None,
        inception_weights=None,
        num_prompts=6,
        seed=0,
        batch_size=4,
    )
    pipeline = TextToImagePipeline.from_pretrained(pipeline_dir)
    result = reference_metrics(pipeline, args, feature=TinyFeatures())
    assert result["num_images"] == 6 and np.isfinite(result["fid"]) and np.isfinite(result["kid"])
    if inception_weights(None) is None:
        skipped = reference_metrics(pipeline, args)
        assert skipped["fid"] is None and "--inception-weights" in skipped["message"]
        assert "FID/KID skipped" in capsys.readouterr().out
