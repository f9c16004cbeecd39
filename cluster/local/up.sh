#!/usr/bin/env bash
# A whole mochi_lab cluster on one machine, on loopback only: Redis, a Ray head and N Ray
# worker processes (each its own Ray node, optionally with logical GPUs), and with --gateway a
# JupyterHub and the gateway registered as its service, like the Kubernetes deployment in
# miniature. Stop it with cluster/local/down.sh (same options).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/local/up.sh [options]

Starts, all on a loopback address:
  Redis          --bind REDIS_BIND --port REDIS_PORT, append-only file, password
  Ray head       ray start --head --port RAY_PORT (no CPUs/GPUs for tasks, like the k8s head)
  N Ray workers  ray start --address IP:RAY_PORT --num-gpus G --num-cpus C, one Ray node each
and writes STATE_DIR/env (source it), STATE_DIR/cluster.json, process ids and logs.
Python drivers connect with RAY_ADDRESS=IP:RAY_PORT and REDIS_URL from STATE_DIR/env.

With --gateway, the production topology on top of that:
  JupyterHub     the hub API on 127.0.0.1:PORT_BASE+11 (no proxy: clients call the gateway
                 directly), users `user` and `admin` (a hub admin), the roles of
                 cluster/jupyterhub/values.yaml (every user may use the service mochi-lab)
  gateway        mochi-lab gateway on 127.0.0.1:PORT_BASE+10, registered as the hub's service
                 mochi-lab; it owns the pool: MOCHI_LAB_MODEL, one actor per GPU
and writes STATE_DIR/notebook.env: what a notebook holds, MOCHI_LAB_GATEWAY and the JupyterHub
token of `user` (JUPYTERHUB_API_TOKEN), nothing else; STATE_DIR/admin_token: a token of `admin`.

Every option also reads an environment variable (shown) and has a default:
  --state-dir DIR        MOCHI_LOCAL_STATE_DIR        /tmp/mochi-local-RAY_PORT
  --ip ADDR              MOCHI_LOCAL_IP               127.0.0.2
                         the loopback address every Ray node advertises (see below)
  --ray-port PORT        MOCHI_LOCAL_RAY_PORT         6400 (never 6379: Redis' port)
  --port-base PORT       MOCHI_LOCAL_PORT_BASE        RAY_PORT+20000; Ray's other ports
                         (client server, dashboard, agents, worker processes) are taken
                         from PORT_BASE .. PORT_BASE+100*(N+2), so clusters do not collide
  --redis-port PORT      MOCHI_LOCAL_REDIS_PORT       6380
  --redis-bind ADDR      MOCHI_LOCAL_REDIS_BIND       127.0.0.1
  --redis-password PW    MOCHI_LOCAL_REDIS_PASSWORD   random hex
  --no-redis             MOCHI_LOCAL_REDIS=0          no Redis: mochi_lab falls back to SQLite
  --workers N            MOCHI_LOCAL_WORKERS          2
  --gpus-per-worker G    MOCHI_LOCAL_GPUS_PER_WORKER  auto: the machine's GPUs split evenly
                         (CUDA_VISIBLE_DEVICES pinned per node), 0 without nvidia-smi. More
                         GPUs than the machine has are logical: Ray schedules on them, CUDA
                         sees none (GPU placement testable on CPU)
  --cpus-per-worker C    MOCHI_LOCAL_CPUS_PER_WORKER  2
  --object-store-mb MB   MOCHI_LOCAL_OBJECT_STORE_MB  256 per node
  --data-dir DIR         MOCHI_LAB_DATA_DIR           STATE_DIR/data (videos, artifacts)
  --dashboard            MOCHI_LOCAL_DASHBOARD=1      also start the Ray dashboard (PORT_BASE+1)
  --no-auth              MOCHI_LOCAL_AUTH=0           no Ray token authentication (default: a
                         token of this cluster's own in STATE_DIR/ray_auth_token; drivers
                         need RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH from STATE_DIR/env)
  --gateway              MOCHI_LOCAL_GATEWAY=1        also a JupyterHub and the gateway (see above;
                         needs Redis and the jupyterhub package)
  --model NAME           MOCHI_LAB_MODEL              tiny: the model of the gateway's pool
  --timeout SECONDS      MOCHI_LOCAL_TIMEOUT          180 (waiting for nodes)
  --attempts N           MOCHI_LOCAL_START_ATTEMPTS   3 tries per node (a loaded machine can
                         make a raylet give up waiting for its agent)
  -h, --help             this text
PYTHON (default python3) is the interpreter whose ray runs the nodes and the checks.

Loopback: Ray rewrites a node address of 127.0.0.1/localhost to the machine's primary
interface address, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which in turn makes
`ray start --address` refuse to add worker nodes. Any other 127.x.y.z address is kept as
given, so the nodes advertise --ip (127.0.0.2) and all Ray traffic stays in 127.0.0.0/8;
up.sh checks every node's address before it returns. (Ray's gRPC servers listen on all
interfaces; Ray has no option to bind them. Redis binds REDIS_BIND only.)
EOF
}

