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
import yaml  # a dependency of helm-python-sdk

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

# A bad value of an optional section is refused with a message naming the value's path.
for bad, path in (({"podDisruptionBudget": {"enabled": "yes"}}, "/podDisruptionBudget/enabled"),
                  ({"networkPolicy": {"backendPorts": [70000]}}, "/networkPolicy/backendPorts/0"),
                  ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
                  ({"dashboard": {"enabeld": True}}, "/dashboard"),
                  ({"azure": {"hubUnits": 0}}, "/azure/hubUnits"),
                  ({"statusWriteQps": 0}, "/statusWriteQps")):
    try:
        chart.validate_schema(bad)
    except Exception as e:  # noqa: BLE001
        check(path in str(e), f"refusal of {bad} does not name {path}: {e}")
        continue
    check(False, f"values.schema.json accepted {bad}")

# Every environment variable the chart sets is a flag of the binary (`run --help` lists each
# flag's env twin), with every value that sets one switched on.
EVERYTHING = {"aws": {"enabled": True, "region": "eu-west-1", "iotEndpoint": "https://iot",
                      "dataEndpoint": "https://data", "deviceEndpoint": "d:8883",
                      "push": {"enabled": True, "url": "mqtts://iot:8883", "driftInterval": "2h",
                               "rotateAfter": "240h"}},
              "azure": {"enabled": True, "hub": "h.azure-devices.net", "connectionStringSecret": "cs",
                        "hubUnits": 2, "adoptUnowned": True},
              "mqtt": {"url": "mqtts://m:8883", "passwordSecret": "p", "caSecret": "c",
                       "deviceEndpoint": "m:1883", "deviceTlsEndpoint": "m:8884"},
              "watchNamespace": "team-a", "clusterId": "c1",
              "tenancy": {"httpSinkAllowCidrs": ["10.0.0.0/8"], "httpSinkDenyCidrs": ["1.2.3.0/24"],
                          "topicGrants": ["a=feeds/x"]}}
help_text = subprocess.run([os.environ["THING_OPERATOR_BIN"], "run", "--help"], capture_output=True,
                           text=True, check=True).stdout
dep = yaml.safe_load(chart.render(EVERYTHING, name="x", namespace="x")["thing-operator/templates/deployment.yaml"])
for var in dep["spec"]["template"]["spec"]["containers"][0]["env"]:
    check(f"[env: {var['name']}=" in help_text, f"the chart sets {var['name']}, which no flag reads")

# Azure with Entra workload identity: the webhook's ServiceAccount annotation and pod label, the
# hub and the auth mode in the environment, and no connection-string Secret mounted.
WI = {"azure": {"enabled": True, "auth": "workloadIdentity", "hub": "h.azure-devices.net",
                "workloadIdentity": {"clientId": "00000000-0000-0000-0000-0000000000a1",
                                     "tenantId": "00000000-0000-0000-0000-0000000000b2"}},
      "serviceAccount": {"annotations": {"example.com/kept": "yes"}}}
chart.validate_schema(WI)
wi = chart.render(WI, name="x", namespace="x")
wi_dep = yaml.safe_load(wi["thing-operator/templates/deployment.yaml"])
wi_pod = wi_dep["spec"]["template"]
wi_env = {e["name"]: e.get("value") for e in wi_pod["spec"]["containers"][0]["env"]}
check(wi_pod["metadata"]["labels"].get("azure.workload.identity/use") == "true", f"pod labels: {wi_pod['metadata']}")
check(wi_env.get("THING_OPERATOR_AZURE_AUTH") == "workload-identity"
      and wi_env.get("THING_OPERATOR_AZURE_HUB") == "h.azure-devices.net"
      and "THING_OPERATOR_AZURE_CONNECTION_STRING_FILE" not in wi_env, f"workload identity env: {wi_env}")
for var in wi_env:
    check(f"[env: {var}=" in help_text, f"the chart sets {var}, which no flag reads")
check(not any(v["name"] == "azure-connection-string" for v in wi_pod["spec"].get("volumes") or []),
      "a connection-string volume with workload identity")
wi_sa = next(d for d in yaml.safe_load_all(wi["thing-operator/templates/rbac.yaml"])
             if d and d["kind"] == "ServiceAccount")
check(wi_sa["metadata"].get("annotations") == {
    "example.com/kept": "yes",
    "azure.workload.identity/client-id": "00000000-0000-0000-0000-0000000000a1",
    "azure.workload.identity/tenant-id": "00000000-0000-0000-0000-0000000000b2"},
    f"ServiceAccount annotations: {wi_sa['metadata']}")
