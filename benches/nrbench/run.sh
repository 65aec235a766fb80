#!/usr/bin/env bash
# Launch the thing-operator as the forwarder under test (bench.py sweep --forwarder thing-operator).
#   MQTT_HOST / MQTT_PORT : the benchmark broker (started by broker/dynsec-broker.sh);
#   SINK_URL is not read here: the Observer created by setup.sh holds the sink URL.
# The release binary runs with the Mosquitto backend only, its own --http-addr, scoped with
# --watch-namespace to the benchmark namespace, as the operator's service account
# (KUBECONFIG = the control plane's operator.kubeconfig; override with NRBENCH_KUBECONFIG).
# The sink is on loopback, which HTTP sinks may not reach by default (the egress policy):
# --http-sink-allow-cidr 127.0.0.0/8 lets this Observer reach it.
# Extra flags: THING_OPERATOR_ARGS (e.g. "--status-write-interval 5s").
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/common.sh"
HOST="${MQTT_HOST:-127.0.0.1}"
PORT="${MQTT_PORT:-18831}"
KUBECONFIG="${NRBENCH_KUBECONFIG:-$(cp_var OPERATOR_KUBECONFIG)}"
export KUBECONFIG
# shellcheck disable=SC2086
exec "$BIN" run \
  --http-addr "$OPERATOR_HTTP" \
  --watch-namespace "$NS" \
  --mqtt-url "mqtt://$HOST:$PORT" \
  --mqtt-username thing-operator \
  --mqtt-password-file "$STATE/admin-password" \
  --http-sink-allow-cidr 127.0.0.0/8 \
  ${THING_OPERATOR_ARGS:-}
