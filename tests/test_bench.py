"""scripts/bench.py: correctness only (the optimised paths equal the plain ones), no timings."""

import json
import subprocess
import sys
import textwrap

import bench
import pytest
import torch
from benchmarks import common, priors
from benchmarks.common import Settings
from benchmarks.tokenizer import build_pair, check_equivalence

SMOKE = Settings(smoke=True, runs=1, warmup=0)


def test_tokenizer_matches_taming_modules_with_the_same_weights():
    ours, reference, images = build_pair(SMOKE)
    result = check_equivalence(ours, reference, images)
    assert result["passed"], result
    assert result["latent_max_abs_diff"] < 1e-5 and result["decode_max_abs_diff"] < 1e-4
    assert result["code_mismatches_not_ties"] == 0
    # The check can fail: one changed reference weight breaks it.
    with torch.no_grad():
        reference.decoder.conv_out.bias.add_(1e-3)
    assert not check_equivalence(ours, reference, images)["passed"]


def test_state_dict_must_map_one_to_one():
    from benchmarks.tokenizer import map_state_dict

    ours, reference, _ = build_pair(SMOKE)
    state = ours.state_dict()
    assert map_state_dict(state, reference).keys() == reference.state_dict().keys()
    renamed = {k.replace("encoder.conv_in", "encoder.stem"): v for k, v in state.items()}
    with pytest.raises(common.EquivalenceError, match="missing in ours"):
        map_state_dict(renamed, reference)
    reshaped = {**state, "quant_conv.bias": torch.zeros(3)}
    with pytest.raises(common.EquivalenceError, match="shape mismatches"):
        map_state_dict(reshaped, reference)


def test_kv_cache_sampling_equals_full_recompute():
    from benchmarks.sampling import check_cache_equivalence

    row = check_cache_equivalence(SMOKE, grid=3)
    assert row.passed and row.extra["mismatches"] == 0


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_flop_formula_counts_every_matmul_weight(mlp):
    config = priors.prior_config(SMOKE, 4, mlp=mlp)
    model = priors.build_prior(config, seed=0)
    flops, _ = priors.training_flops(config, batch=1)
    tokens, image_tokens = config.sequence_length, config.num_image_tokens
    attention = 12 * config.num_layers * config.d_model * tokens * tokens
    n_head = config.d_model * config.codebook_size
    n_blocks = (flops - attention - 6 * n_head * image_tokens) / (6 * tokens)
    assert n_blocks + n_head == priors.matmul_parameters(model)


def test_time_pair_warms_up_then_interleaves_abba():
    calls = []
    settings = Settings(runs=4, warmup=1)
    common.time_pair(lambda: calls.append("a"), lambda: calls.append("b"), settings)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]


def test_linear_fit_and_table():
    assert common.linear_fit([1, 2, 3], [5, 7, 9]) == pytest.approx((2.0, 3.0))
    rows = [
        common.Row("x", "time", 1.0, 2.0, "s", 0.5, 0.8, higher_is_better=False),
        common.Row("x", "check", passed=False),
    ]
    table = common.format_table(rows)
    assert "| ≤ 0.8 | yes |" in table and "| FAIL |" in table


def test_cli_tokenizer_smoke_exit_status_and_json(tmp_path):
    out = tmp_path / "bench.json"
    args = bench.parse_args(["tokenizer", "--smoke", "--runs", "1", "--warmup", "0"])
    args.json = out
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    check, timing = result["rows"]
    assert check["passed"] is True and timing["ratio"] > 0
    assert result["equivalence_failures"] == []


_TORCH_ONLY = """
import importlib.abc, runpy, sys
BLOCKED = {blocked}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed on the accelerator machine")
sys.meta_path.insert(0, Block())
sys.path.insert(0, "scripts")  # what `python scripts/bench.py` puts first
sys.argv = ["scripts/bench.py", "gpu", "--smoke", "--no-compile", "--runs", "1", "--threads", "1",
            "--warmup", "0", "--json", {out!r}]
runpy.run_path("scripts/bench.py", run_name="__main__")
"""
_NOT_ON_DEVICE = ["transformers", "datasets", "diffusers", "accelerate", "torchmetrics", "lpips",
                  "taming", "PIL"]  # fmt: skip
_PURE_PYTHON_EXTRAS = ["safetensors", "sentencepiece"]


def _run_gpu_smoke(repo_root, tmp_path, blocked) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu.json"
    code = textwrap.dedent(_TORCH_ONLY.format(blocked=set(blocked), out=str(out)))
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    return done, json.loads(out.read_text()) if done.returncode == 0 else {}


