#!/usr/bin/env bash
# Scale the mochi_lab GPU worker pool to N worker actors (one per GPU).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/scripts/scale-workers.sh [options] N

Scales the mochi_lab pool to N worker actors, one per GPU:
  1. the RayCluster's gpu-workers group gets ceil(N / GPUs per pod) pods, kept warm
     (replicas = minReplicas = pods; maxReplicas is raised if needed, never lowered);
  2. the ConfigMap mochi-lab-config gets MOCHI_LAB_WORKERS=N (the pool size a restarted
     gateway re-attaches with);
  3. unless --no-pool, the pool's owner, the gateway, resizes the running pool with the model
     it is configured with: POST /services/mochi-lab/workers/scale {"n": N}, as a JupyterHub
     admin (a hub admin or a member of the group mochi-lab-admins). By default the request goes
     from inside a gateway pod (kubectl exec) to its own port; with --url, from here.
N=0 lets the autoscaler remove every GPU pod.

The admin's JupyterHub token comes from $MOCHI_LAB_ADMIN_TOKEN or --token-file; it is passed
on stdin or in a private temporary file, never on a command line.

Options:
  -n, --namespace NS      namespace (default: mochi-lab)
  -c, --context NAME      kubectl context (default: the current one)
      --cluster NAME      RayCluster name (default: mochi-ray)
      --group NAME        worker group (default: gpu-workers)
      --gpus-per-pod K    do not read it from the RayCluster (needed with --dry-run)
      --token-file FILE   the admin's JupyterHub token (default: $MOCHI_LAB_ADMIN_TOKEN)
      --url URL           call the gateway at URL (e.g. https://hub.example.org/services/mochi-lab/)
                          with curl instead of through kubectl exec
      --no-pool           change the pods and the ConfigMap only
      --dry-run           print the patches and the request instead of making them
  -h, --help              this text
EOF
}

namespace=mochi-lab
context=""
cluster=mochi-ray
group=gpu-workers
gpus_per_pod=""
resize_pool=1
dry_run=0
workers=""
token_file=""
url=""
GATEWAY=mochi-lab-gateway
SCALE_PATH=/services/mochi-lab/workers/scale

die() { echo "scale-workers: $*" >&2; exit 1; }
need_value() { [[ $1 -ge 2 ]] || { usage >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--namespace) need_value $#; namespace="$2"; shift 2 ;;
    -c|--context) need_value $#; context="$2"; shift 2 ;;
    --cluster) need_value $#; cluster="$2"; shift 2 ;;
    --group) need_value $#; group="$2"; shift 2 ;;
    --gpus-per-pod) need_value $#; gpus_per_pod="$2"; shift 2 ;;
    --token-file) need_value $#; token_file="$2"; shift 2 ;;
    --url) need_value $#; url="$2"; shift 2 ;;
    --no-pool) resize_pool=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "scale-workers: unknown option: $1" >&2; usage >&2; exit 2 ;;
    *) [[ -z "$workers" ]] || { usage >&2; exit 2; }; workers="$1"; shift ;;
  esac
done

[[ -n "$workers" ]] || { usage >&2; exit 2; }
[[ "$workers" =~ ^[0-9]+$ ]] || die "N must be a whole number, got '$workers'"

# The token is read before anything changes, so a missing one fails without a half-done scale.
token=""
if [[ $resize_pool -eq 1 && $dry_run -eq 0 ]]; then
  if [[ -n "$token_file" ]]; then
    [[ -r "$token_file" ]] || die "cannot read --token-file $token_file"
    token="$(tr -d '[:space:]' <"$token_file")"
  else
    token="${MOCHI_LAB_ADMIN_TOKEN:-}"
  fi
  [[ -n "$token" ]] || die "resizing the pool needs a JupyterHub admin token: set MOCHI_LAB_ADMIN_TOKEN or pass --token-file (or --no-pool)"
fi

kubectl_args=(-n "$namespace")
[[ -z "$context" ]] || kubectl_args+=(--context "$context")
kc() { kubectl "${kubectl_args[@]}" "$@"; }

