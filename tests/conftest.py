"""Test-wide setup: offline, CPU, a temporary HF_HOME, and small thread counts."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Set before transformers/datasets/huggingface_hub are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="codegrid-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"
# Scripts are run as `python scripts/x.py`; tests that import them in-process need the same path.
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))


# Tiny test models run faster on one thread: with 2 intra-op threads on a loaded 2-core machine
# OpenMP spin-waiting made tiny convolutions 20-50x and tiny transformers 15x slower. Set at
# import for module-scoped fixtures, and again before every test in case one changed it.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def fresh_process_state(monkeypatch):
    """No fault injection, and accelerate's singletons and fault hit counts forgotten before and
    after the test (training jobs run in-process several times per module)."""
    from training_helpers import reset_process_state

    monkeypatch.delenv("CODEGRID_FAULT", raising=False)
    reset_process_state()
    yield
    reset_process_state()
