#!/usr/bin/env bash
# Build the CPU image and prove it serves: run it on a loopback port, wait for /readyz, call /sample and
# /score (docker/smoke_client.py checks status codes and JSON fields), check the image's HEALTHCHECK
# and its non-root user, then stop and remove the container.
#   docker/smoke_test.sh                 (SKIP_BUILD=1 tests an existing IMAGE; SMOKE_PORT= picks the port)
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${CONTAINER_ENGINE:-podman}
IMAGE=${IMAGE:-localhost/genserve:cpu}
PORT=${SMOKE_PORT:-18000}
name=genserve-smoke-$$

engine=("$ENGINE")
# As locked down as the Kubernetes Deployment: read-only root file system, no capabilities.
run_args=(run -d --name "$name" -p "127.0.0.1:$PORT:8000" -e GENSERVE_TORCH_THREADS=2
          --read-only --cap-drop ALL --security-opt no-new-privileges)
if [ "$ENGINE" = podman ]; then
  # podman's --read-only mounts a tmpfs on /tmp itself. Without systemd it cannot time the image's
  # HEALTHCHECK (it logs "unable to get systemd connection", harmlessly): the check is run by hand below.
  engine+=(--runtime runc)
  run_args+=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
else
  run_args+=(--tmpfs /tmp)
fi

start=$SECONDS
if [ -z "${SKIP_BUILD:-}" ]; then IMAGE=$IMAGE docker/build.sh cpu; fi
build_s=$((SECONDS - start))
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")

cleanup() {
  rc=$?
  if [ "$rc" -ne 0 ]; then echo "smoke: container logs:"; "${engine[@]}" logs "$name" 2>&1 | tail -40 || true; fi
  "${engine[@]}" rm -f "$name" >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT

start=$SECONDS
"${engine[@]}" "${run_args[@]}" "$IMAGE" >/dev/null
echo "smoke: $IMAGE running as $name on 127.0.0.1:$PORT"
python3 docker/smoke_client.py "http://127.0.0.1:$PORT"

uid=$("${engine[@]}" exec "$name" id -u)
[ "$uid" != 0 ] || { echo "smoke: FAILED: the container runs as root"; exit 1; }
if [ "$ENGINE" = podman ]; then
  "${engine[@]}" healthcheck run "$name" || { echo "smoke: FAILED: the image's HEALTHCHECK"; exit 1; }
  echo "smoke: HEALTHCHECK (/readyz) healthy; uid $uid"
fi
"${engine[@]}" stop -t 10 "$name" >/dev/null
echo "smoke: passed: build ${build_s} s, image $(numfmt --to=iec "$size") ($size bytes), run and checks $((SECONDS - start)) s"
