#!/usr/bin/env bash
# Validate the Kubernetes manifests against the API schemas (kubernetes-validate, strict: unknown
# fields fail), then, where kubectl is installed, what each kustomization renders.
#   deploy/validate.sh [KUBERNETES_VALIDATE]      default: .venv/bin/kubernetes-validate
set -euo pipefail
cd "$(dirname "$0")/.."
validate=${1:-.venv/bin/kubernetes-validate}
K8S_VERSION=${K8S_VERSION:-}
args=(--strict --quiet)
if [ -n "$K8S_VERSION" ]; then args+=(--kubernetes-version "$K8S_VERSION"); fi

manifests=()
for f in deploy/kubernetes/gpu/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
"$validate" "${args[@]}" "${manifests[@]}"
echo "k8s: ${#manifests[@]} manifests valid: ${manifests[*]}"
# The PodMonitor is a Prometheus Operator resource, outside the Kubernetes schemas: it must at least parse.
"$validate" --quiet --no-warn deploy/monitoring/podmonitor.yaml

if command -v kubectl >/dev/null 2>&1; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  for k in gpu cpu; do
    kubectl kustomize "deploy/kubernetes/$k" >"$out/$k.yaml"
    "$validate" "${args[@]}" "$out/$k.yaml"
    echo "k8s: kustomization $k renders $(grep -c '^kind:' "$out/$k.yaml") valid resources"
  done
else
  echo "k8s: kubectl not installed; kustomizations not rendered"
fi
