#!/usr/bin/env bash
# Every GPU check in one run, for a lent device machine (its tool's README): the GPU tests, then the
# sampling and serving benchmarks on cuda:0 with the shipped models, and the OpenMP-pool bench on
# the host's CPU (docs/serving.md, "Several models on one CPU"). Results land in $OUT (8 files).
#
#   here:     make gpu-wheels                      # the web stack the device image lacks, into .whl/
#   device:   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# About 6 minutes on an H100/H200. Record the figures in docs/ with the card's name.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "install the wheels first: make gpu-wheels, and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD

{
  nvidia-smi -L
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/service/test_gpu.py tests/models/test_sampling.py \
    tests/models/test_pixelrnn.py tests/service/test_sampling.py
  echo "pytest exit: $?"
} 2>&1 | tee "$OUT/pytest.log"

timeout 150 python3 bench/sampling.py --device cuda --n 1 16 64 --naive-rows 2 --cuda-graphs --json \
  2>&1 | tee "$OUT/sampling-pixelcnn.json"
timeout 100 python3 bench/sampling.py --device cuda --model checkpoints/pixelrnn-fmnist --n 1 16 64 --naive-rows 2 --cuda-graphs \
  --json 2>&1 | tee "$OUT/sampling-pixelrnn.json"

# Does an idle OpenMP pool slow other threads on a many-core host too (service/compute.py)?
timeout 60 python3 bench/omp_pools.py --others 4 2>&1 | tee "$OUT/omp-pools.txt"

for model in vae-fmnist pixelcnn-fmnist; do
  timeout 90 python3 bench/throughput.py --model "$model" --device cuda:0 --seconds 5 --client httpx \
    2>&1 | tee "$OUT/throughput-$model.txt"
  timeout 150 python3 bench/settings_ab.py --model "$model" --device cuda:0 --seconds 4 --rounds 2 --client httpx \
    --config GENSERVE_MAX_BATCH_WAIT_MS=0 --config GENSERVE_MAX_BATCH_WAIT_MS=5 2>&1 | tee "$OUT/ab-wait-$model.txt"
done
