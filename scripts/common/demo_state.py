"""The demo's stage bookkeeping: OUT/demo_state.json records the finished stages and the settings
they were made with (scripts/demo.py reuses a stage only under the same settings)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

PRODUCTS = ("tokenizer", "codes", "prior", "scorer", "pipeline", "evaluation.json", "grid.png")


def load_state(out: Path, key: dict) -> dict:
    """OUT/demo_state.json, or a new state; ValueError if it was made with other settings."""
    path = out / "demo_state.json"
    if not path.is_file():
        return {"settings": key, "stages": {}}
    state = json.loads(path.read_text())
    if state.get("settings") != key:
        raise ValueError(
            f"{out} holds a demo made with other settings ({state.get('settings')}); pass --fresh "
            "to redo it or choose another --output-dir"
        )
    return state


def save_state(out: Path, state: dict) -> None:
    """Write the state atomically (a killed demo never leaves a half-written file)."""
    path = out / "demo_state.json"
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def clear_outputs(out: Path) -> None:
    """Remove what the demo wrote (only its own products, never other files in OUT)."""
    for name in (*PRODUCTS, "demo_state.json", "metrics.json", "grid_prompts.json"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
