#!/usr/bin/env bash
# Forward JupyterHub and the Ray dashboard (and optionally the Ray Client port) to this machine.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/scripts/port-forward.sh [options]

Forwards, until Ctrl-C or until one forward dies:
  JupyterHub      svc/proxy-public:80          -> http://ADDRESS:HUB_PORT
                  (the gateway too: http://ADDRESS:HUB_PORT/services/mochi-lab/)
  Ray dashboard   svc/mochi-ray-head-svc:8265  -> http://ADDRESS:DASHBOARD_PORT
  Ray Client      svc/mochi-ray-head-svc:10001 -> ray://ADDRESS:CLIENT_PORT (with --client)
Port-forwards go through the kubelet, so the NetworkPolicies (which keep everything but the
gateway away from the dashboard) do not apply to them. Ray asks for its token: the dashboard
in the browser once, Ray Client through RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, both from
  kubectl -n mochi-lab get secret mochi-ray-auth -o jsonpath='{.data.auth_token}' | base64 -d

Options:
  -n, --namespace NS        namespace (default: mochi-lab)
  -c, --context NAME        kubectl context (default: the current one)
      --address ADDR        local address to listen on (default: 127.0.0.1)
      --hub-port PORT       (default: 8000)
      --dashboard-port PORT (default: 8265)
      --client              also forward the Ray Client port, for a notebook on this machine:
                            RAY_ADDRESS=ray://127.0.0.1:10001 (same Ray and Python versions)
      --client-port PORT    (default: 10001)
  -h, --help                this text
EOF
}

namespace=mochi-lab
context=""
address=127.0.0.1
hub_port=8000
dashboard_port=8265
client=0
client_port=10001

need_value() { [[ $1 -ge 2 ]] || { usage >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--namespace) need_value $#; namespace="$2"; shift 2 ;;
    -c|--context) need_value $#; context="$2"; shift 2 ;;
    --address) need_value $#; address="$2"; shift 2 ;;
    --hub-port) need_value $#; hub_port="$2"; shift 2 ;;
    --dashboard-port) need_value $#; dashboard_port="$2"; shift 2 ;;
    --client) client=1; shift ;;
    --client-port) need_value $#; client_port="$2"; client=1; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "port-forward: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
for p in "$hub_port" "$dashboard_port" "$client_port"; do
  if ! [[ "$p" =~ ^[0-9]+$ ]] || (( p < 1 || p > 65535 )); then
    echo "port-forward: bad port '$p'" >&2
    exit 2
  fi
done
command -v kubectl >/dev/null || { echo "port-forward: kubectl not found" >&2; exit 1; }

kubectl_args=(-n "$namespace")
[[ -z "$context" ]] || kubectl_args+=(--context "$context")

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forward() {  # forward SERVICE LOCAL_PORT REMOTE_PORT
  kubectl "${kubectl_args[@]}" port-forward --address "$address" "svc/$1" "$2:$3" &
  pids+=("$!")
}

forward proxy-public "$hub_port" 80
forward mochi-ray-head-svc "$dashboard_port" 8265
[[ $client -eq 0 ]] || forward mochi-ray-head-svc "$client_port" 10001

echo "JupyterHub:    http://$address:$hub_port"
echo "Ray dashboard: http://$address:$dashboard_port"
[[ $client -eq 0 ]] || echo "Ray Client:    RAY_ADDRESS=ray://$address:$client_port"
echo "Ctrl-C stops all forwards."

# return as soon as one forward exits (pod restarted, service missing...); the trap stops the rest
while :; do
  for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      status=0
      wait "$pid" || status=$?
      echo "port-forward: a forward stopped (exit $status)" >&2
      exit "$status"
    fi
  done
  sleep 1
done
