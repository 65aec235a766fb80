#!/usr/bin/env bash
# Quick start: brings up the local control plane (and Mosquitto, moto, the IoT Hub double), installs the CRDs,
# starts the operator on its embedded default backend (Mosquitto, no cloud account) in the
# background, and applies examples/.  `scripts/quickstart.sh down` stops everything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Its own environment, apart from the one tests use (.testenv / .testenv-ci).
DIR="$ROOT/.quickstart"

if [[ "${1:-up}" == "down" ]]; then
  if [[ -f "$DIR/operator.pid" ]]; then kill "$(cat "$DIR/operator.pid")" 2>/dev/null || true; rm -f "$DIR/operator.pid"; fi
  bash scripts/testenv.sh down "$DIR"
  exit 0
fi

bash scripts/testenv.sh up "$DIR"
# shellcheck disable=SC1091
source "$DIR/env"
echo "[quickstart] building the operator"
cargo build --quiet
if [[ -f "$DIR/operator.pid" ]] && kill -0 "$(cat "$DIR/operator.pid")" 2>/dev/null; then
  kill "$(cat "$DIR/operator.pid")"; sleep 1
fi
HTTP_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# moto stands in for AWS IoT Core and the IoT Hub double (tests/azure_double) for Azure IoT Hub,
# so the AWS and Azure examples work without an account.
# Where cargo put it: CARGO_TARGET_DIR when set (a shared build cache), else target/.
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/thing-operator"
AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing KUBECONFIG="$OPERATOR_KUBECONFIG" setsid "$BIN" run \
  --http-addr "127.0.0.1:$HTTP_PORT" \
  --mqtt-url "$MQTT_URL" --mqtt-username "$MQTT_ADMIN_USER" --mqtt-password-file "$MQTT_ADMIN_PASSWORD_FILE" \
  --mqtt-device-endpoint "127.0.0.1:$MQTT_PORT" \
  --aws --aws-region us-east-1 --aws-iot-endpoint "$MOTO_URL" --aws-data-endpoint "$MOTO_URL" \
  --aws-device-endpoint "moto.local:8883" \
  --azure-connection-string-file "$AZURE_CONNECTION_STRING_FILE" --azure-hub "$AZURE_HUB" \
  --azure-endpoint "$AZURE_URL" \
  >"$DIR/logs/operator.log" 2>&1 </dev/null &
echo $! >"$DIR/operator.pid"
for _ in $(seq 1 300); do
  curl -fs "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fs "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null || { echo "operator not ready; see $DIR/logs/operator.log" >&2; exit 1; }
"$KUBECTL" apply -f examples/ >/dev/null 2>&1 || "$KUBECTL" apply --server-side -f examples/
# Wait (bounded) until every Thing has a Ready condition, then show them.
for _ in $(seq 1 150); do
  total=$("$KUBECTL" get things -o name | wc -l)
  done_=$("$KUBECTL" get things -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c . || true)
  [[ "$total" -gt 0 && "$done_" -ge "$total" ]] && break
  sleep 0.2
done
"$KUBECTL" get things,observers,subscribers
cat <<MSG

The operator runs in the background (pid $(cat "$DIR/operator.pid"), log $DIR/logs/operator.log,
metrics http://127.0.0.1:$HTTP_PORT/metrics). Try:
  source $DIR/env && \$KUBECTL get things
  scripts/quickstart.sh down
MSG