check("azure.workload.identity/use" not in yaml.safe_load(
    chart.render({}, name="x", namespace="x")["thing-operator/templates/deployment.yaml"]
)["spec"]["template"]["metadata"]["labels"], "workload identity label without workload identity")
for bad in ({"azure": {"enabled": True, "auth": "workloadIdentity", "hub": "h"}},
            {"azure": {"enabled": True, "auth": "workloadIdentity",
                       "workloadIdentity": {"clientId": "00000000-0000-0000-0000-0000000000a1"}}}):
    try:
        chart.render(bad, name="x", namespace="x")
    except Exception as e:  # noqa: BLE001 - the expected refusal
        check("required" in str(e), f"refusal of {bad}: {e}")
        continue
    check(False, f"the chart rendered {bad}")
for bad in ({"azure": {"auth": "managedIdentity"}}, {"azure": {"workloadIdentity": {"clientId": "x"}}}):
    try:
        chart.validate_schema(bad)
    except Exception:  # noqa: BLE001
        continue
    check(False, f"values.schema.json accepted {bad}")

# replicas > 1 without leader election would let two replicas act at once: refused.
try:
    chart.render({"replicas": 2, "leaderElection": False}, name="x", namespace="x")
    check(False, "replicas 2 without leaderElection rendered")
except Exception:  # noqa: BLE001
    pass

# A PodDisruptionBudget that would block every drain is refused.
try:
    chart.render({"replicas": 1, "leaderElection": False, "podDisruptionBudget": {"enabled": True}},
                 name="x", namespace="x")
    check(False, "a PDB with minAvailable >= replicas rendered")
except Exception as e:  # noqa: BLE001
    check("drained" in str(e), f"unclear refusal: {e}")

# deploy/rbac.yaml (used by the test environment, so every integration test runs the operator
# under it) grants exactly what the chart grants.
def rules_of(docs, kind):
    return [d["rules"] for d in docs if d and d.get("kind") == kind]


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
          "aws": {"enabled": True, "region": "us-east-1"},
          "azure": {"enabled": True, "connectionStringSecret": "azure-hub"},
          "tenancy": {"httpSinkAllowCidrs": ["10.20.0.0/16"]},
          # Every optional template on.
          "podDisruptionBudget": {"enabled": True},
          "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
          "networkPolicy": {"enabled": True, "apiServerCidrs": ["10.0.0.1/32"],
                            "extraEgress": [{"ports": [{"port": 9000, "protocol": "TCP"}]}]},
          "dashboard": {"enabled": True, "annotations": {"grafana_folder": "IoT"}}}

# The ServiceMonitor needs the Prometheus Operator's CRD: a minimal stand-in (same group, kind and
# version, any spec), made here when the cluster has none and removed afterwards.
SM_CRD = "servicemonitors.monitoring.coreos.com"
made_sm_crd = kubectl("get", "crd", SM_CRD)[0] != 0
if made_sm_crd:
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": SM_CRD},
           "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                    "names": {"plural": "servicemonitors", "singular": "servicemonitor",
                              "kind": "ServiceMonitor", "listKind": "ServiceMonitorList"},
                    "versions": [{"name": "v1", "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": {"type": "object",
                                                                 "x-kubernetes-preserve-unknown-fields": True}}}]}}
    out = subprocess.run([os.environ["KUBECTL"], "apply", "-f", "-"], input=json.dumps(crd), capture_output=True,
                         text=True, timeout=60)
    check(out.returncode == 0, f"ServiceMonitor CRD: {out.stderr}")
    code, _, err = kubectl("wait", "--for=condition=Established", f"crd/{SM_CRD}", "--timeout=60s")
    check(code == 0, f"ServiceMonitor CRD not established: {err}")

OPTIONAL = [("poddisruptionbudget", release), ("servicemonitor", release), ("networkpolicy", release),
            ("configmap", f"{release}-dashboard")]
