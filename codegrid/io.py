"""Atomic model folders: `config.json` + `model.safetensors`, written so that a crash never
leaves a folder that a loader would accept.

A folder is written into `<dir>.tmp-<pid>/`, every file is fsynced, and the temporary folder is
renamed over the target. A rename within one filesystem is atomic on POSIX, so readers see
either the old folder or the new one, never half of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

T = TypeVar("T")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (the latter makes a rename inside it durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `directory` atomically.

    On any exception the temporary folder is removed and the previous `directory`, if any,
    is left untouched. Before the body runs, a `.old-<pid>` of this pid that a dead process
    left mid-swap is settled (`_recover_parked`). Two live writers of one folder are not
    supported: they would share the `.tmp-<pid>` name only if their pids matched, and the last
    swap wins.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_parked(target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _recover_parked(target: Path) -> None:
    """Settle a `.old-<pid>` of this pid left by a process that died mid-swap (pids repeat in
    containers): without `target` it is the last good copy and moves back; beside one it is
    stale and goes. Otherwise the next swap could not park `target` there."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename `tmp` over `target`; if that rename fails, the previous `target` is put back."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    parked = target.exists()
    if parked:
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        # Without this the previous folder would stay parked under `.old-<pid>`, where no
        # loader looks, and a failed write would have lost it.
        if parked and not target.exists():
            os.replace(old, target)
        raise
    fsync_path(target.parent)
    if parked:
        shutil.rmtree(old)


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over (key, dtype, shape, bytes) of every state_dict tensor in sorted key order:
    the weights part of an image tokenizer's identity (codes_meta.json)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        raw = tensor.reshape(-1).view(torch.uint8)  # (N,) -> (N * itemsize,) bytes
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def sha256_of_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _tuple_fields(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {
        field.name
        for field in dataclasses.fields(cls)
        if typing.get_origin(hints[field.name]) is tuple or hints[field.name] is tuple
    }


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path` (which must exist).

    Raises:
        ValueError: naming the file when it is not valid JSON or not an object.
    """
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore or re-save it") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, expected an object")
    return values


def check_field_names(cls: type, names: Any, source: str) -> None:
    """ValueError naming each of `names` that is no init field of dataclass `cls`, and the
    fields that are (for overrides and updates passed as keyword arguments)."""
    allowed = sorted(field.name for field in dataclasses.fields(cls) if field.init)
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ValueError(
            f"{source}: unknown {cls.__name__} field(s) {unknown}; allowed fields are {allowed}"
        )


def config_from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build dataclass `cls` from a dict, rejecting unknown and missing fields by name.

    Lists become tuples for tuple-typed fields, so a config survives a JSON round trip.
    Keys starting with an underscore (such as `_class_name`) are metadata and ignored.
    """
    fields = [field for field in dataclasses.fields(cls) if field.init]
    values = {key: value for key, value in values.items() if not key.startswith("_")}
    check_field_names(cls, values, source)
    no_default = dataclasses.MISSING
    required = {
        f.name for f in fields if f.default is no_default and f.default_factory is no_default
    }
    missing = sorted(required - set(values))
    if missing:
        raise ValueError(
            f"{source}: required {cls.__name__} field(s) {missing} are missing; add them "
            f"(fields without a default: {sorted(required)})"
        )
    tuples = _tuple_fields(cls)
    values = {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def save_model_folder(
    directory: str | os.PathLike,
    config: Any,
    state_dict: dict[str, torch.Tensor],
    class_name: str,
) -> Path:
    """Write `config.json` (the dataclass plus `_class_name`) and `model.safetensors` atomically."""
    tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"refusing to save non-finite weights: tensor {key!r} has NaN or Inf")
    with atomic_directory(directory) as tmp:
        payload = {"_class_name": class_name, **dataclasses.asdict(config)}
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        # Imported here, not at module level: `scripts/bench.py gpu` runs the models from the
        # source tree on machines that have only torch, and never saves or loads a folder.
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(directory)


def load_model_folder(
    directory: str | os.PathLike, config_cls: type[T]
) -> tuple[T, dict[str, torch.Tensor]]:
    """Read a folder written by `save_model_folder`.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        ValueError: the config has unknown fields or the weights file is corrupt.
    """
    folder = Path(directory)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a model folder needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                f"(write one with save_pretrained)"
            )
    values = read_json_object(config_path)
    config = config_from_dict(config_cls, values, source=str(config_path))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} is corrupt or truncated ({error})") from error
    return config, state_dict


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str
) -> None:
    """Load with every key and shape checked.

    Raises:
        ValueError: naming the missing and unexpected keys, or each tensor whose shape differs
            from the module's (with both shapes), and `source`.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: state_dict does not match {type(module).__name__}: "
            f"missing keys {_first_ten(missing)}, unexpected keys {_first_ten(unexpected)}"
        )
    mismatched = [
        f"{key!r} has {tuple(value.shape)}, needs {tuple(expected[key].shape)}"
        for key, value in sorted(state_dict.items())
        if value.shape != expected[key].shape
    ]
    if mismatched:
        raise ValueError(
            f"{source}: tensor shapes do not match {type(module).__name__}: "
            f"{'; '.join(mismatched[:10])}{'; ...' if len(mismatched) > 10 else ''} "
            f"(the config does not describe these weights)"
        )
    module.load_state_dict(state_dict, strict=True)


def _first_ten(items: list[str]) -> str:
    return f"{items[:10]}{'...' if len(items) > 10 else ''}"
