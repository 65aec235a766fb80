# Shared settings of the thing-operator forwarder scripts (sourced).
#   THING_OPERATOR_REPO : checkout of thing-operator to measure (default: the checkout this directory is in); never modified
#   THING_OPERATOR_BIN  : operator binary (default ${CARGO_TARGET_DIR:-$THING_OPERATOR_REPO/target}/release/thing-operator)
#   NRBENCH_STATE       : generated passwords and the dynsec template (default /tmp/nrbench/state)
#   NRBENCH_CP          : control plane made by the operator's scripts/testenv.sh (default /tmp/nrbench/cp)
#   NRBENCH_NS          : namespace of the benchmark Things and Observer (default nrbench)
#   NRBENCH_DEVICES     : number of Things, dev-0000.. (default 100, as the load generator)
#   NRBENCH_OPERATOR_HTTP : the benchmark operator's /metrics address (default 127.0.0.1:18092)
# `pwd -P`: this directory is linked into the harness copy; the checkout is where it really is.
REPO="${THING_OPERATOR_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && cd "$(pwd -P)/../.." && pwd)}"
BIN="${THING_OPERATOR_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/thing-operator}"
STATE="${NRBENCH_STATE:-/tmp/nrbench/state}"
CP="${NRBENCH_CP:-/tmp/nrbench/cp}"
NS="${NRBENCH_NS:-nrbench}"
DEVICES="${NRBENCH_DEVICES:-100}"
OPERATOR_HTTP="${NRBENCH_OPERATOR_HTTP:-127.0.0.1:18092}"
# Only the kubeconfig paths and kubectl of the control plane: its env file also sets MQTT_PORT
# (its own broker), which must not replace the benchmark broker's.
cp_var() { (set +u; source "$CP/env" >/dev/null 2>&1; eval "printf '%s' \"\${$1}\""); }
