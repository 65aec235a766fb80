"""Installs, upgrades and uninstalls the Helm chart against the real local control plane.

Run by tests/helm_chart.rs with KUBECONFIG (admin) and KUBECTL set. Exits non-zero with a
message on the first failed check.
"""
import json
import os
import random
import subprocess
import sys

import helm_python

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "charts", "thing-operator")


def kubectl(*args):
    out = subprocess.run([os.environ["KUBECTL"], *args], capture_output=True, text=True,
                         env={**os.environ}, timeout=60)
    return out.returncode, out.stdout, out.stderr


def check(cond, msg):
    if not cond:
        print(f"FAIL: {msg}", file=sys.stderr)
        sys.exit(1)


chart = helm_python.Chart.load(CHART)

# The schema refuses what the operator would refuse at start-up.
for bad in ({"logFormat": "xml"}, {"resyncInterval": "soon"}, {"mqtt": {"url": "http://x"}},
            {"unknownKey": 1}):
    try:
        chart.validate_schema(bad)
    except Exception:  # noqa: BLE001 - any refusal is the expected outcome
        continue
    check(False, f"values.schema.json accepted {bad}")
chart.validate_schema({"aws": {"enabled": True, "region": "eu-west-1"}})

# replicas > 1 without leader election would let two replicas act at once: refused.
try:
    chart.render({"replicas": 2, "leaderElection": False}, name="x", namespace="x")
    check(False, "replicas 2 without leaderElection rendered")
except Exception:  # noqa: BLE001
    pass

# deploy/rbac.yaml (used by the test environment, so every integration test runs the operator
# under it) grants exactly what the chart grants.
def rules_of(docs, kind):
    return [d["rules"] for d in docs if d and d.get("kind") == kind]


import yaml  # noqa: E402 - a dependency of helm-python-sdk

chart_rbac = list(yaml.safe_load_all(chart.render({}, name="x", namespace="x")["thing-operator/templates/rbac.yaml"]))
with open(os.path.join(ROOT, "deploy", "rbac.yaml")) as f:
    deploy_rbac = list(yaml.safe_load_all(f))
check(rules_of(chart_rbac, "ClusterRole") == rules_of(deploy_rbac, "ClusterRole"),
      "deploy/rbac.yaml and the chart's ClusterRole differ")

# With watchNamespace the operator gets a Role in that namespace, no cluster-wide grant.
scoped = list(yaml.safe_load_all(
    chart.render({"watchNamespace": "team-a"}, name="x", namespace="x")["thing-operator/templates/rbac.yaml"]))
kinds = sorted((d["kind"], d["metadata"].get("namespace", "")) for d in scoped if d)
check(not any(k in ("ClusterRole", "ClusterRoleBinding") for k, _ in kinds), f"cluster-wide RBAC with watchNamespace: {kinds}")
check(("Role", "team-a") in kinds and ("RoleBinding", "team-a") in kinds, f"no Role in the watched namespace: {kinds}")

release = f"thop-{random.randrange(16**6):06x}"
namespace = f"helm-{release}"
cfg = helm_python.Config(kubeconfig_path=os.environ["KUBECONFIG"], namespace=namespace)
# The test control plane (1.20) already has the CRDs and refuses CEL fields under server-side
# apply, so the chart's CRD templates are switched off here; they are checked offline below.
rendered = chart.render({}, name="x", namespace="x")
check("kind: CustomResourceDefinition" in rendered.get("thing-operator/templates/crds.yaml", ""),
      f"CRDs not rendered by default: {list(rendered)}")
check("helm.sh/resource-policy: keep" in rendered["thing-operator/templates/crds.yaml"], "CRDs not kept")
values = {"crds": {"enabled": False}, "mqtt": {"url": "mqtt://mosquitto:1883", "passwordSecret": "mqtt-admin"},
          "aws": {"enabled": True, "region": "us-east-1"}}
cfg.install(chart, release, values, create_namespace=True)
try:
    code, out, err = kubectl("get", "deployment", release, "-n", namespace, "-o", "json")
    check(code == 0, f"deployment missing: {err}")
    dep = json.loads(out)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    check(env.get("THING_OPERATOR_MQTT_URL") == "mqtt://mosquitto:1883", f"mqtt env: {env}")
    check(env.get("AWS_REGION") == "us-east-1", f"aws env: {env}")
    check(env.get("THING_OPERATOR_LEADER_ELECT") == "true", f"leader env: {env}")
    check(dep["spec"]["template"]["spec"]["serviceAccountName"] == release, "service account")
    code, _, err = kubectl("get", "clusterrole", release)
    check(code == 0, f"clusterrole missing: {err}")
    # The chart's RBAC lets the operator do its job and nothing more.
    sa = f"system:serviceaccount:{namespace}:{release}"
    for verb, res, want in [("patch", "things.iot.thing-operator.dev/status", "yes"),
                            ("create", "secrets", "yes"),
                            ("create", "events.events.k8s.io", "yes"),
                            ("delete", "things.iot.thing-operator.dev", "no"),
                            ("list", "secrets", "no"),
                            ("watch", "secrets", "no"),
                            ("delete", "secrets", "no"),
                            ("update", "secrets", "no"),
                            ("create", "pods", "no")]:
        code, out, _ = kubectl("auth", "can-i", verb, res, "--as", sa, "-n", "default")
        check(out.strip() == want, f"can-i {verb} {res}: {out.strip()} (want {want})")

    cfg.upgrade(chart, release, {**values, "replicas": 3})
    code, out, _ = kubectl("get", "deployment", release, "-n", namespace, "-o", "jsonpath={.spec.replicas}")
    check(out == "3", f"upgrade did not apply replicas: {out}")
finally:
    cfg.uninstall(release)
    kubectl("delete", "namespace", namespace, "--wait=false")

code, _, _ = kubectl("get", "clusterrole", release)
check(code != 0, "clusterrole left behind after uninstall")
print("chart checks passed")
