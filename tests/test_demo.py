"""A micro-budget smoke run of scripts/demo.py: the real jobs as subprocesses, 2 steps each."""

from __future__ import annotations

import json

import demo
import pytest
import train_tokenizer
from common import demo_grid, demo_settings
from image_files import image_size

MICRO = [
    *("--budget-minutes", "0.2", "--tokenizer-steps", "2", "--prior-steps", "2"),
    *("--num-train-images", "64", "--num-test-prompts", "3", "--num-validation-prompts", "3"),
    *("--tokenizer-images", "8", "--sweep-guidance", "1,2"),
    *("--tokenizer-batch-size", "8", "--prior-batch-size", "8", "--scorer-batch-size", "8"),
    *("--scorer-steps", "2", "--num-candidates", "2", "--sweep-likelihood-weight", "0,0.1"),
]


@pytest.mark.slow
def test_demo_micro_budget_then_reuse(tmp_path, capsys, monkeypatch):
    # The jobs inherit this: one intra-op thread is much faster for tiny steps on a busy CPU.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "demo"
    metrics = demo.main(demo.parse_args([*MICRO, "--output-dir", str(out)]))
    printed = capsys.readouterr().out
    for index, stage in enumerate(demo.STAGES, 1):
        assert f"[{index}/{len(demo.STAGES)}] {stage}" in printed
    scripts = ("train_tokenizer.py", "extract_codes.py", "train_prior.py", "train_scorer.py")
    for script in (*scripts, "make_pipeline.py", "evaluate_pipeline.py"):
        assert f"scripts/{script}" in printed  # each job's command line is shown
    assert "(held-out pair)" in printed
    assert set(metrics["stage_seconds"]) == set(demo.STAGES)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for name in ("tokenizer_psnr_db", "codebook_usage", "all_correct_with_cfg"):
        assert metrics["targets"][name]["value"] == metrics[name]
    assert metrics["num_test_prompts"] == {"seen": 3, "held_out": 3}
    ceiling = metrics["reconstruction_all_correct"]
    assert ceiling.keys() == {"seen", "held_out"} and all(0 <= v <= 1 for v in ceiling.values())
    assert set(metrics["per_attribute"]["with_cfg"]["held_out"]) >= {"shape", "clean"}
    assert str(metrics["guidance_scale"]) in {"1.0", "2.0"}
    rerank = metrics["rerank"]
    assert rerank["num_candidates"] == 2 and rerank["likelihood_weight"] in (0.0, 0.1)
    for group in ("seen", "held_out"):
        assert (
            rerank["any_candidate_all_correct"][group]
            >= metrics["per_attribute"]["with_cfg"][group]["all_correct"]
        )
    columns = demo_grid.GRID_IMAGES_PER_PROMPT * demo_grid.GRID_PROMPTS_PER_ROW
    rows = len(demo_grid.grid_records()) * demo_grid.GRID_IMAGES_PER_PROMPT // columns
    side = 32 * demo_grid.GRID_SCALE
    assert image_size(out / "grid.png") == (columns * (side + 2) + 2, rows * (side + 2) + 2)
    for stage in ("tokenizer", "prior", "scorer"):
        assert str(out / stage / "curves.png") in printed and (out / stage / "curves.png").is_file()

    again = demo.main(demo.parse_args([*MICRO, "--output-dir", str(out)]))
    assert "reusing" in capsys.readouterr().out
    assert again["stage_seconds"] == metrics["stage_seconds"]  # reused stages keep their times
    assert again["this_run_seconds"] < sum(metrics["stage_seconds"].values())


def test_demo_refuses_outputs_made_with_other_settings(tmp_path):
    args = demo.parse_args(["--output-dir", str(tmp_path)])
    demo.save_state(tmp_path, {"settings": demo.settings_key(args), "stages": {}})
    other = demo.parse_args(["--output-dir", str(tmp_path), "--seed", "1"])
    with pytest.raises(ValueError, match="--fresh"):
        demo.load_state(tmp_path, demo.settings_key(other))


def test_grid_prompts_mark_the_held_out_pairs():
    from pipelines.data.shapes import is_held_out

    records = demo_grid.grid_records()
    assert [is_held_out(record) for record in records] == [False] * 12 + [True] * 4
    assert records[1]["caption"] == "a small blue square in the top left on a gray background"


@pytest.mark.parametrize("flag", ["--budget-minutes=0", "--prior-steps=0", "--resolution=64"])
def test_demo_rejects_bad_flags(flag):
    with pytest.raises(SystemExit):
        demo.parse_args([flag])