die() { echo "up.sh: $*" >&2; exit 1; }
need_value() { [[ $1 -ge 2 ]] || { usage >&2; exit 2; }; }

state_dir="${MOCHI_LOCAL_STATE_DIR:-}"
ip="${MOCHI_LOCAL_IP:-127.0.0.2}"
ray_port="${MOCHI_LOCAL_RAY_PORT:-6400}"
port_base="${MOCHI_LOCAL_PORT_BASE:-}"
redis_port="${MOCHI_LOCAL_REDIS_PORT:-6380}"
redis_bind="${MOCHI_LOCAL_REDIS_BIND:-127.0.0.1}"
redis_password="${MOCHI_LOCAL_REDIS_PASSWORD:-}"
use_redis="${MOCHI_LOCAL_REDIS:-1}"
workers="${MOCHI_LOCAL_WORKERS:-2}"
gpus_per_worker="${MOCHI_LOCAL_GPUS_PER_WORKER:-auto}"
cpus_per_worker="${MOCHI_LOCAL_CPUS_PER_WORKER:-2}"
object_store_mb="${MOCHI_LOCAL_OBJECT_STORE_MB:-256}"
data_dir="${MOCHI_LAB_DATA_DIR:-}"
dashboard="${MOCHI_LOCAL_DASHBOARD:-0}"
timeout_s="${MOCHI_LOCAL_TIMEOUT:-180}"
use_auth="${MOCHI_LOCAL_AUTH:-1}"
attempts="${MOCHI_LOCAL_START_ATTEMPTS:-3}"
use_gateway="${MOCHI_LOCAL_GATEWAY:-0}"
model="${MOCHI_LAB_MODEL:-tiny}"
PYTHON="${PYTHON:-python3}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --state-dir) need_value $#; state_dir="$2"; shift 2 ;;
    --ip) need_value $#; ip="$2"; shift 2 ;;
    --ray-port) need_value $#; ray_port="$2"; shift 2 ;;
    --port-base) need_value $#; port_base="$2"; shift 2 ;;
    --redis-port) need_value $#; redis_port="$2"; shift 2 ;;
    --redis-bind) need_value $#; redis_bind="$2"; shift 2 ;;
    --redis-password) need_value $#; redis_password="$2"; shift 2 ;;
    --no-redis) use_redis=0; shift ;;
    --workers) need_value $#; workers="$2"; shift 2 ;;
    --gpus-per-worker) need_value $#; gpus_per_worker="$2"; shift 2 ;;
    --cpus-per-worker) need_value $#; cpus_per_worker="$2"; shift 2 ;;
    --object-store-mb) need_value $#; object_store_mb="$2"; shift 2 ;;
    --data-dir) need_value $#; data_dir="$2"; shift 2 ;;
    --dashboard) dashboard=1; shift ;;
    --timeout) need_value $#; timeout_s="$2"; shift 2 ;;
    --no-auth) use_auth=0; shift ;;
    --gateway) use_gateway=1; shift ;;
    --model) need_value $#; model="$2"; shift 2 ;;
    --attempts) need_value $#; attempts="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "up.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# ---- checks -----------------------------------------------------------------------------
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
for v in ray_port redis_port workers cpus_per_worker object_store_mb timeout_s attempts; do
  is_uint "${!v}" || die "--${v//_/-} must be a whole number, got '${!v}'"
