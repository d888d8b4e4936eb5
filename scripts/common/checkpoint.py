"""Atomic training checkpoints with verified, falling-back resume.

Layout under `OUTPUT/checkpoints/`:

    step-00000040/            one complete checkpoint (the name is its optimizer step)
        model.safetensors ... accelerate's `save_state` files (models, optimizers, GradScaler,
                              per-rank RNG states; the latter are pickles: local, trusted files
                              of this run, never loaded from a path given as a model source)
        trainer_state.json    step, total steps, counters, GAN phase (JSON, no pickle)
        extra_state.safetensors  EMA weights and other tensors of the job (safetensors)
        manifest.json         size and sha256 of every file above, written last
    ckpt.tmp/                 a checkpoint being written (deleted on the next start)

A checkpoint is written into `ckpt.tmp/`, every file and the folder are fsynced, the manifest
is written, and the folder is renamed to its final name: the rename is the commit point. On
resume the newest checkpoint whose files all match its manifest is loaded; a truncated or
corrupt one is reported by file name and the previous one is used instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from codegrid.io import fsync_path
from common.faults import kill_point

CHECKPOINTS = "checkpoints"
TMP_NAME = "ckpt.tmp"
MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
EXTRA_FILE = "extra_state.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


class CorruptCheckpointError(ValueError):
    """A checkpoint folder whose files do not match its manifest (the message names the file)."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, read-only, ...); earlier checkpoints are intact."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Committed checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and _NAME.match(path.name)]
    return sorted(found, key=lambda path: int(_NAME.match(path.name).group(1)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it; the `mid-file` fault kills halfway through."""
    with open(path, "wb") as handle:
        half = len(data) // 2
        handle.write(data[:half])
        handle.flush()
        kill_point("mid-file")
        handle.write(data[half:])
        handle.flush()
        os.fsync(handle.fileno())


def verify_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the manifest; returns the parsed `trainer_state.json`.

    Raises:
        CorruptCheckpointError: naming the missing, truncated or altered file.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(
            f"{manifest_path} is missing or unreadable ({error})"
        ) from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is missing from checkpoint {folder}")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CorruptCheckpointError(
                f"{path} is truncated or altered: {size} bytes, manifest says {expected['size']}"
            )
        if _sha256(path) != expected["sha256"]:
            raise CorruptCheckpointError(f"{path} is corrupt: its sha256 does not match {MANIFEST}")
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(f"{folder / STATE_FILE} is unreadable ({error})") from None


def _write_extras(tmp: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    write_file(tmp / STATE_FILE, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
    cpu = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    write_file(tmp / EXTRA_FILE, save(cpu, metadata={"format": "pt"}))


def _commit(tmp: Path, final: Path) -> None:
    """fsync everything, write the manifest, rename `tmp` to `final` (the commit point)."""
    kill_point("after-temp-write")
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_path(path)
        files[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    write_file(tmp / MANIFEST, json.dumps({"files": files}, indent=2).encode())
    fsync_path(tmp)
    kill_point("before-rename")
    stale = final.with_name(final.name + ".old")
    if final.exists():  # a corrupt checkpoint of the same step that resume skipped
        os.replace(final, stale)
    os.replace(tmp, final)
    fsync_path(final.parent)
    kill_point("after-rename")
    shutil.rmtree(stale, ignore_errors=True)


def _prune(root: Path, keep_last: int, protect: Path | None) -> None:
    committed = list_checkpoints(root)
    for folder in committed[: max(0, len(committed) - keep_last)]:
        if protect is None or folder.resolve() != protect.resolve():
            shutil.rmtree(folder, ignore_errors=True)


def _all_ok(accelerator: Accelerator, ok: bool) -> bool:
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def save_checkpoint(
    accelerator: Accelerator,
    root: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically on every rank; keeps the newest `keep_last`.

    Every rank must call. `state` is JSON-able, `tensors` go to safetensors (both written by
    the main process). Raises CheckpointWriteError (all ranks) if any write fails; the
    temporary folder is then removed and earlier checkpoints are untouched.
    """
    root = Path(root)
    tmp, final = root / TMP_NAME, root / checkpoint_name(step)
    error: OSError | None = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as caught:
            error = caught
    if _all_ok(accelerator, error is None):
        try:
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                _write_extras(tmp, state, tensors)
        except OSError as caught:
            error = caught
        except (SafetensorError, RuntimeError) as caught:  # safetensors/torch I/O failures
            error = OSError(errno.EIO, str(caught), str(tmp))
        if _all_ok(accelerator, error is None) and accelerator.is_main_process:
            try:
                _commit(tmp, final)
                _prune(root, keep_last, protect=final)
            except OSError as caught:
                error = caught
    if not _all_ok(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in list_checkpoints(root) if p != final]
        raise CheckpointWriteError(
            getattr(error, "errno", None) or errno.EIO,
            f"could not write checkpoint {final} ({_describe(error)}); the previous checkpoint "
            f"{previous[-1] if previous else '(none)'} is intact; free space or fix permissions "
            "on the output folder and resume with --resume",
        )
    return final


def _describe(error: OSError | None) -> str:
    if error is None:
        return "failed on another rank"
    where = f" on {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


def _pick(root: Path, logger: logging.Logger) -> tuple[str | None, dict | None]:
    """The newest checkpoint that verifies, warning about each one skipped."""
    candidates = list_checkpoints(root)
    for folder in reversed(candidates):
        try:
            return str(folder), verify_checkpoint(folder)
        except CorruptCheckpointError as error:
            logger.warning(
                f"skipping corrupt checkpoint: {error}; falling back to the previous one"
            )
    if candidates:
        raise CorruptCheckpointError(
            f"no checkpoint under {root} is complete ({[p.name for p in candidates]}); "
            "delete the folder to start again"
        )
    return None, None


def load_latest_checkpoint(
    accelerator: Accelerator, root: str | os.PathLike, logger: logging.Logger
) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    """Restore the newest complete checkpoint into the prepared objects of `accelerator`.

    Every rank must call. The main process verifies and chooses (so all ranks load the same
    one); returns (folder, trainer state, extra tensors), or None when there is none.
    """
    root = Path(root)
    choice: list[Any] = [None, None, None]  # folder, trainer state, error message
    if accelerator.is_main_process:
        if (root / TMP_NAME).exists():
            logger.warning(f"removing the unfinished checkpoint {root / TMP_NAME}")
            shutil.rmtree(root / TMP_NAME)
        try:
            choice[:2] = _pick(root, logger)
        except CorruptCheckpointError as error:
            choice[2] = str(error)  # raised on every rank below, so none waits forever
    choice = broadcast_object_list(choice) if accelerator.num_processes > 1 else choice
    folder, state, message = choice
    if message is not None:
        raise CorruptCheckpointError(message)
    if folder is None:
        return None
    accelerator.load_state(folder)
    try:
        tensors = load_file(str(Path(folder) / EXTRA_FILE))
    except (SafetensorError, OSError) as error:
        raise CorruptCheckpointError(
            f"{Path(folder) / EXTRA_FILE} is unreadable ({error})"
        ) from error
    return Path(folder), state, tensors