@pytest.mark.parametrize(
    "batch_flags, batch, min_steps",
    [
        ([], 16, 2800),
        (["--tokenizer-batch-size", "32"], 32, 1400),
        (["--tokenizer-batch-size", "30"], 30, 1494),
    ],
)
def test_tokenizer_stage_is_stretched_to_its_minimum_steps_within_half_the_budget(
    tmp_path, monkeypatch, batch_flags, batch, min_steps
):
    """Without a step cap the tokenizer job gets --min-steps (the image floor in steps of its
    batch, rounded up) and a --time-limit-minutes of half the budget (less start-up), flags that
    train_tokenizer.py accepts."""
    commands: list[list[str]] = []
    monkeypatch.setattr(demo, "run", lambda command, log: commands.append(command))
    args = demo.parse_args(["--output-dir", str(tmp_path), *batch_flags])
    minutes = demo.stage_minutes("tokenizer", args, {"stages": {}})
    demo.stage_tokenizer(args, tmp_path, minutes, [])
    argv = commands[0][2:]  # after the interpreter and the script
    parsed = train_tokenizer.parse_args(argv)
    assert (parsed.batch_size, parsed.min_steps) == (batch, min_steps)
    assert parsed.time_budget_minutes == pytest.approx(minutes, abs=1e-3)
    limit = demo.TOKENIZER_LIMIT_SHARE * args.budget_minutes - demo.STARTUP_MINUTES
    assert parsed.time_limit_minutes == pytest.approx(limit, abs=1e-3) and limit > minutes
    commands.clear()
    demo.stage_tokenizer(
        demo.parse_args([*MICRO, "--output-dir", str(tmp_path)]), tmp_path, 0.1, []
    )
    assert "--min-steps" not in commands[0]  # a capped smoke run stays capped


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu sse avx512f avx512_bf16 avx512_vnni", ("avx512_bf16",)),  # AMD EPYC (Zen 4)
        ("fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", ("amx_bf16", "avx512_bf16")),
        ("fpu sse avx2 avx512f", ()),
        ("fpu amx_bf16x avx512_bf16y", ()),  # whole flag names only
    ],
)
def test_native_bf16_flags_read_the_cpuinfo_flags_line(flags, expected):
    cpuinfo = f"processor\t: 0\nmodel name\t: some CPU bf16\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
    assert demo_settings.native_bf16_flags(cpuinfo) == expected


@pytest.mark.parametrize(
    "precision, device, bf16_cpu, tokenizer, prior",
    [
        ("auto", "cpu", True, "bf16", "bf16"),
        ("auto", "cpu", False, "no", "no"),
        ("auto", "cuda", False, "bf16", "bf16"),
        ("fp32", "cpu", True, "no", "no"),
        ("fp32", "cuda", False, "no", "no"),
        ("bf16", "cpu", False, "bf16", "bf16"),
    ],
)
def test_precision_flag_sets_each_jobs_mixed_precision(
    monkeypatch, precision, device, bf16_cpu, tokenizer, prior
):
    monkeypatch.setattr(
        demo_settings, "cpu_bf16_flags", lambda: ("avx512_bf16",) if bf16_cpu else ()
    )
    args = demo.parse_args(["--precision", precision, "--device", device])
    settings = demo.train_settings(args)
    for job, expected in (("tokenizer", tokenizer), ("prior", prior)):
        flags = settings[job]
        assert flags[flags.index("--mixed-precision") + 1] == expected
    # The key holds the resolved flags: stages made in another precision are not reused.
    flipped = "fp32" if prior == "bf16" else "bf16"
    other = demo.parse_args(["--precision", flipped, "--device", device])
    assert demo.settings_key(other) != demo.settings_key(args)


def test_one_sample_plan_skips_the_scorer_and_reranking_takes_prior_time(tmp_path):
    one = demo.parse_args(["--output-dir", str(tmp_path)])
    assert "scorer" not in demo.stages(one) and one.budget_minutes == 9.5
    assert one.sweep_temperature == "0.35,0.2,0.1"
    many = demo.parse_args(["--output-dir", str(tmp_path), "--num-candidates", "8"])
    assert demo.stages(many) == demo.STAGES and many.budget_minutes == 9.9
    assert many.sweep_temperature == "0.5" and demo.stage_minutes("scorer", many, {}) == 0.7
    state = {"stages": {"tokenizer": {"seconds": 180.0}, "codes": {"seconds": 12.0}}}
    spent, startup = 192.0 / 60, demo.STARTUP_MINUTES
    assert demo.stage_minutes("prior", one, state) == pytest.approx(9.5 - spent - 1.25 - startup)
    expected = 9.9 - spent - 1.9 - 0.7 - 2 * startup
    assert demo.stage_minutes("prior", many, state) == pytest.approx(expected)
