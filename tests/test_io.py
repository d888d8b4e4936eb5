import dataclasses
import json
import re

import pytest
import torch

from codegrid.io import (
    atomic_directory,
    config_from_dict,
    load_model_folder,
    load_state_dict_strict,
    save_model_folder,
)

# Atomic model folders, strict loading and config validation (issue 8, items 2 and 6).
pytestmark = pytest.mark.reliability


@dataclasses.dataclass
class TinyConfig:
    width: int = 4
    mult: tuple[int, ...] = (1, 2)


def test_model_folder_round_trip(tmp_path):
    module = torch.nn.Linear(4, 2)
    save_model_folder(tmp_path / "m", TinyConfig(mult=(3, 4)), module.state_dict(), "Linear")
    config, state = load_model_folder(tmp_path / "m", TinyConfig)
    assert config == TinyConfig(mult=(3, 4))
    other = torch.nn.Linear(4, 2)
    load_state_dict_strict(other, state, "test")
    assert torch.equal(other.weight, module.weight)


def test_unknown_config_field_is_named(tmp_path):
    with pytest.raises(ValueError, match="colour"):
        config_from_dict(TinyConfig, {"width": 2, "colour": 3})


def test_strict_load_names_keys():
    with pytest.raises(ValueError, match="missing keys \\['bias'\\]"):
        load_state_dict_strict(torch.nn.Linear(4, 2), {"weight": torch.zeros(2, 4)}, "src")


def test_failed_write_keeps_previous_folder(tmp_path):
    target = tmp_path / "m"
    save_model_folder(target, TinyConfig(width=1), {"w": torch.ones(2)}, "X")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk died")
    assert json.loads((target / "config.json").read_text())["width"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_non_finite_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        save_model_folder(tmp_path / "m", TinyConfig(), {"w": torch.tensor([float("nan")])}, "X")
    assert not (tmp_path / "m").exists()


def test_corrupt_weights_named(tmp_path):
    save_model_folder(tmp_path / "m", TinyConfig(), {"w": torch.ones(8)}, "X")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model_folder(tmp_path / "m", TinyConfig)


def test_failed_final_rename_puts_previous_folder_back(tmp_path, monkeypatch):
    import os

    target = tmp_path / "m"
    save_model_folder(target, TinyConfig(width=1), {"w": torch.ones(2)}, "X")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the first parks the old folder, the second moves the new one in
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(target) as tmp:
        (tmp / "config.json").write_text(json.dumps({"width": 2}))
    assert len(calls) == 3  # park, failed swap, restore
    assert json.loads((target / "config.json").read_text())["width"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize("target_left", [True, False])
def test_a_dead_swap_of_the_same_pid_is_recovered(tmp_path, target_left):
    """A `.old-<pid>` left by a killed process whose pid we now have: stale when the target
    exists (removed), the last good copy when it does not (moved back before the swap)."""
    import os

    target = tmp_path / "m"
    save_model_folder(target, TinyConfig(width=1), {"w": torch.ones(2)}, "X")
    parked = tmp_path / f"m.old-{os.getpid()}"
    if target_left:
        save_model_folder(parked, TinyConfig(width=7), {"w": torch.ones(2)}, "X")
    else:
        os.replace(target, parked)
    with atomic_directory(target) as tmp:
        assert json.loads((target / "config.json").read_text())["width"] == 1
        (tmp / "config.json").write_text(json.dumps({"width": 2}))
    assert json.loads((target / "config.json").read_text())["width"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@dataclasses.dataclass
class RequiredConfig:
    resolution: int
    name: str
    width: int = 4


@pytest.mark.parametrize(
    ("values", "missing"),
    [({"width": 2}, "['name', 'resolution']"), ({"resolution": 8}, "['name']")],
)
def test_missing_required_field_is_named(values, missing):
    with pytest.raises(
        ValueError, match=re.escape(f"src.json: required RequiredConfig field(s) {missing}")
    ):
        config_from_dict(RequiredConfig, values, source="src.json")


def test_strict_load_names_shape_mismatch():
    state = torch.nn.Linear(4, 3).state_dict()
    expected = (
        "src: tensor shapes do not match Linear: 'bias' has (3,), needs (2,); "
        "'weight' has (3, 4), needs (2, 4)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_state_dict_strict(torch.nn.Linear(4, 2), state, "src")
