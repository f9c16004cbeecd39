#!/usr/bin/env bash
# Stop the local cluster that cluster/local/up.sh started: only its own processes (by the
# process groups and pid it recorded), never other Ray instances on the machine. Idempotent.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/local/down.sh [options]

Stops the gateway and JupyterHub (if up.sh --gateway started them), the Ray worker nodes, the
Ray head and Redis of the local cluster whose state is in STATE_DIR: SIGTERM to each recorded
process group, SIGKILL after the grace period.
Then any process still marked as this cluster's (MOCHI_LOCAL_CLUSTER=STATE_DIR in its
environment, set by up.sh: e.g. Ray worker processes, which live in process groups of their own).
Processes are only signalled if they belong to this cluster (that marker, their command line
naming STATE_DIR, or the recorded redis-server). Running it again does nothing.
Logs, the Redis append-only file and the videos stay unless --purge.

Options (same defaults as up.sh):
  --state-dir DIR     MOCHI_LOCAL_STATE_DIR   /tmp/mochi-local-RAY_PORT
  --ray-port PORT     MOCHI_LOCAL_RAY_PORT    6400 (only to find the default STATE_DIR)
  --grace SECONDS     MOCHI_LOCAL_STOP_GRACE  10
  --purge             also delete STATE_DIR
  -h, --help          this text
EOF
}

die() { echo "down.sh: $*" >&2; exit 1; }
need_value() { [[ $1 -ge 2 ]] || { usage >&2; exit 2; }; }

state_dir="${MOCHI_LOCAL_STATE_DIR:-}"
ray_port="${MOCHI_LOCAL_RAY_PORT:-6400}"
grace="${MOCHI_LOCAL_STOP_GRACE:-10}"
purge=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --state-dir) need_value $#; state_dir="$2"; shift 2 ;;
    --ray-port) need_value $#; ray_port="$2"; shift 2 ;;
    --grace) need_value $#; grace="$2"; shift 2 ;;
    --purge) purge=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "down.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds"
state_dir="${state_dir:-/tmp/mochi-local-$ray_port}"

if [[ ! -d "$state_dir" ]]; then
  echo "down.sh: nothing to stop ($state_dir does not exist)"
  exit 0
fi
state_dir="$(cd "$state_dir" && pwd)"
pids_dir="$state_dir/pids"

# members PGID: pids in process group PGID (empty when the group is gone)
members() { pgrep -g "$1" 2>/dev/null || true; }

marker="MOCHI_LOCAL_CLUSTER=$state_dir"

# is_ours PID: the process belongs to this cluster: up.sh started it with MOCHI_LOCAL_CLUSTER
# in its environment (inherited by every Ray process), or its command line names STATE_DIR
is_ours() {
  [[ "$1" != "$$" ]] || return 1
  if [[ -r "/proc/$1/environ" ]] && grep -qzxF -- "$marker" "/proc/$1/environ" 2>/dev/null; then
    return 0
  fi
  ps -ww -o args= -p "$1" 2>/dev/null | grep -qF -- "$state_dir"
}

# ours PGID: a member of the group is this cluster's; guards against a process group id
# recycled after a reboot or a long time
ours() {
  local pid
  for pid in $(members "$1"); do
    if is_ours "$pid"; then
      return 0
    fi
  done
  return 1
}

# marked: every live process carrying this cluster's marker (Linux /proc). Ray runs each worker
# process (the mochi_lab actors) in a process group of its own, so stopping the node groups
# does not reach them directly.
marked() {
  local f pid
  [[ -d /proc/self ]] || return 0
  for f in /proc/[0-9]*/environ; do
    pid="${f#/proc/}"
    pid="${pid%/environ}"
    [[ "$pid" != "$$" ]] || continue
    if grep -qzxF -- "$marker" "$f" 2>/dev/null; then
      echo "$pid"
    fi
  done
}