installed = cfg.install(chart, release, values, create_namespace=True)
try:
    notes = json.dumps(installed)
    check("kubectl wait --for=condition=Ready thing/" in notes, f"NOTES.txt does not say how to check: {notes[:300]}")
    for kind, name in OPTIONAL:
        code, _, err = kubectl("get", kind, name, "-n", namespace)
        check(code == 0, f"{kind} {name} not installed: {err}")
    code, out, _ = kubectl("get", "configmap", f"{release}-dashboard", "-n", namespace, "-o", "json")
    cm = json.loads(out)
    check(cm["metadata"]["labels"].get("grafana_dashboard") == "1", f"dashboard label: {cm['metadata']['labels']}")
    dashboard = json.loads(cm["data"]["thing-operator.json"])
    check(dashboard["uid"] == "thing-operator" and dashboard["panels"], "dashboard JSON")
    code, out, _ = kubectl("get", "poddisruptionbudget", release, "-n", namespace, "-o", "json")
    check(json.loads(out)["spec"]["minAvailable"] == 1, "PDB minAvailable")
    # policy/v1beta1 on this 1.20 control plane; offline rendering (a current version) gets policy/v1.
    pdb = chart.render(values, name=release, namespace=namespace)["thing-operator/templates/pdb.yaml"]
    check("apiVersion: policy/v1\n" in pdb, f"offline PDB is not policy/v1: {pdb[:200]}")
    code, out, _ = kubectl("get", "networkpolicy", release, "-n", namespace, "-o", "json")
    egress = json.loads(out)["spec"]["egress"]
    check(any(r.get("to") == [{"ipBlock": {"cidr": "10.0.0.1/32"}}] for r in egress), f"API server egress: {egress}")
    check(any(p.get("port") == 9000 for r in egress for p in r.get("ports", [])), f"extra egress: {egress}")
    code, out, err = kubectl("get", "deployment", release, "-n", namespace, "-o", "json")
    check(code == 0, f"deployment missing: {err}")
    dep = json.loads(out)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    # Hardened: non-root, read-only root filesystem, no privilege escalation, no capabilities,
    # the runtime's seccomp profile; probed.
    pod_sc, sc = dep["spec"]["template"]["spec"]["securityContext"], container["securityContext"]
    check(pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) > 0, f"pod securityContext: {pod_sc}")
    check(pod_sc.get("seccompProfile") == {"type": "RuntimeDefault"}, f"seccomp: {pod_sc}")
    check(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
          and sc.get("capabilities") == {"drop": ["ALL"]}, f"container securityContext: {sc}")
    check(container["livenessProbe"]["httpGet"]["path"] == "/healthz"
          and container["readinessProbe"]["httpGet"]["path"] == "/readyz", "probes")
    check(container["resources"].get("limits", {}).get("memory"), f"resources: {container['resources']}")
    env = {e["name"]: e.get("value") for e in container["env"]}
    check(env.get("THING_OPERATOR_MQTT_URL") == "mqtt://mosquitto:1883", f"mqtt env: {env}")
    check(env.get("AWS_REGION") == "us-east-1", f"aws env: {env}")
    check(env.get("THING_OPERATOR_AZURE_CONNECTION_STRING_FILE") == "/etc/thing-operator/azure/connectionString",
          f"azure env: {env}")
    check(any(v["name"] == "azure-connection-string" and v.get("secret", {}).get("secretName") == "azure-hub"
              for v in dep["spec"]["template"]["spec"]["volumes"]), "azure connection-string volume")
    check(env.get("THING_OPERATOR_LEADER_ELECT") == "true", f"leader env: {env}")
    check(env.get("THING_OPERATOR_MIN_POLL_INTERVAL") == "10s", f"tenancy env: {env}")
    check(env.get("THING_OPERATOR_HTTP_SINK_ALLOW_CIDRS") == "10.20.0.0/16", f"egress env: {env}")
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
    for kind, name in OPTIONAL:
        check(kubectl("get", kind, name, "-n", namespace)[0] == 0, f"{kind} {name} gone after upgrade")
    # Switched off on upgrade, an optional object goes.
    cfg.upgrade(chart, release, {**values, "replicas": 3, "dashboard": {"enabled": False}})
    check(kubectl("get", "configmap", f"{release}-dashboard", "-n", namespace)[0] != 0,
          "dashboard ConfigMap left after it was switched off")
finally:
    cfg.uninstall(release)
    for kind, name in OPTIONAL:
        check(kubectl("get", kind, name, "-n", namespace)[0] != 0, f"{kind} {name} left behind after uninstall")
    kubectl("delete", "namespace", namespace, "--wait=false")
    if made_sm_crd:
        kubectl("delete", "crd", SM_CRD, "--wait=false")

code, _, _ = kubectl("get", "clusterrole", release)
check(code != 0, "clusterrole left behind after uninstall")
print("chart checks passed")
