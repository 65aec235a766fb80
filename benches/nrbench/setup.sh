#!/usr/bin/env bash
# One-time setup of the thing-operator forwarder. Idempotent; run it before sweep.sh.
#
# 1. A control plane of its own: the operator's scripts/testenv.sh (etcd, kube-apiserver,
#    kube-controller-manager; its moto and Mosquitto are stopped, the benchmark brings its own
#    broker) in $NRBENCH_CP. Not the quick start's API server: the quick-start operator watches
#    every namespace, so it would also reconcile (and run the Observer of) the benchmark's Things.
#    etcd, kube-apiserver and kube-controller-manager are pinned to NRBENCH_CP_CPUS (default 0,
#    the harness's CPU; '' = leave unpinned), so CPU 1 stays the forwarder's.
# 2. $NRBENCH_STATE/dynsec-template.json: the pristine dynamic-security file every benchmark
#    broker starts from (broker/dynsec-broker.sh): the operator's admin account
#    (`mosquitto_ctrl dynsec init`) and a client "gateway" whose role may publish on
#    `$aws/things/+/shadow/update` (the load generator publishes for all devices). Passwords:
#    admin-password, gateway-password (random, generated here).
# 3. Namespace $NRBENCH_NS with Things dev-0000.. (label bench=nrbench, broker Mosquitto) and the
#    Observer nrbench-forward (observer.yaml): matchLabels bench=nrbench, section Reported,
#    filter expression `state.temp > 20.0`, delivery Every, HTTP sink http://127.0.0.1:18091/ingest.
# 4. One priming run (broker + operator) until every Thing is Ready, so every sweep rate starts
#    from the same state (Secrets and status written).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BENCH="$(cd "$HERE/../.." && pwd)"
source "$HERE/common.sh"
log() { echo "[setup] $*" >&2; }

# ---- 1. control plane
if [[ ! -f "$CP/ready" ]] || ! kill -0 "$(cat "$CP/kube-apiserver.pid" 2>/dev/null)" 2>/dev/null; then
  log "starting a control plane in $CP"
  bash "$REPO/scripts/testenv.sh" up "$CP"
fi
for p in moto mosquitto; do
  if [[ -f "$CP/$p.pid" ]]; then
    kill "$(cat "$CP/$p.pid")" 2>/dev/null || true
    rm -f "$CP/$p.pid"
  fi
done
if [[ -n "${NRBENCH_CP_CPUS-0}" ]]; then
  for p in etcd kube-apiserver kube-controller-manager; do
    [[ -f "$CP/$p.pid" ]] && taskset -a -p -c "${NRBENCH_CP_CPUS-0}" "$(cat "$CP/$p.pid")" >/dev/null
  done
fi
KUBECTL="$(cp_var KUBECTL)"
export KUBECONFIG="$(cp_var KUBECONFIG)"   # admin, for creating the namespace and objects

# ---- 2. dynsec template
mkdir -p "$STATE"
chmod 700 "$STATE"
if [[ ! -f "$STATE/dynsec-template.json" ]]; then
  log "making $STATE/dynsec-template.json"
  openssl rand -hex 16 | tr -d '\n' >"$STATE/admin-password"
  openssl rand -hex 16 | tr -d '\n' >"$STATE/gateway-password"
  # A scratch broker edits the file through the plugin; its directory must be the mosquitto
  # user's ($STATE is root-only).
  tmp="${NRBENCH_RUN:-/tmp/nrbench/run}/dynsec-template"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  mosquitto_ctrl dynsec init "$tmp/dynsec.json" thing-operator "$(cat "$STATE/admin-password")" >/dev/null
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
  cat >"$tmp/mosquitto.conf" <<M
per_listener_settings false
allow_anonymous false
listener $port 127.0.0.1
plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so
plugin_opt_config_file $tmp/dynsec.json
persistence false
M
  if [[ $(id -u) -eq 0 ]]; then chown -R mosquitto "$tmp"; fi
  mosquitto -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
  bpid=$!
  for _ in $(seq 1 50); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
    sleep 0.1
  done
  ctl() { mosquitto_ctrl -h 127.0.0.1 -p "$port" -u thing-operator -P "$(cat "$STATE/admin-password")" dynsec "$@"; }
  ctl createRole gateway
  ctl addRoleACL gateway publishClientSend '$aws/things/+/shadow/update' allow
  ctl createClient gateway -p "$(cat "$STATE/gateway-password")"
  ctl addClientRole gateway gateway
  kill "$bpid"
  wait "$bpid" 2>/dev/null || true
  python3 - "$tmp/dynsec.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
clients = {c["username"]: [r["rolename"] for r in c.get("roles", [])] for c in d["clients"]}
roles = {r["rolename"]: r.get("acls", []) for r in d["roles"]}
assert "thing-operator" in clients, "no admin account"
assert clients.get("gateway") == ["gateway"], "no gateway client with role gateway"
assert any(a["topic"] == "$aws/things/+/shadow/update" and a["allow"] for a in roles["gateway"]), "gateway role ACL"
PY
  cp "$tmp/dynsec.json" "$STATE/dynsec-template.json"
  chmod 600 "$STATE/dynsec-template.json"
  rm -rf "$tmp"
fi

# ---- 3. namespace, Things, Observer
log "applying namespace $NS, $DEVICES Things and the Observer"
{
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n' "$NS"
  for i in $(seq 0 $((DEVICES - 1))); do
    printf -- '---\napiVersion: iot.thing-operator.dev/v1alpha1\nkind: Thing\nmetadata: {name: dev-%04d, namespace: %s, labels: {bench: nrbench}}\nspec: {broker: Mosquitto}\n' "$i" "$NS"
  done
} | "$KUBECTL" apply -f - >/dev/null
"$KUBECTL" apply -n "$NS" -f "$HERE/observer.yaml" >/dev/null

# ---- 4. priming run
log "priming: broker + operator until all Things are Ready"
export MQTT_HOST=127.0.0.1 MQTT_PORT=18831
mkdir -p "$BENCH/run"
setsid "$BENCH/broker/dynsec-broker.sh" >"$BENCH/run/setup-broker.log" 2>&1 &
bpid=$!
sleep 1
setsid "$HERE/run.sh" >"$BENCH/run/setup-operator.log" 2>&1 &
opid=$!
ok=0
"$KUBECTL" -n "$NS" wait --for=condition=Ready thing --all --timeout=180s >/dev/null && ok=1
"$KUBECTL" -n "$NS" wait --for=condition=Ready observer --all --timeout=30s >/dev/null || ok=0
kill "$opid" 2>/dev/null || true
wait "$opid" 2>/dev/null || true
kill "$bpid" 2>/dev/null || true
wait "$bpid" 2>/dev/null || true
"$KUBECTL" -n "$NS" get things --no-headers | awk '{print $3}' | sort | uniq -c >&2 || true
"$KUBECTL" -n "$NS" get things dev-0000 -o jsonpath='{.status.device.thingName}{"\n"}' >&2
[[ $ok == 1 ]] || { log "not every Thing/Observer became Ready; see $BENCH/run/setup-operator.log"; exit 1; }
log "ready"
