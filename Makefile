# genserve: `make serve` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH_PIN ?= torch==2.13.0

.PHONY: setup serve test lint typecheck clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first where the machine has it; otherwise pip resolves torch>=2.4 itself.
	$(PY) -m pip install -q "$(TORCH_PIN)" || echo "note: $(TORCH_PIN) not available; using pip's choice of torch"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/genserve serve --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m ruff check models service tests bench
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check models service tests bench
	$(PY) -m ruff format --check models service tests bench

typecheck: setup
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
