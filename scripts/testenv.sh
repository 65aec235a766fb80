#!/usr/bin/env bash
# The local test environment: a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager), moto (AWS IoT) and Mosquitto (with its dynamic-security plugin),
# each on a free loopback port, each with its own data dir under one state dir.
#
#   scripts/testenv.sh up   [DIR]   install what is missing, start everything, write DIR/env
#   scripts/testenv.sh down [DIR]   stop everything started in DIR, by PID
#   scripts/testenv.sh restart-apiserver [DIR]
#   scripts/testenv.sh status [DIR]
#
# DIR defaults to .testenv in the repository. `source DIR/env` gives KUBECONFIG (admin),
# OPERATOR_KUBECONFIG (the operator's service account), MOTO_URL, MQTT_URL, ...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CMD="${1:-up}"
DIR="${2:-$ROOT/.testenv}"
CACHE_DIR="${THING_OPERATOR_CACHE:-$HOME/.cache/thing-operator}"
K8S_BIN="$CACHE_DIR/k8s-1.20.2/bin"
OPERATOR_NS="thing-operator-system"
OPERATOR_SA="thing-operator"
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

log() { echo "[testenv] $*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_for DESCRIPTION SECONDS COMMAND...: polls until COMMAND succeeds, bounded.
wait_for() {
  local what="$1" secs="$2"; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${secs}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

install_deps() {
  local missing=()
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v mosquitto >/dev/null || missing+=(mosquitto)
  command -v mosquitto_ctrl >/dev/null || missing+=(mosquitto-clients)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ! python3 -c 'import moto.server' >/dev/null 2>&1 || ! command -v moto_server >/dev/null; then
    log "installing moto[server]"
    python3 -m pip install -q 'moto[server]>=5,<6'
  fi
  # The Helm SDK (through ctypes) for the chart test; pinned, its API is young.
  if ! python3 -c 'import helm_python' >/dev/null 2>&1; then
    log "installing helm-python-sdk"
    python3 -m pip install -q 'helm-python-sdk==0.2.2'
  fi
  "$ROOT/scripts/build-control-plane.sh"
}

start_bg() { # start_bg NAME LOGFILE CMD... ; records NAME.pid
  local name="$1" logf="$2"; shift 2
  setsid "$@" >"$logf" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
}

stop_pid() {
  local f="$DIR/$1.pid"
  [[ -f "$f" ]] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

start_apiserver() {
  # shellcheck disable=SC1091
  source "$DIR/env"
  start_bg kube-apiserver "$DIR/logs/kube-apiserver.log" "$K8S_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --cert-dir "$DIR/apiserver-certs" \
    --secure-port "$APISERVER_PORT" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
    --insecure-port 0 \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$DIR/sa.key" --service-account-signing-key-file "$DIR/sa.key" \
    --api-audiences https://kubernetes.default.svc \
    --token-auth-file "$DIR/tokens.csv" \
    --authorization-mode RBAC \
    --service-cluster-ip-range 10.0.0.0/24 \
    --enable-priority-and-fairness=false
  wait_for "kube-apiserver /readyz" 60 curl -fsk -H "Authorization: Bearer $ADMIN_TOKEN" "https://127.0.0.1:$APISERVER_PORT/readyz"
}

write_kubeconfig() { # write_kubeconfig FILE TOKEN
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    insecure-skip-tls-verify: true
users:
- name: user
  user:
    token: $2
contexts:
- name: local
  context: {cluster: local, user: user, namespace: default}
current-context: local
KC
}

# test_pki DIR CA_NAME [EXTENSION]: a test CA (DIR/ca.key, DIR/ca.crt) and a server
# certificate for 127.0.0.1 and localhost signed by it (DIR/server.key, DIR/server.crt), with
# EXTENSION as one more line of the server certificate's extensions.
test_pki() {
  local d="$1" name="$2" extension="${3:-}"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj "/CN=$name" -keyout "$d/ca.key" -out "$d/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$d/server.ext"
  if [[ -n "$extension" ]]; then printf '%s\n' "$extension" >>"$d/server.ext"; fi
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
    -extfile "$d/server.ext" -out "$d/server.crt" 2>/dev/null
}

# mosquitto_tls: an mTLS listener for devices authenticating with certificates, signed by a
# test CA that is also supplied to the operator as its device CA (Secret thing-operator-ca).
# Idempotent, so `add-mosquitto-tls` can add it to an environment that is already up.
mosquitto_tls() {
  local m="$DIR/mosquitto"
  if [[ ! -f "$m/ca.crt" ]]; then
    test_pki "$m" "thing-operator test device CA"
  fi
  if ! grep -q '^export MQTT_TLS_PORT=' "$DIR/env"; then
    { echo "export MQTT_TLS_PORT=$(free_port)"; echo "export MQTT_CA_FILE=$m/ca.crt"; } >>"$DIR/env"
  fi
  # shellcheck disable=SC1091
  source "$DIR/env"
  if ! grep -q "^listener $MQTT_TLS_PORT " "$m/mosquitto.conf"; then
    cat >>"$m/mosquitto.conf" <<M
listener $MQTT_TLS_PORT 127.0.0.1
cafile $m/ca.crt
certfile $m/server.crt
keyfile $m/server.key
require_certificate true
use_identity_as_username true
M
  fi
  if [[ $(id -u) -eq 0 ]]; then chown -R mosquitto "$m" 2>/dev/null || true; fi
}

mosquitto_tls_secret() {
  "$KUBECTL" -n "$OPERATOR_NS" get secret thing-operator-ca >/dev/null 2>&1 ||
    "$KUBECTL" -n "$OPERATOR_NS" create secret tls thing-operator-ca \
      --cert "$DIR/mosquitto/ca.crt" --key "$DIR/mosquitto/ca.key" >/dev/null
}

install_manifests() { # the CRDs and the operator's RBAC (deploy/, without its Deployment)
  log "installing CRDs and the operator's RBAC"
  # kubectl 1.20 validates client-side and does not know x-kubernetes-validations (CEL).
  # Server-side apply refuses the unknown field on 1.20, so plain apply: 1.20 drops CEL silently.
  "$KUBECTL" apply --validate=false -f "$ROOT/crds/crds.yaml" >/dev/null
  "$KUBECTL" apply --server-side -f "$ROOT/deploy/namespace.yaml" -f "$ROOT/deploy/core/rbac.yaml" \
    -f "$ROOT/deploy/rbac.yaml" >/dev/null
  wait_for "CRDs established" 60 "$KUBECTL" get things.iot.thing-operator.dev
}

up() {
  if [[ -f "$DIR/ready" ]] && [[ -f "$DIR/kube-apiserver.pid" ]] && kill -0 "$(cat "$DIR/kube-apiserver.pid")" 2>/dev/null; then
    log "already running in $DIR"
    return 0
  fi
  [[ -d "$DIR" ]] && down
  install_deps
  rm -rf "$DIR"
  mkdir -p "$DIR/logs" "$DIR/etcd" "$DIR/mosquitto"
  local admin_token operator_token tenant_token mqtt_password
  admin_token=$(openssl rand -hex 24)
  operator_token=$(openssl rand -hex 24)
  # A plain user with no rights of its own: the hostile-tenant tests bind it to one namespace.
  tenant_token=$(openssl rand -hex 24)
  mqtt_password=$(openssl rand -hex 16)
  cat >"$DIR/tokens.csv" <<T
$admin_token,admin,admin-uid,"system:masters"
$operator_token,system:serviceaccount:$OPERATOR_NS:$OPERATOR_SA,operator-uid,"system:serviceaccounts,system:serviceaccounts:$OPERATOR_NS,system:authenticated"
$tenant_token,tenant-user,tenant-user-uid,"system:authenticated"
T
  openssl genrsa -out "$DIR/sa.key" 2048 2>/dev/null
  cat >"$DIR/env" <<E
export TESTENV_DIR=$DIR
export ETCD_PORT=$(free_port)
export ETCD_PEER_PORT=$(free_port)
export APISERVER_PORT=$(free_port)
export MOTO_PORT=$(free_port)
export AZURE_PORT=$(free_port)
export MQTT_PORT=$(free_port)
export ADMIN_TOKEN=$admin_token
export OPERATOR_TOKEN=$operator_token
export KUBECONFIG=$DIR/admin.kubeconfig
export OPERATOR_KUBECONFIG=$DIR/operator.kubeconfig
export TENANT_USER=tenant-user
export TENANT_KUBECONFIG=$DIR/tenant.kubeconfig
export KUBECTL=$K8S_BIN/kubectl
export MQTT_ADMIN_USER=thing-operator
export MQTT_ADMIN_PASSWORD_FILE=$DIR/mosquitto/admin-password
export OPERATOR_NAMESPACE=$OPERATOR_NS
E
  # shellcheck disable=SC1091
  source "$DIR/env"
  {
    echo "export MOTO_URL=http://127.0.0.1:$MOTO_PORT"
    echo "export MQTT_URL=mqtt://127.0.0.1:$MQTT_PORT"
    echo "export AZURE_URL=http://127.0.0.1:$AZURE_PORT"
    echo "export AZURE_HUB=double.azure-devices.net"
    echo "export AZURE_CONNECTION_STRING_FILE=$DIR/azure/connection-string"
  } >>"$DIR/env"
  write_kubeconfig "$DIR/admin.kubeconfig" "$admin_token"
  write_kubeconfig "$DIR/operator.kubeconfig" "$operator_token"
  write_kubeconfig "$DIR/tenant.kubeconfig" "$tenant_token"

  log "starting etcd on $ETCD_PORT"
  start_bg etcd "$DIR/logs/etcd.log" etcd --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT"
  wait_for etcd 30 curl -fs "http://127.0.0.1:$ETCD_PORT/health"

  log "starting kube-apiserver on $APISERVER_PORT"
  start_apiserver
  log "starting kube-controller-manager"
  start_bg kube-controller-manager "$DIR/logs/kube-controller-manager.log" "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$DIR/admin.kubeconfig" --controllers=garbagecollector,namespace \
    --leader-elect=false --secure-port=0 --port=0
  wait_for "namespace default" 60 "$KUBECTL" get namespace default

  log "starting moto on $MOTO_PORT"
  # moto with AWS's CreateThing answer for an existing thing (409 unless identical): see the file.
  start_bg moto "$DIR/logs/moto.log" python3 "$ROOT/tests/aws_support/moto_server.py" \
    -H 127.0.0.1 -p "$MOTO_PORT"
  wait_for moto 60 curl -fs "http://127.0.0.1:$MOTO_PORT/moto-api/data.json"

  log "starting the IoT Hub double on $AZURE_PORT"
  start_azure_double
  wait_for "IoT Hub double" 30 curl -fs "http://127.0.0.1:$AZURE_PORT/_double/state"

  log "starting mosquitto on $MQTT_PORT"
  printf '%s' "$mqtt_password" >"$DIR/mosquitto/admin-password"
  mosquitto_ctrl dynsec init "$DIR/mosquitto/dynsec.json" "$MQTT_ADMIN_USER" "$mqtt_password" >/dev/null
  cat >"$DIR/mosquitto/mosquitto.conf" <<M
per_listener_settings false
allow_anonymous false
listener $MQTT_PORT 127.0.0.1
plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so
plugin_opt_config_file $DIR/mosquitto/dynsec.json
persistence false
log_dest stdout
max_packet_size 1048576
# The operator's one session takes every device's reports: the default queue of 1,000 QoS 1
# messages per client overflows (and drops reports) above ~1,000 reports/s. Bounded, not 0
# (unlimited): 10,000 Things x 10 s of backlog. See docs/mosquitto.md#benchmark.
max_queued_messages 100000
M
  mosquitto_tls
  if [[ $(id -u) -eq 0 ]]; then chown -R mosquitto "$DIR/mosquitto" 2>/dev/null || true; fi
  start_bg mosquitto "$DIR/logs/mosquitto.log" mosquitto -c "$DIR/mosquitto/mosquitto.conf"
  wait_for mosquitto 30 python3 -c "import socket; socket.create_connection(('127.0.0.1', $MQTT_PORT), 1)"

  install_manifests
  mosquitto_tls_secret
  touch "$DIR/ready"
  log "ready: source $DIR/env"
}

# The Azure IoT Hub test double (tests/azure_double): no emulator of IoT Hub exists. Its SAS
# policy key is made here and handed to the operator as a connection string in a file, the way a
# mounted Secret would. It also listens over TLS (a test CA made here; a client trusts it with
# SSL_CERT_FILE=$AZURE_CA_FILE), where it serves the hub API and Microsoft Entra's token endpoint
# for workload identity (azure_identity and bearer tokens refuse plain http).
start_azure_double() {
  local a="$DIR/azure"
  mkdir -p "$a"
  if [[ ! -f "$a/key" ]]; then
    openssl rand -base64 32 | tr -d '\n' >"$a/key"
    printf 'HostName=double.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=%s' \
      "$(cat "$a/key")" >"$a/connection-string"
  fi
  if [[ ! -f "$a/ca.crt" ]]; then
    test_pki "$a" "thing-operator test Azure CA" 'extendedKeyUsage=serverAuth'
  fi
  if ! grep -q '^export AZURE_TLS_PORT=' "$DIR/env"; then
    local port
    port=$(free_port)
    { echo "export AZURE_TLS_PORT=$port"; echo "export AZURE_TLS_URL=https://127.0.0.1:$port"
      echo "export AZURE_CA_FILE=$a/ca.crt"; } >>"$DIR/env"
  fi
  # shellcheck disable=SC1091
  source "$DIR/env"
  start_bg azure-double "$DIR/logs/azure-double.log" python3 "$ROOT/tests/azure_double/iothub_double.py" \
    --port "$AZURE_PORT" --hub double.azure-devices.net --policy iothubowner --key-file "$a/key" \
    --tls-port "$AZURE_TLS_PORT" --tls-cert "$a/server.crt" --tls-key "$a/server.key"
}

down() {
  for p in azure-double mosquitto moto kube-controller-manager kube-apiserver etcd; do stop_pid "$p"; done
  log "stopped everything in $DIR"
}

case "$CMD" in
  up) up ;;
  down) down ;;
  restart-apiserver)
    stop_pid kube-apiserver
    start_apiserver
    ;;
  stop-apiserver) stop_pid kube-apiserver ;;
  start-apiserver) start_apiserver ;;
  add-mosquitto-tls)
    # shellcheck disable=SC1091
    source "$DIR/env"
    mosquitto_tls
    mosquitto_tls_secret
    stop_pid mosquitto
    start_bg mosquitto "$DIR/logs/mosquitto.log" mosquitto -c "$DIR/mosquitto/mosquitto.conf"
    wait_for mosquitto 30 python3 -c "import socket; socket.create_connection(('127.0.0.1', $MQTT_TLS_PORT), 1)"
    ;;
  restart-azure-double)
    # shellcheck disable=SC1091
    source "$DIR/env"
    stop_pid azure-double
    start_azure_double
    wait_for "IoT Hub double" 30 curl -fs "http://127.0.0.1:$AZURE_PORT/_double/state"
    ;;
  restart-mosquitto)
    # shellcheck disable=SC1091
    source "$DIR/env"
    stop_pid mosquitto
    start_bg mosquitto "$DIR/logs/mosquitto.log" mosquitto -c "$DIR/mosquitto/mosquitto.conf"
    wait_for mosquitto 30 python3 -c "import socket; socket.create_connection(('127.0.0.1', $MQTT_PORT), 1)"
    ;;
  install-manifests)
    # shellcheck disable=SC1091
    source "$DIR/env"
    install_manifests
    mosquitto_tls_secret
    ;;
  status)
    for p in etcd kube-apiserver kube-controller-manager moto mosquitto azure-double; do
      if [[ -f "$DIR/$p.pid" ]] && kill -0 "$(cat "$DIR/$p.pid")" 2>/dev/null; then echo "$p running"; else echo "$p stopped"; fi
    done
    ;;
  *) echo "usage: $0 up|down|restart-apiserver|restart-azure-double|install-manifests|status [DIR]" >&2; exit 2 ;;
esac
