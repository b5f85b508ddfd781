# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Each builds .venv on first use and installs what it needs, torch included.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision releases that this machine kind serves from local disk; override on other machines,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.unikd-installed

.PHONY: demo test lint format bench-losses clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/ensure_fashion_mnist.sh
	$(BIN)/python -m unikd.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-losses: $(STAMP)
	$(BIN)/python benchmarks/loss_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