# index of the worker group in spec.workerGroupSpecs, and its current maxReplicas
group_index=0
max_replicas=0
if [[ $dry_run -eq 0 ]]; then
  command -v kubectl >/dev/null || die "kubectl not found"
  groups="$(kc get raycluster "$cluster" -o jsonpath='{range .spec.workerGroupSpecs[*]}{.groupName}{" "}{.maxReplicas}{" "}{.rayStartParams.num-gpus}{"\n"}{end}')" \
    || die "cannot read RayCluster $cluster in namespace $namespace"
  found=0
  i=0
  while read -r name max gpus; do
    if [[ "$name" == "$group" ]]; then
      group_index=$i
      max_replicas=$max
      [[ -n "$gpus_per_pod" ]] || gpus_per_pod="$gpus"
      found=1
    fi
    i=$((i + 1))
  done <<<"$groups"
  [[ $found -eq 1 ]] || die "RayCluster $cluster has no worker group '$group'"
fi
[[ "$gpus_per_pod" =~ ^[1-9][0-9]*$ ]] || die "GPUs per pod unknown or not positive ('$gpus_per_pod'): pass --gpus-per-pod"

pods=$(( (workers + gpus_per_pod - 1) / gpus_per_pod ))
(( max_replicas >= pods )) || max_replicas=$pods

patch="$(cat <<EOF
[
  {"op": "test", "path": "/spec/workerGroupSpecs/$group_index/groupName", "value": "$group"},
  {"op": "replace", "path": "/spec/workerGroupSpecs/$group_index/maxReplicas", "value": $max_replicas},
  {"op": "replace", "path": "/spec/workerGroupSpecs/$group_index/minReplicas", "value": $pods},
  {"op": "replace", "path": "/spec/workerGroupSpecs/$group_index/replicas", "value": $pods}
]
EOF
)"
config_patch="{\"data\": {\"MOCHI_LAB_WORKERS\": \"$workers\"}}"
body="{\"n\": $workers}"
if [[ -n "$url" ]]; then
  target="${url%/}/workers/scale"
else
  target="deploy/$GATEWAY (kubectl exec) -> http://127.0.0.1:8000$SCALE_PATH"
fi

# Runs inside a gateway pod: POST to its own port, the token from stdin.
pool_py='import json, sys, urllib.error, urllib.request
token = sys.stdin.readline().strip()
req = urllib.request.Request("http://127.0.0.1:8000" + sys.argv[1], data=json.dumps({"n": int(sys.argv[2])}).encode(),
                             method="POST", headers={"Authorization": "token " + token, "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=900) as resp:
        print(resp.status, resp.read().decode())
except urllib.error.HTTPError as exc:
    sys.exit(f"{exc.code} {exc.read().decode()}")'

echo "scale-workers: $workers worker actors = $pods pod(s) x $gpus_per_pod GPU(s) in $cluster/$group"
if [[ $dry_run -eq 1 ]]; then
  echo "RayCluster JSON patch (dry run: the current maxReplicas is not read, so it is set to $max_replicas):"
  echo "$patch"
  echo "ConfigMap mochi-lab-config merge patch: $config_patch"
  [[ $resize_pool -eq 0 ]] || echo "pool: POST $target $body (JupyterHub admin token)"
  exit 0
fi

kc patch raycluster "$cluster" --type=json -p "$patch"
kc patch configmap mochi-lab-config --type=merge -p "$config_patch"

if [[ $resize_pool -eq 1 ]]; then
  # New GPU pods take minutes (image pull, model load): the pool waits for them on the Ray side.
  echo "scale-workers: pool: POST $target $body"
  if [[ -n "$url" ]]; then
    command -v curl >/dev/null || die "curl not found"
    header_file="$(mktemp)"
    trap 'rm -f "$header_file"' EXIT
    chmod 600 "$header_file"
    printf 'Authorization: token %s\n' "$token" >"$header_file"
    curl -fsS --max-time 900 -X POST -H @"$header_file" -H 'Content-Type: application/json' \
      --data "$body" "$target"
    echo
  else
    kc exec -i "deploy/$GATEWAY" -c gateway -- python -c "$pool_py" "$SCALE_PATH" "$workers" <<<"$token"
  fi
fi
echo "scale-workers: done; watch: kubectl -n $namespace get pods -l ray.io/group=$group -w"
