#!/usr/bin/env bash
# Deploy mochi_lab onto a Kubernetes cluster that already runs the KubeRay operator and has
# GPU nodes: namespace, the Secrets (Redis users' passwords, Ray token), the kustomize overlay
# (Redis, volumes, RBAC, NetworkPolicies, model prefetch Job, RayCluster, gateway) and
# JupyterHub (z2jh Helm chart), which registers the gateway as its service mochi-lab.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/scripts/deploy-all.sh [options]

Deploys mochi_lab into the namespace mochi-lab of the current kubectl context:
  1. checks kubectl, helm and the KubeRay CRD (rayclusters.ray.io)
  2. creates the namespace and, once, the Secrets mochi-redis (a random password per Redis
     user: gateway, worker, gcs, healthcheck) and mochi-ray-auth (the Ray token); a key that is
     missing is added, existing ones are never rotated
  3. applies cluster/k8s/overlays/<overlay> (Redis, PVCs, RBAC, NetworkPolicies, model
     prefetch Job, RayCluster mochi-ray, gateway) and waits for Redis and the Ray head
  4. installs/upgrades JupyterHub with cluster/jupyterhub/values.yaml (the chart creates the
     gateway's service token in its Secret hub) and waits for the gateway

Options:
  -o, --overlay NAME      dev or prod (default: dev)
  -c, --context NAME      kubectl/helm context (default: the current one)
      --chart-version V   pin the z2jh chart version (default: $JUPYTERHUB_CHART_VERSION,
                          else the newest chart; pin the one whose appVersion the values
                          were checked against, see cluster/README.md)
      --skip-jupyterhub   only the Ray/Redis side
      --no-wait           do not wait for Redis and the Ray head
      --dry-run           print the commands instead of running them
  -h, --help              this text
EOF
}

NAMESPACE=mochi-lab
SECRET=mochi-redis
SECRET_KEYS=(gateway-password worker-password gcs-password healthcheck-password)
RAY_AUTH_SECRET=mochi-ray-auth
RAYCLUSTER=mochi-ray
GATEWAY=mochi-lab-gateway
PREFETCH_JOB=mochi-model-prefetch
HELM_RELEASE=jupyterhub
HELM_REPO_URL=https://hub.jupyter.org/helm-chart/
CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

overlay=dev
context=""
chart_version="${JUPYTERHUB_CHART_VERSION:-}"
skip_hub=0
wait_ready=1
dry_run=0

die() { echo "deploy-all: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -o|--overlay) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; overlay="$2"; shift 2 ;;
    -c|--context) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; context="$2"; shift 2 ;;
    --chart-version) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; chart_version="$2"; shift 2 ;;
    --skip-jupyterhub) skip_hub=1; shift ;;
    --no-wait) wait_ready=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "deploy-all: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

overlay_dir="$CLUSTER_DIR/k8s/overlays/$overlay"
[[ -f "$overlay_dir/kustomization.yaml" ]] || die "no overlay '$overlay' under $CLUSTER_DIR/k8s/overlays"
values="$CLUSTER_DIR/jupyterhub/values.yaml"

kubectl_args=()
helm_args=()
if [[ -n "$context" ]]; then
  kubectl_args+=(--context "$context")
  helm_args+=(--kube-context "$context")
fi

# run CMD...: print it in --dry-run mode, run it otherwise
run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}
k() { run kubectl "${kubectl_args[@]}" "$@"; }
# queries always run (they change nothing); in --dry-run they may fail harmlessly
q() { kubectl "${kubectl_args[@]}" "$@"; }

if [[ $dry_run -eq 0 ]]; then
  command -v kubectl >/dev/null || die "kubectl not found"
  [[ $skip_hub -eq 1 ]] || command -v helm >/dev/null || die "helm not found (or use --skip-jupyterhub)"
  q get crd rayclusters.ray.io >/dev/null 2>&1 \
    || die "the KubeRay CRD rayclusters.ray.io is missing: install the KubeRay operator first (see cluster/README.md)"
fi

echo "== namespace $NAMESPACE"
k apply -f "$CLUSTER_DIR/k8s/base/namespace.yaml"

# hex: safe in redis:// URLs and in Redis' ACL lines
random_hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

