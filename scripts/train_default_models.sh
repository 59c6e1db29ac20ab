#!/usr/bin/env bash
# Train every shipped model from its committed config in configs/, all at once (one GPU holds them
# all; on a CPU-only machine set SEQUENTIAL=1). Logs go to $LOG_DIR (default runs/logs).
#   scripts/train_default_models.sh [MAX_MINUTES] [extra genserve-train flags...]
# Checkpoints land in each config's "out" (checkpoints/NAME) unless OUT_ROOT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MINUTES=${1:-}
shift || true
LOG_DIR=${LOG_DIR:-runs/logs}
mkdir -p "$LOG_DIR"
declare -A pids
for cfg in ${CONFIGS:-configs/*.json}; do
  name=$(basename "$cfg" .json)
  args=(--config "$cfg" --no-progress "$@")
  if [ -n "$MINUTES" ]; then args+=(--max-minutes "$MINUTES"); fi
  if [ -n "${OUT_ROOT:-}" ]; then args+=(--out "$OUT_ROOT/$name"); fi
  echo "train $name: $PY -m models.tools.cli train ${args[*]}"
  if [ -n "${SEQUENTIAL:-}" ]; then
    "$PY" -m models.tools.cli train "${args[@]}" >"$LOG_DIR/$name.log" 2>&1
    echo "$name exited $?"
  else
    "$PY" -m models.tools.cli train "${args[@]}" >"$LOG_DIR/$name.log" 2>&1 &
    pids[$name]=$!
  fi
done
rc=0
for name in "${!pids[@]}"; do
  if wait "${pids[$name]}"; then echo "$name: ok"; else echo "$name: FAILED (see $LOG_DIR/$name.log)"; rc=1; fi
done
exit $rc
