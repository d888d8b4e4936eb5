import dataclasses
import json

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
