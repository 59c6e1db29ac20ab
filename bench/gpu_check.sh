#!/usr/bin/env bash
# Every GPU check in one run, for a lent device machine (its tool's README): the GPU tests, the
# sampling benchmarks on cuda:0, the peer bench (genserve against LitServe, docs/serving.md "Against
# a peer") and the serving throughput on cuda:0, eager against torch.compile on cuda:0
# (bench/compile_check.py), and on the host's CPU the fast PixelCNN forward (docs/sampling.md) and the
# OpenMP-pool bench (docs/serving.md, "Several models on one CPU").
# Results land in $OUT, seven files (the device tool brings back at most eight).
#
#   here:     make gpu-wheels                      # the web stack the device image lacks, into .whl/
#                                                  # (and Debian's hey, a static load generator, into .whl/bin/)
#   device:   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# GPU_CHECK_STEPS (default: all) names the steps to run, e.g. "pytest peer serve-compile".
# With hey carried the HTTP benches use it: one Python httpx process cannot load a GPU server
# (docs/gpu.md, first run: both servers sat at 2 to 4% of the card, client-bound).
#
# Steps run in order of importance, each under its own cap and all under one deadline
# (GPU_CHECK_BUDGET_S, default 560 s), so a slow step cuts the last ones short, never the whole run.
# Record the figures in docs/ with the card's name.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
DEV=${GPU_CHECK_DEVICE:-cuda:0}
BUDGET=${GPU_CHECK_BUDGET_S:-560}
START=$(date +%s)
mkdir -p "$OUT"
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "install the wheels first: make gpu-wheels, and carry .whl"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${GPU_CHECK_PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-all}
CLIENT=httpx
if [ -x .whl/bin/hey ]; then export PATH=$PWD/.whl/bin:$PATH; fi
if command -v hey >/dev/null; then CLIENT=hey; fi

# step NAME CAP_S FILE CMD...: unless GPU_CHECK_STEPS leaves NAME out, run CMD under min(CAP_S, what
# is left of the budget), output appended to FILE.
step() {
  local name=$1 cap=$2 file=$3; shift 3
  case " $STEPS " in *" all "*|*" $name "*) ;; *) return ;; esac
  local left=$((BUDGET - ($(date +%s) - START)))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 10 ]; then echo "skipped (budget spent): $*" | tee -a "$OUT/$file"; return; fi
  echo "== $* (cap ${t}s)" | tee -a "$OUT/$file"
  timeout "$t" "$@" 2>&1 | tee -a "$OUT/$file"
  echo "== exit ${PIPESTATUS[0]} after $(($(date +%s) - START))s" | tee -a "$OUT/$file"
}

{ nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } 2>&1 \
  | tee "$OUT/pytest.log"
step pytest 150 pytest.log $PY -m pytest -q -p no:cacheprovider -rs tests/service/test_gpu.py tests/models/test_sampling.py \
  tests/models/test_pixelrnn.py tests/service/test_sampling.py
step sampling 90 sampling.json $PY bench/sampling.py --device "${DEV%%:*}" --n 1 16 64 --naive-rows 2 --cuda-graphs --json
# genserve against LitServe on the card, two models (the lent time does not fit all five).
step peer 150 peer.txt $PY bench/peer_bench.py --device "$DEV" --client "$CLIENT" --seconds 4 --rounds 1 \
  --models pixelcnn-fmnist vae-fmnist
# Four HTTP processes in front of one model server per model (GENSERVE_HTTP_PROCESSES=4, service/http_processes.py):
# the event loop's work spread over the host's cores, the passes still shared (on a 2-core CPU: docs/serving.md).
step peer-http 150 peer-http.txt env GENSERVE_HTTP_PROCESSES=4 $PY bench/peer_bench.py --device "$DEV" \
  --client "$CLIENT" --seconds 4 --rounds 1 --models pixelcnn-fmnist vae-fmnist
# The same with every model in a process of its own (GENSERVE_MODEL_PROCESS=true; the default, auto,
# gives one to the PixelRNN only): does taking the model's launches off the event loop's interpreter pay on a card?
step peer-process 150 peer-process.txt env GENSERVE_MODEL_PROCESS=true $PY bench/peer_bench.py --device "$DEV" \
  --client "$CLIENT" --seconds 4 --rounds 1 --models pixelcnn-fmnist vae-fmnist
# Thread workers with a 0.5 ms switch interval (GENSERVE_GIL_SWITCH_MS): the event loop and the model's
# launches hand the interpreter lock back and forth sooner (on a 2-core CPU: docs/serving.md).
step peer-switch 150 peer-switch.txt env GENSERVE_GIL_SWITCH_MS=0.5 $PY bench/peer_bench.py --device "$DEV" \
  --client "$CLIENT" --seconds 4 --rounds 1 --models pixelcnn-fmnist vae-fmnist
for model in pixelcnn-fmnist vae-fmnist; do
  step throughput 50 throughput.txt $PY bench/throughput.py --model "$model" --device "$DEV" --seconds 4 --client "$CLIENT"
done
# The server with GENSERVE_COMPILE=1 (the PixelCNN's likelihood through torch.compile; startup compiles
# every padded batch size), against the rows above.
step serve-compile 150 throughput.txt env GENSERVE_COMPILE=1 $PY bench/throughput.py --model pixelcnn-fmnist \
  --device "$DEV" --seconds 4 --client "$CLIENT"
step compile 100 compile.txt $PY bench/compile_check.py --device "$DEV" --batch 1 256 --seconds 3
step sampling 60 sampling.json $PY bench/sampling.py --device "${DEV%%:*}" --model checkpoints/pixelrnn-fmnist --n 1 16 64 \
  --naive-rows 2 --cuda-graphs --json
# The fast forward is a CPU path (models/fast.py): masked vs fast on the host's cores; then whether an
# idle OpenMP pool slows other threads on a many-core host (service/compute.py).
step host-cpu 50 host-cpu.txt $PY bench/fast_forward.py --batch 1 32 --seconds 8 --sample 16 --sample-rounds 1
step host-cpu 30 host-cpu.txt $PY bench/omp_pools.py --others 4
echo "gpu_check done in $(($(date +%s) - START))s"