stop_group() {  # stop_group NAME PGID
  local name="$1" pgid="$2" waited=0
  if [[ -z "$(members "$pgid")" ]]; then
    echo "down.sh: $name already stopped"
    return 0
  fi
  if ! ours "$pgid"; then
    echo "down.sh: process group $pgid no longer belongs to $name of this cluster; not touching it" >&2
    return 0
  fi
  echo "down.sh: stopping $name (process group $pgid)"
  kill -TERM -- "-$pgid" 2>/dev/null || true
  while [[ -n "$(members "$pgid")" && $waited -lt $((grace * 10)) ]]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  if [[ -n "$(members "$pgid")" ]]; then
    echo "down.sh: $name still running after ${grace}s, sending SIGKILL"
    kill -KILL -- "-$pgid" 2>/dev/null || true
    waited=0
    while [[ -n "$(members "$pgid")" && $waited -lt 100 ]]; do
      sleep 0.1
      waited=$((waited + 1))
    done
  fi
  [[ -z "$(members "$pgid")" ]] || { echo "down.sh: could not stop $name (group $pgid)" >&2; return 1; }
}

failed=0
# the gateway and the hub first (clients of the cluster), then the workers (highest number
# first), then the head: the head outliving its workers avoids them spinning on a lost GCS
mapfile -t worker_files < <(find "$pids_dir" -maxdepth 1 -name 'worker-*.pgid' 2>/dev/null | sort -t- -k2 -n -r)
for f in "$pids_dir/gateway.pgid" "$pids_dir/hub.pgid" "${worker_files[@]}" "$pids_dir/head.pgid"; do
  [[ -f "$f" ]] || continue
  name="$(basename "$f" .pgid)"
  pgid="$(cat "$f")"
  if [[ "$pgid" =~ ^[0-9]+$ ]] && stop_group "$name" "$pgid"; then
    rm -f "$f"
  else
    failed=1
  fi
done

# what is left of the nodes: worker processes in their own process groups, orphans
mapfile -t stragglers < <(marked)
if [[ ${#stragglers[@]} -gt 0 ]]; then
  echo "down.sh: stopping ${#stragglers[@]} remaining process(es) of this cluster"
  kill -TERM "${stragglers[@]}" 2>/dev/null || true
  waited=0
  while [[ -n "$(marked)" && $waited -lt $((grace * 2)) ]]; do
    sleep 0.5
    waited=$((waited + 1))
  done
  mapfile -t stragglers < <(marked)
  if [[ ${#stragglers[@]} -gt 0 ]]; then
    kill -KILL "${stragglers[@]}" 2>/dev/null || true
    sleep 0.5
  fi
  if [[ -n "$(marked)" ]]; then
    echo "down.sh: could not stop: $(marked | tr '\n' ' ')" >&2
    failed=1
  fi
fi

redis_pidfile="$pids_dir/redis.pid"
if [[ -f "$redis_pidfile" ]]; then
  pid="$(cat "$redis_pidfile")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
      && ps -ww -o args= -p "$pid" | grep -q '^redis-server'; then
    echo "down.sh: stopping Redis (pid $pid)"
    kill -TERM "$pid"   # redis flushes the append-only file and exits on SIGTERM
    waited=0
    while kill -0 "$pid" 2>/dev/null && [[ $waited -lt $((grace * 10)) ]]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "down.sh: Redis still running after ${grace}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  else
    echo "down.sh: Redis already stopped"
  fi
  rm -f "$redis_pidfile"
fi

[[ $failed -eq 0 ]] || die "some processes could not be stopped; see above"
rm -f "$state_dir/env" "$state_dir/notebook.env" "$state_dir/admin_token"
if [[ $purge -eq 1 ]]; then
  rm -rf "$state_dir"
  echo "down.sh: stopped; removed $state_dir"
else
  echo "down.sh: stopped (logs and data kept in $state_dir)"
fi
