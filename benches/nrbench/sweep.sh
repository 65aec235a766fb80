#!/usr/bin/env bash
# bench.py sweep for the thing-operator forwarder, with the flags it needs; extra arguments are
# passed on (e.g. --rates 1000,2000 --warmup 20 --duration 20 --label x). Run setup.sh first.
#   broker : broker/dynsec-broker.sh (fresh broker + pristine dynsec.json per rate)
#   loadgen: as user "gateway", topic $aws/things/<ns>_dev-NNNN/shadow/update (the $aws alias of
#            each Thing's status.device.thingName), payload {"state":{"reported":{...}}}
#   expect : the harness's default (90 %: the Observer's `state.temp > 20.0` filter keeps what
#            Node-RED's switch keeps)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BENCH="$(cd "$HERE/../.." && pwd)"
source "$HERE/common.sh"
cd "$BENCH"
exec python3 bench.py sweep --forwarder "$(basename "$HERE")" \
  --broker-cmd broker/dynsec-broker.sh \
  --sys-auth "thing-operator:$STATE/admin-password" \
  --loadgen-args "--username gateway --password-file $STATE/gateway-password --topic-template '\$aws/things/${NS}_dev-{dev}/shadow/update' --payload-template '{\"state\":{\"reported\":{msg}}}'" \
  "$@"
