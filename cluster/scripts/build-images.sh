#!/usr/bin/env bash
# Build (and optionally push) the mochi_lab images with the names, tags and versions in
# cluster/images.env, so the images match the manifests and the z2jh values.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/scripts/build-images.sh [options] [ray|notebook|all]

Builds from the repository root (the build context) with the settings in cluster/images.env:
  ray       cluster/images/worker.Dockerfile   -> $MOCHI_RAY_IMAGE:$MOCHI_IMAGE_TAG
  notebook  cluster/images/notebook.Dockerfile -> $MOCHI_NOTEBOOK_IMAGE:$MOCHI_IMAGE_TAG
  all       both (default)

Options:
      --push            push after building
      --builder CMD     docker or podman (default: docker); needs BuildKit for the
                        per-Dockerfile .dockerignore files
      --dry-run         print the commands instead of running them
  -h, --help            this text

To release a new version change MOCHI_IMAGE_TAG in cluster/images.env, then update the tag
in cluster/k8s/base/kustomization.yaml and cluster/jupyterhub/values.yaml
(tests/cluster/test_invariants.py fails until all three agree).
EOF
}

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_DIR="$(cd "$CLUSTER_DIR/.." && pwd)"
# shellcheck source=SCRIPTDIR/../images.env
source "$CLUSTER_DIR/images.env"

push=0
builder=docker
dry_run=0
target=all
need_value() { [[ $1 -ge 2 ]] || { usage >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --push) push=1; shift ;;
    --builder) need_value $#; builder="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    ray|notebook|all) target="$1"; shift ;;
    *) echo "build-images: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}
if [[ $dry_run -eq 0 ]]; then
  command -v "$builder" >/dev/null || { echo "build-images: $builder not found" >&2; exit 1; }
fi
export DOCKER_BUILDKIT=1

build_ray() {
  local ref="$MOCHI_RAY_IMAGE:$MOCHI_IMAGE_TAG"
  run "$builder" build \
    -f "$CLUSTER_DIR/images/worker.Dockerfile" \
    --build-arg "CUDA_BASE_IMAGE=$CUDA_BASE_IMAGE" \
    --build-arg "UV_IMAGE=$UV_IMAGE" \
    --build-arg "PYTHON_VERSION=$PYTHON_VERSION" \
    --build-arg "RAY_VERSION=$RAY_VERSION" \
    -t "$ref" "$REPO_DIR"
  [[ $push -eq 0 ]] || run "$builder" push "$ref"
}

build_notebook() {
  local ref="$MOCHI_NOTEBOOK_IMAGE:$MOCHI_IMAGE_TAG"
  run "$builder" build \
    -f "$CLUSTER_DIR/images/notebook.Dockerfile" \
    --build-arg "NOTEBOOK_BASE_IMAGE=$NOTEBOOK_BASE_IMAGE" \
    --build-arg "PYTHON_VERSION=$PYTHON_VERSION" \
    -t "$ref" "$REPO_DIR"
  [[ $push -eq 0 ]] || run "$builder" push "$ref"
}

case "$target" in
  ray) build_ray ;;
  notebook) build_notebook ;;
  all) build_ray; build_notebook ;;
esac