done
[[ "$ray_port" -ne 6379 ]] || die "the Ray head must not use 6379 (Redis' port); pick another --ray-port"
[[ "$ray_port" -ne "$redis_port" ]] || die "--ray-port and --redis-port must differ"
[[ "$workers" -ge 1 ]] || die "--workers must be at least 1"
[[ "$ip" =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "--ip must be a 127.x.y.z loopback address, got '$ip'"
[[ "$ip" != "127.0.0.1" ]] || die "--ip 127.0.0.1 makes Ray advertise the primary interface instead; use another 127.x.y.z (default 127.0.0.2)"
[[ "$redis_bind" =~ ^127\. || "$redis_bind" == "::1" ]] || die "--redis-bind must be a loopback address"
if [[ "$use_gateway" == 1 ]]; then
  [[ "$use_redis" == 1 ]] || die "--gateway needs Redis (the gateway and the pool share the store); drop --no-redis"
  [[ "$model" =~ ^[A-Za-z0-9._-]+$ ]] || die "--model must be a model name, got '$model'"
fi
port_base="${port_base:-$((ray_port + 20000))}"
is_uint "$port_base" || die "--port-base must be a whole number"
port_top=$((port_base + 100 * (workers + 2)))
[[ "$port_top" -le 65535 ]] || die "ports $port_base..$port_top do not fit below 65536; lower --port-base"
state_dir="${state_dir:-/tmp/mochi-local-$ray_port}"
[[ "$state_dir" == /* ]] || state_dir="$PWD/$state_dir"
# Ray puts Unix sockets under the temp dir, and their paths must fit in 107 bytes:
# STATE_DIR/ray/session_<date>_<pid>/sockets/plasma_store.N
[[ ${#state_dir} -le 36 ]] || die "--state-dir path too long for Ray's Unix sockets (max 36 chars): $state_dir"
mkdir -p "$state_dir"
state_dir="$(cd "$state_dir" && pwd)"
[[ ${#state_dir} -le 36 ]] || die "--state-dir path too long for Ray's Unix sockets (max 36 chars): $state_dir"
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found"
"$PYTHON" -c "import ray" 2>/dev/null || die "$PYTHON cannot import ray"
if [[ "$use_redis" == 1 ]]; then
  command -v redis-server >/dev/null || die "redis-server not found (install Redis, or use --no-redis)"
fi
if [[ "$use_gateway" == 1 ]]; then
  "$PYTHON" -c "import jupyterhub, mochi_lab.gateway.app" 2>/dev/null || die "--gateway needs the jupyterhub package and mochi_lab's gateway in $PYTHON"
fi
gateway_port=$((port_base + 10))
hub_port=$((port_base + 11))

data_dir="${data_dir:-$state_dir/data}"
mkdir -p "$state_dir/pids" "$state_dir/logs" "$state_dir/ray" "$state_dir/redis" "$data_dir"

if compgen -G "$state_dir/pids/*" >/dev/null; then
  for f in "$state_dir"/pids/*; do
    pid="$(cat "$f")"
    if [[ "$f" == *.pgid ]] && pgrep -g "$pid" >/dev/null 2>&1; then
      die "a local cluster is already running from $state_dir (run cluster/local/down.sh --state-dir $state_dir)"
    elif [[ "$f" == *.pid ]] && kill -0 "$pid" 2>/dev/null; then
      die "a local cluster is already running from $state_dir (run cluster/local/down.sh --state-dir $state_dir)"
    fi
  done
  rm -f "$state_dir"/pids/*
fi

port_in_use() {  # port_in_use HOST PORT: something accepts connections there
  "$PYTHON" - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.settimeout(0.5)
sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
PY
}
port_in_use "$ip" "$ray_port" && die "port $ray_port is in use on $ip"
port_in_use 127.0.0.1 "$ray_port" && die "port $ray_port is in use on 127.0.0.1"
if [[ "$use_redis" == 1 ]] && port_in_use "$redis_bind" "$redis_port"; then
  die "port $redis_port is in use on $redis_bind"
fi

# GPUs: auto = the machine's GPUs split evenly between the worker nodes
real_gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  real_gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
fi
if [[ "$gpus_per_worker" == auto ]]; then
  gpus_per_worker=$((real_gpus / workers))
fi
is_uint "$gpus_per_worker" || die "--gpus-per-worker must be a whole number or auto"
pin_gpus=0
if [[ "$gpus_per_worker" -gt 0 && "$real_gpus" -ge $((gpus_per_worker * workers)) ]]; then
  pin_gpus=1
fi

# ---- start ------------------------------------------------------------------------------
# From here on, any failure (a failed command or a die) stops whatever was started.
ready=0
cleanup_unless_ready() {
  local rc=$?
  if [[ $ready -ne 1 ]]; then
    echo "up.sh: failed (exit $rc); stopping what was started. Logs: $state_dir/logs" >&2
    "$(dirname "${BASH_SOURCE[0]}")/down.sh" --state-dir "$state_dir" >&2 || true
  fi
  exit "$rc"
}
trap cleanup_unless_ready EXIT

# Ray must see neither a driver address nor the OSX/Windows switch (it blocks worker nodes).
unset RAY_ADDRESS RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER RAY_AUTH_TOKEN
export RAY_USAGE_STATS_ENABLED=0
export MOCHI_LAB_DATA_DIR="$data_dir"
# Fixed default ports of the dashboard's and the autoscaler's metrics servers: move them into
# this cluster's port block so that two clusters on one machine do not collide.
export DASHBOARD_METRIC_PORT=$((port_base + 2))
export AUTOSCALER_METRIC_PORT=$((port_base + 3))
# Ray Client (ray://): for each client connection the head's proxy starts a server process,
# which imports Ray twice before it listens: 15-25 s on a loaded 2-core machine, against a
# default wait of 30 s (RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S): give it longer.
export RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="${RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S:-120}"
# Ray token authentication: set explicitly, so a ~/.ray/auth_token left by some other Ray
# does not decide it. The token is this cluster's own.
if [[ "$use_auth" == 1 ]]; then
  token_file="$state_dir/ray_auth_token"
  (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$token_file")
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token_file"
else
  export RAY_AUTH_MODE=disabled
  unset RAY_AUTH_TOKEN_PATH
fi

redis_url=""
if [[ "$use_redis" == 1 ]]; then
  if [[ -z "$redis_password" ]]; then
    redis_password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  fi
  [[ "$redis_password" =~ ^[A-Za-z0-9._~-]+$ ]] || die "the Redis password must be URL-safe ([A-Za-z0-9._~-])"
  echo "up.sh: Redis on $redis_bind:$redis_port"
  # password through stdin, never on a command line
  printf 'requirepass %s\n' "$redis_password" | redis-server - \
    --bind "$redis_bind" --port "$redis_port" --protected-mode yes \
    --dir "$state_dir/redis" --appendonly yes --appendfsync everysec --save '' \
    --maxmemory-policy noeviction \
    --daemonize yes --pidfile "$state_dir/pids/redis.pid" --logfile "$state_dir/logs/redis.log" \
    >/dev/null
  for _ in $(seq 1 50); do
    [[ "$(REDISCLI_AUTH="$redis_password" redis-cli -h "$redis_bind" -p "$redis_port" ping 2>/dev/null)" == PONG ]] && break
    sleep 0.1
  done
  [[ "$(REDISCLI_AUTH="$redis_password" redis-cli -h "$redis_bind" -p "$redis_port" ping 2>/dev/null)" == PONG ]] \
    || die "Redis did not answer; see $state_dir/logs/redis.log"
  redis_host="$redis_bind"
  [[ "$redis_host" != *:* ]] || redis_host="[$redis_host]"
  redis_url="redis://:$redis_password@$redis_host:$redis_port/0"
  export REDIS_URL="$redis_url"
fi

kill_group() {  # kill_group PGID: what a failed `ray start` left behind
  kill -TERM -- "-$1" 2>/dev/null || true
  for _ in $(seq 1 50); do
    pgrep -g "$1" >/dev/null 2>&1 || return 0
    sleep 0.1
  done
  kill -KILL -- "-$1" 2>/dev/null || true
  sleep 0.5
}

# start_node NAME ARGS...: `ray start` in a process group of its own (job control), so that
# down.sh can stop exactly this node's processes (`ray stop` would stop every Ray on the machine).
set -m
start_node() {
  local name="$1" try pgid
  shift
  for try in $(seq 1 "$attempts"); do
    # MOCHI_LOCAL_CLUSTER marks every process of this cluster, worker processes included
    # (Ray gives each of those a process group of its own): down.sh finds them by it.
    MOCHI_LOCAL_CLUSTER="$state_dir" "$PYTHON" -m ray.scripts.scripts start "$@" \
      --node-ip-address "$ip" --temp-dir "$state_dir/ray" --disable-usage-stats \
      --object-store-memory $((object_store_mb * 1024 * 1024)) \
      </dev/null >>"$state_dir/logs/$name.log" 2>&1 &
    pgid=$!
    echo "$pgid" >"$state_dir/pids/$name.pgid"
    if wait "$pgid"; then
      return 0
    fi
    echo "up.sh: ray start for $name failed (try $try of $attempts):" >&2
    grep -E 'Exception|Error' "$state_dir/logs/$name.log" | tail -n 3 >&2 || true
    kill_group "$pgid"
  done
  die "ray start for $name failed $attempts times; see $state_dir/logs/$name.log and $state_dir/ray/session_latest/logs"
}

node_ports() {  # node_ports INDEX: the per-node port flags, from a block of 100 ports
  local b=$((port_base + 100 * ($1 + 1)))
  echo "--dashboard-agent-listen-port $b --dashboard-agent-grpc-port $((b + 1))" \
       "--runtime-env-agent-port $((b + 2)) --metrics-export-port $((b + 3))" \
       "--node-manager-port $((b + 4)) --object-manager-port $((b + 5))" \
       "--min-worker-port $((b + 10)) --max-worker-port $((b + 99))"
}

echo "up.sh: Ray head on $ip:$ray_port (state in $state_dir)"
include_dashboard=false
[[ "$dashboard" != 1 ]] || include_dashboard=true
# shellcheck disable=SC2046  # node_ports prints flags meant to be split
start_node head --head --port "$ray_port" --num-cpus 0 --num-gpus 0 \
  --ray-client-server-port "$port_base" \
  --include-dashboard "$include_dashboard" --dashboard-host 127.0.0.1 --dashboard-port $((port_base + 1)) \
  $(node_ports 0)

for i in $(seq 1 "$workers"); do
  if [[ $pin_gpus -eq 1 ]]; then
    first=$(((i - 1) * gpus_per_worker))
    CUDA_VISIBLE_DEVICES="$(seq -s, "$first" $((first + gpus_per_worker - 1)))"
    export CUDA_VISIBLE_DEVICES
  fi
  echo "up.sh: Ray worker $i: $cpus_per_worker CPU, $gpus_per_worker GPU${CUDA_VISIBLE_DEVICES:+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}"
  # shellcheck disable=SC2046
  start_node "worker-$i" --address "$ip:$ray_port" \
    --num-cpus "$cpus_per_worker" --num-gpus "$gpus_per_worker" \
    --resources "{\"mochi_local_worker_$i\": 1}" \
    $(node_ports "$i")
done
set +m
unset CUDA_VISIBLE_DEVICES

# ---- verify: every node alive and on loopback ----------------------------------------------
echo "up.sh: checking the nodes"
"$PYTHON" - "$ip:$ray_port" "$((workers + 1))" "$timeout_s" "$state_dir/nodes.json" <<'PY'
import ipaddress, json, os, sys, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # this driver's own address: loopback
import ray

address, expected, timeout, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ray.init(address=address, log_to_driver=False, logging_level="ERROR")
deadline = time.time() + timeout
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= expected or time.time() > deadline:
        break
    time.sleep(0.5)
rows = [
    {"node_id": n["NodeID"], "address": n["NodeManagerAddress"],
     "head": "node:__internal_head__" in n["Resources"],
     "GPU": n["Resources"].get("GPU", 0), "CPU": n["Resources"].get("CPU", 0)}
    for n in nodes
]
with open(out, "w") as f:
    json.dump(rows, f, indent=1)
bad = [r["address"] for r in rows if not ipaddress.ip_address(r["address"]).is_loopback]
ray.shutdown()
if bad:
    sys.exit(f"nodes advertise non-loopback addresses: {bad}")
if len(rows) != expected:
    sys.exit(f"expected {expected} alive nodes, found {len(rows)}")
print(f"up.sh: {len(rows)} nodes alive, all on loopback: {sorted({r['address'] for r in rows})}")
PY

# ---- the gateway and its JupyterHub (--gateway) ----------------------------------------------
gateway_url=""
hub_api_url=""
wait_http() {  # wait_http URL SECONDS PGID NAME: until URL answers 200, the group dies, or time runs out
  "$PYTHON" - "$@" <<'PY'
import os, sys, time, urllib.request
url, timeout, pgid, name = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
deadline = time.time() + timeout
while time.time() < deadline:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        sys.exit(f"up.sh: {name} exited; see its log")
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            if resp.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit(f"up.sh: {name} did not answer {url} in {timeout:.0f} s; see its log")
PY
}

if [[ "$use_gateway" == 1 ]]; then
  mkdir -p "$state_dir/hub"
  chmod 700 "$state_dir/hub"
  # Tokens of the two services, known to the hub through its environment only.
  service_token="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
  local_token="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
  values_file="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/jupyterhub/values.yaml"
  hub_api_url="http://127.0.0.1:$hub_port/hub/api"
  gateway_url="http://127.0.0.1:$gateway_port/services/mochi-lab/"
  cat >"$state_dir/hub/jupyterhub_config.py" <<PY
# Written by cluster/local/up.sh: the local JupyterHub, with the roles of cluster/jupyterhub/values.yaml.
import os
import secrets
import yaml
from jupyterhub.proxy import Proxy


class NoProxy(Proxy):
    """No configurable-http-proxy here: routes are kept in memory, clients call the gateway directly."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.should_start = False
        self._routes = {}

    async def add_route(self, routespec, target, data):
        self._routes[routespec] = {"routespec": routespec, "target": target, "data": data}

    async def delete_route(self, routespec):
        self._routes.pop(routespec, None)

    async def get_all_routes(self):
        return dict(self._routes)


with open("$values_file") as f:
    hub = yaml.safe_load(f)["hub"]
c.JupyterHub.proxy_class = NoProxy
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = $((port_base + 12))
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = $hub_port
c.JupyterHub.db_url = "sqlite:///$state_dir/hub/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "$state_dir/hub/cookie_secret"
c.JupyterHub.pid_file = "$state_dir/hub/jupyterhub.pid"
c.JupyterHub.cleanup_servers = False
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = secrets.token_hex(32)  # nobody logs in here: tokens come from up.sh
c.Authenticator.allowed_users = {"user", "admin"}
c.Authenticator.admin_users = {"admin"}
c.JupyterHub.services = [
    {"name": "mochi-lab", "url": "http://127.0.0.1:$gateway_port", "api_token": os.environ["MOCHI_LOCAL_SERVICE_TOKEN"]},
    {"name": "mochi-local", "api_token": os.environ["MOCHI_LOCAL_LOCAL_TOKEN"]},
]
c.JupyterHub.load_roles = [{"name": name, **role} for name, role in hub["loadRoles"].items()] + [
    {"name": "mochi-local", "scopes": ["tokens", "read:users"], "services": ["mochi-local"]},
]
c.Spawner.server_token_scopes = hub["config"]["KubeSpawner"]["server_token_scopes"]
PY
  echo "up.sh: JupyterHub API on 127.0.0.1:$hub_port"
  set -m
  (cd "$state_dir/hub" && MOCHI_LOCAL_CLUSTER="$state_dir" MOCHI_LOCAL_SERVICE_TOKEN="$service_token" \
    MOCHI_LOCAL_LOCAL_TOKEN="$local_token" exec "$PYTHON" -m jupyterhub -f "$state_dir/hub/jupyterhub_config.py") \
    </dev/null >>"$state_dir/logs/hub.log" 2>&1 &
  echo "$!" >"$state_dir/pids/hub.pgid"
  set +m
  wait_http "$hub_api_url/" 120 "$(cat "$state_dir/pids/hub.pgid")" JupyterHub

  # what a notebook holds (a kernel's token: the scopes of server_token_scopes that `user` has),
  # and an admin's token for scaling
  MOCHI_LOCAL_LOCAL_TOKEN="$local_token" "$PYTHON" - "$hub_api_url" "$state_dir" "$gateway_url" "$values_file" <<'PY'
import json, os, pathlib, shlex, sys, urllib.request
import yaml
api, state, gateway, values = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
scopes = [s for s in yaml.safe_load(open(values))["hub"]["config"]["KubeSpawner"]["server_token_scopes"] if "!server" not in s]

def token(user):
    req = urllib.request.Request(f"{api}/users/{user}/tokens", method="POST",
                                 data=json.dumps({"note": "cluster/local/up.sh", "scopes": scopes}).encode(),
                                 headers={"Authorization": "token " + os.environ["MOCHI_LOCAL_LOCAL_TOKEN"],
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["token"]

def private(path, text):
    path.touch(mode=0o600)
    path.write_text(text)

private(state / "notebook.env", "# written by cluster/local/up.sh: all a notebook holds\n"
        f"export MOCHI_LAB_GATEWAY={shlex.quote(gateway)}\nexport JUPYTERHUB_API_TOKEN={shlex.quote(token('user'))}\n")
private(state / "admin_token", token("admin") + "\n")
PY

  echo "up.sh: gateway on 127.0.0.1:$gateway_port (model $model), the pool's owner"
  # On one machine the gateway joins Ray as a driver (the head's GCS address); on Kubernetes it uses Ray
  # Client, whose per-client server start takes 15-25 s here and sometimes misses its deadline.
  gateway_env=(MOCHI_LOCAL_CLUSTER="$state_dir" RAY_ADDRESS="$ip:$ray_port" MOCHI_LAB_MODEL="$model"
    JUPYTERHUB_SERVICE_NAME=mochi-lab JUPYTERHUB_SERVICE_PREFIX=/services/mochi-lab/
    JUPYTERHUB_API_URL="$hub_api_url" JUPYTERHUB_API_TOKEN="$service_token")
  if [[ "$gpus_per_worker" -gt 0 ]]; then
    gateway_env+=(MOCHI_LAB_WORKERS="$((workers * gpus_per_worker))")
  fi
  set -m
  (cd "$state_dir" && exec env "${gateway_env[@]}" "$PYTHON" -c \
    'import sys; from mochi_lab.cli import main; sys.exit(main(sys.argv[1:]))' \
    gateway --host 127.0.0.1 --port "$gateway_port") </dev/null >>"$state_dir/logs/gateway.log" 2>&1 &
  echo "$!" >"$state_dir/pids/gateway.pgid"
  set +m
  # it answers once it has created (or re-attached) the pool through Ray Client
  wait_http "${gateway_url}healthz" "$((timeout_s > 300 ? timeout_s : 300))" "$(cat "$state_dir/pids/gateway.pgid")" gateway
fi

# ---- state --------------------------------------------------------------------------------
{
  echo "# written by cluster/local/up.sh; source it to point mochi_lab at this cluster"
  printf 'export RAY_ADDRESS=%q\n' "$ip:$ray_port"
  if [[ -n "$redis_url" ]]; then printf 'export REDIS_URL=%q\n' "$redis_url"; fi
  printf 'export MOCHI_LAB_DATA_DIR=%q\n' "$data_dir"
  printf 'export RAY_AUTH_MODE=%q\n' "$RAY_AUTH_MODE"
  if [[ "$use_auth" == 1 ]]; then printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$token_file"; fi
  # one worker actor per GPU (without GPUs mochi_lab picks its own default)
  if [[ "$gpus_per_worker" -gt 0 ]]; then
    printf 'export MOCHI_LAB_WORKERS=%q\n' "$((workers * gpus_per_worker))"
  fi
} >"$state_dir/env"
chmod 600 "$state_dir/env"

"$PYTHON" - "$state_dir" <<PY
import json, pathlib, sys
state = pathlib.Path(sys.argv[1])
pgids = {p.stem: int(p.read_text()) for p in sorted((state / "pids").glob("*.pgid"))}
redis_pid = state / "pids" / "redis.pid"
info = {
    "state_dir": str(state),
    "ray_address": "$ip:$ray_port",
    "node_ip": "$ip",
    "ray_port": $ray_port,
    "port_base": $port_base,
    "ray_client_address": "ray://$ip:$port_base",
    "dashboard_url": "http://127.0.0.1:$((port_base + 1))" if "$include_dashboard" == "true" else None,
    "redis_url": "$redis_url" or None,
    "redis_port": $redis_port if "$use_redis" == "1" else None,
    "redis_pid": int(redis_pid.read_text()) if redis_pid.exists() else None,
    "workers": $workers,
    "gpus_per_worker": $gpus_per_worker,
    "cpus_per_worker": $cpus_per_worker,
    "pinned_gpus": bool($pin_gpus),
    "ray_auth_mode": "$RAY_AUTH_MODE",
    "ray_auth_token_path": "${token_file:-}" or None,
    "gateway_url": "$gateway_url" or None,
    "hub_api_url": "$hub_api_url" or None,
    "model": "$model" if "$use_gateway" == "1" else None,
    "data_dir": "$data_dir",
    "temp_dir": str(state / "ray"),
    "process_groups": pgids,
    "nodes": json.loads((state / "nodes.json").read_text()),
}
(state / "cluster.json").write_text(json.dumps(info, indent=1) + "\n")
(state / "cluster.json").chmod(0o600)
PY

ready=1
echo "up.sh: ready. In a shell: source $state_dir/env ; stop: cluster/local/down.sh --state-dir $state_dir"
if [[ "$use_gateway" == 1 ]]; then
  echo "up.sh: a notebook's view (the gateway and a hub token, nothing else): source $state_dir/notebook.env"
fi
