#!/usr/bin/env bash
# Build a genserve image from this checkout with podman (or CONTAINER_ENGINE=docker).
#   docker/build.sh [cpu|cuda]            -> localhost/genserve:cpu or localhost/genserve:cuda (IMAGE= overrides)
#   docker/build.sh wheels                only copy the CPU torch wheel into docker/wheels/
# Environment:
#   BASE_IMAGE   default localhost/bookworm-min, made by docker/base_image.sh when missing (no registry needed);
#                debian:bookworm-slim where a registry is reachable
#   TORCH_SPEC   default torch==2.13.0; TORCH_INDEX_URL where pip gets torch if docker/wheels/ has none
#   HOST_CA      CA bundle mounted read-only into the build for pip (default: Debian's, if present; "" for none)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-cpu}
ENGINE=${CONTAINER_ENGINE:-podman}
BASE_IMAGE=${BASE_IMAGE:-localhost/bookworm-min}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
HOST_CA=${HOST_CA-/etc/ssl/certs/ca-certificates.crt}

# The pinned CPU wheel for the image's Python (3.11), from pip's local wheel folders, into docker/wheels/.
copy_cpu_wheel() {
  local version=${TORCH_SPEC#torch==} dir wheel
  for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    for wheel in "$dir"/torch-"$version"+cpu-cp311-cp311-*x86_64.whl; do
      [ -f "$wheel" ] || continue
      find docker/wheels -maxdepth 1 -name 'torch-*.whl' ! -name "$(basename "$wheel")" -delete
      cp -u "$wheel" docker/wheels/
      echo "wheels: docker/wheels/$(basename "$wheel")"
      return 0
    done
  done
  echo "wheels: no local torch-$version+cpu wheel for Python 3.11; the build downloads torch"
}

case "$target" in
  wheels) copy_cpu_wheel; exit 0 ;;
  cpu) copy_cpu_wheel ;;
  cuda) ;;
  *) echo "usage: docker/build.sh [cpu|cuda|wheels]" >&2; exit 2 ;;
esac
IMAGE=${IMAGE:-localhost/genserve:$target}

if [ "$BASE_IMAGE" = localhost/bookworm-min ]; then docker/base_image.sh "$BASE_IMAGE"; fi

engine=("$ENGINE")
args=(build -f docker/Dockerfile --target "$target" -t "$IMAGE" --network host
      --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=$TORCH_SPEC")
if [ -n "${TORCH_INDEX_URL:-}" ]; then args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"); fi
if [ "$ENGINE" = podman ]; then
  # runc (what CI installs; crun is not there), the docker image format (OCI images drop HEALTHCHECK),
  # and ulimits the host's defaults may not allow.
  engine+=(--runtime runc)
  args+=(--format docker --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
  if [ -n "$HOST_CA" ] && [ -f "$HOST_CA" ]; then
    args+=(--volume "$HOST_CA:/etc/ssl/host-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/host-ca.crt)
  fi
fi
echo "build: ${engine[*]} ${args[*]} ."
start=$SECONDS
"${engine[@]}" "${args[@]}" .
echo "build: $IMAGE in $((SECONDS - start)) s, $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec) "
