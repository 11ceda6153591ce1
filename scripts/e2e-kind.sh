#!/usr/bin/env bash
# End-to-end tests on a throwaway kind cluster.
#
#   scripts/e2e-kind.sh          # up, run the e2e tests, down (the cluster is always deleted)
#   scripts/e2e-kind.sh up       # create the cluster, build both images and load them into it
#   scripts/e2e-kind.sh down     # delete the cluster
#
# Needs docker (a running engine) and kind on PATH. Environment:
#   E2E_CLUSTER (default moe-e2e)  kind cluster name
#   E2E_KUBECONFIG                 where `up` writes the cluster's kubeconfig (default: $TMPDIR/E2E_CLUSTER.kubeconfig)
#   KIND_NODE_IMAGE                node image (default: the one pinned by your kind release)
#   E2E_KEEP_CLUSTER=1             keep the cluster after `all` for debugging
set -euo pipefail

cd "$(dirname "$0")/.."
CLUSTER="${E2E_CLUSTER:-moe-e2e}"
KUBECONFIG_FILE="${E2E_KUBECONFIG:-${TMPDIR:-/tmp}/${CLUSTER}.kubeconfig}"
NODE_IMAGE="${KIND_NODE_IMAGE:-}"
VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/moe-router-operator/Chart.yaml)"
OPERATOR_IMAGE="ghcr.io/moe-router-operator/operator:${VERSION}"
RUNTIME_IMAGE="ghcr.io/moe-router-operator/router-runtime:${VERSION}"
PYTHON="${PYTHON:-.venv/bin/python}"

log() { printf '[e2e] %s\n' "$*" >&2; }

require() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { log "missing: $tool (see docs/install.md#end-to-end-tests)"; exit 2; }
  done
  docker info >/dev/null 2>&1 || { log "docker is installed but no engine answers (docker info failed)"; exit 2; }
}

up() {
  require docker kind
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "reusing kind cluster $CLUSTER"
  else
    log "creating kind cluster $CLUSTER ${NODE_IMAGE:+($NODE_IMAGE)}"
    kind create cluster --name "$CLUSTER" ${NODE_IMAGE:+--image "$NODE_IMAGE"} --wait 120s
  fi
  kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
  log "building $OPERATOR_IMAGE and $RUNTIME_IMAGE"
  docker build --target operator -t "$OPERATOR_IMAGE" .
  docker build --target runtime -t "$RUNTIME_IMAGE" .
  log "loading the images into $CLUSTER"
  kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$RUNTIME_IMAGE"
  log "kubeconfig: $KUBECONFIG_FILE"
}

down() {
  command -v kind >/dev/null || return 0
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "deleting kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER"
  fi
  rm -f "$KUBECONFIG_FILE"
}

all() {
  up
  if [[ "${E2E_KEEP_CLUSTER:-0}" != 1 ]]; then
    trap down EXIT
  fi
  E2E_KUBECONFIG="$KUBECONFIG_FILE" "$PYTHON" -m pytest -q -m e2e tests/e2e
}

case "${1:-all}" in
  up) up ;;
  down) down ;;
  all) all ;;
  *) log "usage: $0 [up|down|all]"; exit 64 ;;
esac
