"""Shared pieces of the checkpoint converters: safe loading of pickled checkpoints, strict key
renaming, and strict loading into our `VQGAN` with errors that name the source keys.

Safety: pickled checkpoints are read only with `torch.load(weights_only=True)`. The restricted
unpickler builds tensors, containers and primitives, and refuses every other global. Real
checkpoints carry a few harmless objects beside the weights (Lightning's `callbacks` dict keyed by
a callback *class*, LlamaGen's `args` namespace); those globals are mapped to `CheckpointStub`, an
inert class that only stores attributes, for the duration of one load. Anything else (such as a
`__reduce__` that would call `os.system`) makes the load fail before any code runs.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tokenizer.vqgan import VQGAN, VQGANConfig


class CheckpointStub:
    """Inert stand-in for a non-tensor object in a checkpoint; it only stores attributes."""

    def __repr__(self) -> str:
        return f"CheckpointStub({vars(self)})"


# Globals that real tokenizer checkpoints contain besides tensors, all mapped to CheckpointStub.
# Lightning < 1.5 keys `callbacks` by the callback class; LlamaGen's vq_train.py saves `args`.
STUB_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "argparse.Namespace",
)


def load_pickled_checkpoint(path: str | os.PathLike, parameter: str = "SRC") -> dict:
    """Read a pickled checkpoint (.ckpt / .pt / .bin) safely; returns its top-level dict.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file needs a global outside the allowlist (it is refused and nothing in
            it runs), is not a pickle/zip checkpoint, or is not a dict.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{parameter}={str(file)!r} does not exist or is not a file")
    # `safe_globals` is the scoped form of `torch.serialization.add_safe_globals`: the stubs are
    # allowed for this load only, so nothing global changes.
    allowed = [(CheckpointStub, name) for name in STUB_GLOBALS]
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(file)
        if unsafe:
            raise ValueError(
                f"{parameter}={str(file)!r} was refused: it needs the Python globals {unsafe}, "
                f"which a safe (weights_only) load does not allow because unpickling them could "
                f"run code; nothing in it was executed. Accepted are tensors, containers and "
                f"these stubbed globals: {STUB_GLOBALS}. Details: {_first_line(error)}"
            ) from error
        raise _unreadable(parameter, file, error) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise _unreadable(parameter, file, error) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{parameter}={str(file)!r} holds a {type(checkpoint).__name__}, expected a dict "
            f"with a state_dict"
        )
    return checkpoint


def _unsafe_globals(file: Path) -> list[str]:
    """Globals the pickle references beyond torch's and our allowlist (static scan, no code
    runs: torch reads the opcodes with pickletools)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    # What torch's opcode scan raises on a non-zip, truncated or garbled file (ValueError,
    # the zip reader's RuntimeError, short reads); it only names globals for the message,
    # and the refusal stands without them.
    except (
        ValueError,
        RuntimeError,
        OSError,
        EOFError,
        IndexError,
        struct.error,
        pickle.UnpicklingError,
    ):
        return []
    return [name for name in found if name not in STUB_GLOBALS]


def _unreadable(parameter: str, file: Path, error: BaseException) -> ValueError:
    return ValueError(
        f"{parameter}={str(file)!r} is not a readable PyTorch checkpoint (truncated, another "
        f"format, or pickle opcodes that a safe load refuses): {_first_line(error)}"
    )


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    unsupported = [line for line in lines if "unsupported" in line.lower()]
    return (unsupported or lines or [type(error).__name__])[0][:300]


def select_prefix(
    state_dict: Mapping[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor] | None:
    """The entries under `prefix` with it removed, or None when no key has it."""
    if not any(key.startswith(prefix) for key in state_dict):
        return None
    return {
        key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
    }


def read_safetensors_folder(folder: str | os.PathLike, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors whose key starts with `prefix` from every `*.safetensors` file in `folder`
    (one file or HF shards), reading only those keys."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"SRC={str(folder)!r} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if key.startswith(prefix):
                    tensors[key] = handle.get_tensor(key)
    return tensors


def rename_keys(
    state_dict: Mapping[str, torch.Tensor],
    map_key: Callable[[str], str | None],
    source: str,
    drop: Callable[[str], bool] = lambda key: False,
) -> dict[str, tuple[str, torch.Tensor]]:
    """Apply `map_key` to every key not dropped: {our key: (source key, tensor)}.

    Raises:
        ValueError: naming every source key that no rule maps (nothing is silently ignored),
            or two source keys that map to the same target.
    """
    renamed: dict[str, tuple[str, torch.Tensor]] = {}
    unmapped = []
    for key, value in state_dict.items():
        if drop(key):
            continue
        target = map_key(key)
        if target is None:
            unmapped.append(key)
        elif target in renamed:
            raise ValueError(
                f"{source}: keys {renamed[target][0]!r} and {key!r} both map to {target!r}"
            )
        else:
            renamed[target] = (key, value)
    if unmapped:
        raise ValueError(
            f"{source}: {len(unmapped)} key(s) have no counterpart in our VQGAN: "
            f"{_preview(sorted(unmapped))}. The checkpoint is not of the expected architecture."
        )
    return renamed


def load_renamed(
    config: VQGANConfig, renamed: Mapping[str, tuple[str, torch.Tensor]], source: str
) -> VQGAN:
    """Build `VQGAN(config)` and load `renamed` strictly (every key, every shape); eval mode.

    A 2-D linear weight (diffusers attention) is accepted for a 1x1 conv of the same size.

    Raises:
        ValueError: naming missing keys, unexpected source keys, or shape mismatches.
    """
    model = VQGAN(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(
        source_key for key, (source_key, _) in renamed.items() if key not in expected
    )
    if missing or unexpected:
        raise ValueError(
            f"{source}: the converted weights do not match VQGAN({config}): missing keys "
            f"{_preview(missing)}; unexpected source keys {_preview(unexpected)}"
        )
    tensors = {}
    for key, (source_key, value) in renamed.items():
        target_shape = expected[key].shape
        if value.ndim == 2 and len(target_shape) == 4 and target_shape[2:] == (1, 1):
            value = value[:, :, None, None]  # (out, in) -> (out, in, 1, 1)
        if value.shape != target_shape:
            raise ValueError(
                f"{source}: source key {source_key!r} has shape {tuple(value.shape)} but our "
                f"{key!r} needs {tuple(target_shape)}; the config does not match the weights"
            )
        tensors[key] = value.to(expected[key].dtype)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def _preview(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(key) for key in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]" if keys else "[]"


def required(values: Mapping[str, Any], field: str, source: str, parent: str = "") -> Any:
    """`values[field]`, or a ValueError naming the source file and the missing key (as
    `parent.field` when `values` is nested under `parent`)."""
    if field not in values:
        name = f"{parent}.{field}" if parent else field
        raise ValueError(
            f"{source}: required key {name!r} is missing (present: {sorted(values)[:20]}); "
            "the file is truncated or not of the expected model"
        )
    return values[field]


def check_supported(source: str, field: str, value: object, allowed: object, why: str) -> None:
    """ValueError naming the source field and value unless `value == allowed`."""
    if value != allowed:
        raise ValueError(f"{source}: {field}={value!r} is not supported (only {allowed!r}): {why}")
