# Two commands set everything up on a fresh machine (see README.md):
#   make demo   trains the tiny tokenizer and prior on Shapes and samples a grid
#   make test   runs the whole test suite, offline, on CPU
PYTHON ?= python3
STAMP := .make/installed

.PHONY: install demo test lint format bench

# torch and torchvision are pinned here only so that pip takes the builds on local disk;
# the package itself asks for floors (pyproject.toml).
$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e ".[dev,eval]"
	# taming-transformers is a test reference only; its declared dependencies pin an old Lightning.
	$(PYTHON) -m pip install -q --no-deps taming-transformers-rom1504
	mkdir -p .make && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) scripts/demo.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q

lint: $(STAMP)
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

format: $(STAMP)
	$(PYTHON) -m ruff format . && $(PYTHON) -m ruff check --fix .

bench: $(STAMP)
	$(PYTHON) scripts/bench.py all
