# Fresh clone -> working tree: `make demo`, `make test`. Everything is installed into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint typecheck unit demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU build; asking for any other torch pulls GBs of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	# DeepSpeed, for tests and bench only (they convert real ZeRO checkpoints; unickpt never
	# imports it). It ships as an sdist whose setup.py imports torch: build it against the torch
	# above (no build isolation), with no C++/CUDA ops (DS_BUILD_OPS=0), and pin torch so the
	# resolver cannot swap it.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8 torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check src tests bench examples

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q

test: lint typecheck unit

demo: install
	$(BIN)/python examples/train_gpt.py

bench: install
	$(BIN)/python bench/save_load.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info