# ensure_secret NAME KEY...: create the Secret with a random value per key, or add the keys it
# lacks. Values go to kubectl on stdin, never on a command line; existing values are kept.
ensure_secret() {
  local name="$1" key missing=() have
  shift
  if [[ $dry_run -eq 1 ]]; then
    echo "+ kubectl -n $NAMESPACE create secret generic $name (keys: $*; random values, hidden)"
    return 0
  fi
  if ! q -n "$NAMESPACE" get secret "$name" >/dev/null 2>&1; then
    for key in "$@"; do printf '%s=%s\n' "$key" "$(random_hex)"; done \
      | kubectl "${kubectl_args[@]}" -n "$NAMESPACE" create secret generic "$name" --from-env-file=/dev/stdin >/dev/null
    echo "created $name"
    return 0
  fi
  for key in "$@"; do
    have="$(q -n "$NAMESPACE" get secret "$name" -o "go-template={{index .data \"$key\"}}" 2>/dev/null || true)"
    [[ -n "$have" && "$have" != "<no value>" ]] || missing+=("$key")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    echo "$name exists, keeping its values"
    return 0
  fi
  {
    printf '{"stringData": {'
    local sep=""
    for key in "${missing[@]}"; do printf '%s"%s": "%s"' "$sep" "$key" "$(random_hex)"; sep=", "; done
    printf '}}\n'
  } | kubectl "${kubectl_args[@]}" -n "$NAMESPACE" patch secret "$name" --type merge --patch-file /dev/stdin >/dev/null
  echo "$name: added ${missing[*]}"
}

echo "== Secrets"
ensure_secret "$SECRET" "${SECRET_KEYS[@]}"
ensure_secret "$RAY_AUTH_SECRET" auth_token

echo "== model prefetch Job"
# A finished Job is deleted so that a new image tag never meets the immutable Job template;
# the new one finds the model cached and exits at once. A running download is left alone.
if [[ $dry_run -eq 0 ]]; then
  done_count="$(q -n "$NAMESPACE" get job "$PREFETCH_JOB" -o jsonpath='{.status.succeeded}{.status.failed}' 2>/dev/null || true)"
  if [[ -n "$done_count" ]]; then
    k -n "$NAMESPACE" delete job "$PREFETCH_JOB" --wait=true
  fi
fi

echo "== kustomize overlay $overlay"
k apply -k "$overlay_dir"

if [[ $wait_ready -eq 1 ]]; then
  echo "== waiting for Redis and the Ray head"
  k -n "$NAMESPACE" rollout status statefulset/mochi-redis --timeout=10m
  k -n "$NAMESPACE" wait "raycluster/$RAYCLUSTER" --for=jsonpath='{.status.state}'=ready --timeout=20m
fi

if [[ $skip_hub -eq 0 ]]; then
  echo "== JupyterHub (z2jh chart ${chart_version:-newest})"
  version_args=()
  [[ -z "$chart_version" ]] || version_args=(--version "$chart_version")
  run helm "${helm_args[@]}" repo add jupyterhub "$HELM_REPO_URL" --force-update
  run helm "${helm_args[@]}" upgrade --install "$HELM_RELEASE" jupyterhub/jupyterhub \
    --namespace "$NAMESPACE" "${version_args[@]}" --values "$values" \
    --timeout 15m --wait
  if [[ $wait_ready -eq 1 ]]; then
    echo "== waiting for the gateway (it starts once the chart has created its service token)"
    k -n "$NAMESPACE" rollout status "deployment/$GATEWAY" --timeout=15m
  fi
fi

cat <<EOF
== done
Model download: kubectl -n $NAMESPACE logs -f job/$PREFETCH_JOB
Ray:            kubectl -n $NAMESPACE get raycluster $RAYCLUSTER; kubectl -n $NAMESPACE get pods -l ray.io/cluster=$RAYCLUSTER
Open:           cluster/scripts/port-forward.sh   (JupyterHub http://127.0.0.1:8000, Ray dashboard http://127.0.0.1:8265)
Notebooks:      MochiCluster() talks to the gateway (MOCHI_LAB_GATEWAY); scale with cluster/scripts/scale-workers.sh N
EOF