def test_gpu_subcommand_smoke_without_hf_libraries(repo_root, tmp_path):
    done, result = _run_gpu_smoke(repo_root, tmp_path, _NOT_ON_DEVICE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert result["train"]["tokens_per_s"] > 0 and result["train"]["mfu_vs_measured_peak"] > 0
    assert set(result["sampling"]) >= {"batch_1", "batch_2"}
    assert result["tokenizer"]["encode_images_per_s"] > 0


def test_gpu_subcommand_smoke_with_torch_only(repo_root, tmp_path):
    """The accelerator machine may lack even safetensors and sentencepiece: the model packages
    import them lazily, only where a folder is saved or a text tokenizer is built."""
    done, result = _run_gpu_smoke(repo_root, tmp_path, [*_NOT_ON_DEVICE, *_PURE_PYTHON_EXTRAS])
    assert done.returncode == 0, done.stderr[-3000:]
    assert result["train"]["tokens_per_s"] > 0


def test_gpu_sections_run_in_order_and_a_failing_one_is_recorded(monkeypatch, tmp_path):
    """--gpu-sections picks the measurements; one that raises leaves an error entry, the JSON
    written so far and exit status 1, and the sections after it still run."""
    from benchmarks import gpu

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(gpu, "bench_sampling", broken)
    out = tmp_path / "gpu.json"
    argv = ["gpu", "--smoke", "--no-compile", "--runs", "1", "--warmup", "0", "--threads", "1",
            "--gpu-sections", "sampling,tokenizer", "--json", str(out)]  # fmt: skip
    assert bench.main(bench.parse_args(argv)) == 1
    result = json.loads(out.read_text())
    assert result["complete"] and "command" in result and "commit" in result
    assert [key for key in result if key in gpu.SECTIONS] == ["sampling", "tokenizer"]
    assert "simulated" in result["sampling"]["error"]
    assert result["tokenizer"]["encode_images_per_s"] > 0
    with pytest.raises(SystemExit):
        bench.parse_args(["gpu", "--gpu-sections", "train,sampels"])


def test_gpu_run_killed_midway_leaves_the_finished_sections(monkeypatch, tmp_path):
    """A run stopped during a section (the lease's time limit) keeps what finished before it,
    with the metadata, marked incomplete; an earlier run's file is replaced first."""
    from benchmarks import gpu

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # not an Exception: the section loop does not catch it

    monkeypatch.setattr(gpu, "bench_tokenizer", killed)
    out = tmp_path / "gpu.json"
    out.write_text('{"stale": true}')
    argv = ["gpu", "--smoke", "--no-compile", "--runs", "1", "--warmup", "0", "--threads", "1",
            "--gpu-sections", "sampling,tokenizer", "--json", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        bench.main(bench.parse_args(argv))
    result = json.loads(out.read_text())
    assert result["complete"] is False and "stale" not in result
    assert result["sampling"]["batch_1"]["latency_s"] > 0 and "tokenizer" not in result
    assert result["settings"]["device"] == "cpu"


@pytest.mark.parametrize("which", ["prior", "tokenizer"])
def test_precision_steps_train_the_same_model_in_both_precisions(which):
    """The bf16 and fp32 sides of `bench.py precision` start from the same weights and data:
    two fp32 copies give identical losses, the bf16 copy agrees within bf16 rounding (much
    closer than a model with other weights does), and every side's loss falls."""
    import copy

    from benchmarks import cpu_precision
    from prior_helpers import make_prior

    from tokenizer import VQGAN, VQGANConfig

    def build(seed):
        torch.manual_seed(seed)
        if which == "prior":  # random heads (std 0.3): the first loss depends on the weights
            return make_prior().train(), cpu_precision.prior_step
        return VQGAN(
            VQGANConfig.from_preset("cpu-tiny", resolution=16)
        ), cpu_precision.tokenizer_step

    model, make_step = build(0)
    other, _ = build(1)

    def losses(net, bf16):
        step = make_step(copy.deepcopy(net).train(), 2, 0, bf16)
        return [step() for _ in range(4)]

    fp32, fp32_again, bf16 = losses(model, False), losses(model, False), losses(model, True)
    assert fp32 == fp32_again
    gap_precision = abs(bf16[0] - fp32[0]) / fp32[0]
    gap_weights = abs(losses(other, False)[0] - fp32[0]) / fp32[0]
    assert gap_precision < 0.01 and gap_weights > 5 * gap_precision, (gap_precision, gap_weights)
    assert bf16[-1] < bf16[0] and fp32[-1] < fp32[0]


def test_precision_bench_smoke_rows():
    from benchmarks.cpu_precision import bench_cpu_precision

    rows = bench_cpu_precision(SMOKE)
    assert [row.metric.split(":")[0].split(" ")[0] for row in rows] == [
        "matmul",
        "prior",
        "tokenizer",
    ]
    assert all(row.ratio > 0 and row.met is None for row in rows)
