#!/bin/sh
# The image's Python environment, step by step (docker/Dockerfile runs each as its own cached layer):
#   install.sh torch [WHEELS]   into the venv: a torch-*.whl from WHEELS if there is one, else $TORCH_SPEC
#                               from $TORCH_INDEX_URL (PyPI when empty)
#   install.sh requirements     into the venv: pyproject.toml's other dependencies; then drop torch's C++
#                               headers and test binaries (~150 MB), which serving never uses
#   install.sh genserve         genserve itself into /opt/genserve (on PYTHONPATH), apart from the venv:
#                               editing the sources changes a small layer, never the 1 GB venv
# pip reads PIP_CERT (a CA bundle mounted into the build) when the build passes one.
set -eu
case "$1" in
  torch)
    wheel=$(find "${2:-/nonexistent}" -maxdepth 1 -name 'torch-*.whl' 2>/dev/null | sort | tail -n 1)
    if [ -n "$wheel" ]; then
      echo "torch: $wheel"
      pip install "$wheel"
    else
      echo "torch: $TORCH_SPEC from ${TORCH_INDEX_URL:-PyPI}"
      pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
    fi
    ;;
  requirements)
    python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      >/tmp/requirements.txt
    pip install -r /tmp/requirements.txt
    rm /tmp/requirements.txt
    site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -rf "$site/torch/include" "$site/torch/test"
    ;;
  genserve)
    pip install --no-deps --target /opt/genserve .
    rm -rf build
    PYTHONPATH=/opt/genserve python -c "import torch, service.app; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    ;;
  *)
    echo "usage: install.sh torch [WHEELS] | requirements | genserve" >&2
    exit 2
    ;;
esac
