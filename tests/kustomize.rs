//! The kustomize install (deploy/) and the namespaced overlay (examples/kustomize/namespaced)
//! against the real control plane, with the kubectl built with it (1.20, kustomize 2.0).
//!
//! The base test deletes what deploy/ installs (the CRDs, the namespace thing-operator-system and
//! the operator's RBAC, which every other test stands on) and then reinstalls them as
//! `scripts/testenv.sh up` did, so the two tests here take one lock, and this is a test binary of
//! its own (cargo runs test binaries one after another).

mod common;

use std::{path::Path, process::Command};

use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Secret, ServiceAccount},
};
use kube::{
    Api, Client, Config,
    api::{ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::Deserialize;
use serde_json::{Value, json};
use thing_operator::api::Thing;

use common::{Setup, TestEnv, thing};

/// The two tests change cluster-wide objects (CRDs, the operator's namespace): one at a time.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TEST_OVERLAY: &str = "tests/kustomize/k8s-1.20";
const NAMESPACED: &str = "examples/kustomize/namespaced";
const TEAM_NS: &str = "thing-operator-team-a";
const KINDS: [&str; 4] = ["things", "observers", "subscribers", "brokerconnections"];

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

/// kubectl as admin: (success, stdout, stderr).
fn kubectl(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env.var("KUBECTL"))
        .args(args)
        .env("KUBECONFIG", env.var("KUBECONFIG"))
        .output()
        .expect("kubectl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kustomize(env: &TestEnv, dir: &str) -> Vec<Value> {
    let yaml = env.kubectl(&["kustomize", &repo(dir)]);
    serde_yaml::Deserializer::from_str(&yaml)
        .map(Value::deserialize)
        .collect::<Result<Vec<_>, _>>()
        .expect("kustomize output is YAML")
}

fn strip_cel(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.remove("x-kubernetes-validations");
            map.values_mut().for_each(strip_cel);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_cel),
        _ => {}
    }
}

fn sorted(mut objects: Vec<Value>) -> Vec<Value> {
    objects.sort_by_key(|o| {
        format!(
            "{}/{}/{}",
            o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]
        )
    });
    objects
}

/// Every object the test overlay installed, as the API server has it (all fields).
fn live(env: &TestEnv) -> Vec<Value> {
    let out = env.kubectl(&["get", "-k", &repo(TEST_OVERLAY), "-o", "json"]);
    let list: Value = serde_json::from_str(&out).expect("kubectl get -o json");
    sorted(list["items"].as_array().cloned().unwrap_or_default())
}

/// Reinstalls what `scripts/testenv.sh up` installs, when dropped (also when the test fails).
struct RestoreTestEnv(TestEnv);

impl Drop for RestoreTestEnv {
    fn drop(&mut self) {
        self.0.script("install-manifests");
    }
}

/// Objects of this project's kinds left by earlier test binaries whose operators are gone keep
/// their finalizers forever, and a CRD is only deleted once its objects are: release them.
fn release_leftovers(env: &TestEnv) {
    for kind in KINDS {
        let (_, out, _) = kubectl(env, &["get", kind, "-A", "-o", "json"]);
        let list: Value = serde_json::from_str(&out).unwrap_or(json!({"items": []}));
        for item in list["items"].as_array().into_iter().flatten() {
            let (ns, name) = (
                item["metadata"]["namespace"].as_str().unwrap_or_default(),
                item["metadata"]["name"].as_str().unwrap_or_default(),
            );
            kubectl(
                env,
                &[
                    "patch",
                    kind,
                    name,
                    "-n",
                    ns,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ],
            );
        }
    }
}

#[tokio::test]
async fn deploy_applies_server_side_idempotently_and_deletes() {
    let _cluster = CLUSTER.lock().await;
    let env = TestEnv::load();

    // The test overlay is deploy/ minus the CEL rules 1.20 refuses under server-side apply, and
    // nothing else.
    let overlay = sorted(kustomize(&env, TEST_OVERLAY));
    let mut base = sorted(kustomize(&env, "deploy"));
    base.iter_mut().for_each(strip_cel);
    assert_eq!(
        overlay, base,
        "{TEST_OVERLAY} differs from deploy/ beyond CEL"
    );
    let kinds: Vec<&str> = overlay.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(&kind), "deploy/ has no {kind}: {kinds:?}");
    }

    let _restore = RestoreTestEnv(env.clone());
    let dir = repo(TEST_OVERLAY);
    env.kubectl(&["apply", "--server-side", "-k", &dir]);
    let first = live(&env);
    assert_eq!(first.len(), overlay.len(), "not every object was installed");

    // A second apply (what a GitOps tool does on every sync) changes no field of any object:
    // not even resourceVersion or managedFields.
    env.kubectl(&["apply", "--server-side", "-k", &dir]);
    let second = live(&env);
    assert_eq!(first, second, "a second server-side apply changed objects");

    release_leftovers(&env);
    env.kubectl(&["delete", "-k", &dir, "--timeout=120s"]);
    let (_, left, _) = kubectl(
        &env,
        &["get", "-k", &dir, "--ignore-not-found", "-o", "name"],
    );
    assert_eq!(left.trim(), "", "left behind by kubectl delete -k");
}

/// Every overlay builds, and every environment variable a Deployment of theirs sets is read by a
/// flag of the binary (`run --help` lists each flag's env twin).
#[test]
fn overlays_build_and_set_only_real_flags() {
    let env = TestEnv::load();
    let help = Command::new(env!("CARGO_BIN_EXE_thing-operator"))
        .args(["run", "--help"])
        .output()
        .expect("thing-operator runs");
    let help = String::from_utf8_lossy(&help.stdout);
    for dir in ["deploy", NAMESPACED, "examples/kustomize/aws-irsa"] {
        let objects = kustomize(&env, dir);
        let deployment = objects
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .unwrap_or_else(|| panic!("{dir} has no Deployment"));
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        for var in container["env"].as_array().unwrap() {
            let name = var["name"].as_str().unwrap();
            assert!(
                help.contains(&format!("[env: {name}=")),
                "{dir} sets {name}, which no flag reads"
            );
        }
        if dir.ends_with("aws-irsa") {
            let account = objects
                .iter()
                .find(|o| o["kind"] == "ServiceAccount")
                .unwrap();
            assert!(
                account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].is_string(),
                "{account}"
            );
            assert!(
                container["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["name"] == "THING_OPERATOR_AWS" && v["value"] == "true")
            );
        }
    }
}

/// A client and a kubeconfig file for a bound token of `namespace/name` (TokenRequest).
async fn service_account_client(
    env: &TestEnv,
    admin: &Client,
    namespace: &str,
    name: &str,
) -> (Client, tempfile::NamedTempFile) {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 3600}
    }))
    .unwrap();
    let token = accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("token request")
        .status
        .expect("token issued")
        .token;
    let admin_config = std::fs::read_to_string(env.var("KUBECONFIG")).unwrap();
    let server = admin_config
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("server in the admin kubeconfig");
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster: {{server: {server}, insecure-skip-tls-verify: true}}\nusers:\n- name: sa\n  user: {{token: {token}}}\ncontexts:\n- name: local\n  context: {{cluster: local, user: sa, namespace: {namespace}}}\ncurrent-context: local\n"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), kubeconfig).unwrap();
    let kc = Kubeconfig::read_from(file.path()).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    (Client::try_from(config).unwrap(), file)
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

/// Deletes the team namespace when dropped, without waiting.
struct DeleteNamespace(TestEnv);

impl Drop for DeleteNamespace {
    fn drop(&mut self) {
        kubectl(
            &self.0,
            &[
                "delete",
                "namespace",
                TEAM_NS,
                "--ignore-not-found",
                "--wait=false",
            ],
        );
    }
}

#[tokio::test]
async fn namespaced_overlay_reconciles_its_namespace_and_is_refused_elsewhere() {
    let _cluster = CLUSTER.lock().await;
    // The namespace the overlay's operator must not reach.
    let s = Setup::new("kz-outside").await;
    let env = s.env.clone();
    // A run that failed may have left the team namespace behind.
    release_leftovers(&env);
    kubectl(
        &env,
        &[
            "delete",
            "namespace",
            TEAM_NS,
            "--ignore-not-found",
            "--timeout=120s",
        ],
    );

    // The overlay's Role grants exactly deploy/rbac.yaml's ClusterRole rules, and no
    // cluster-wide RBAC is part of it.
    let objects = kustomize(&env, NAMESPACED);
    let of_kind = |kind: &str| -> Vec<&Value> {
        objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .collect::<Vec<_>>()
    };
    assert!(of_kind("ClusterRole").is_empty() && of_kind("ClusterRoleBinding").is_empty());
    assert!(of_kind("CustomResourceDefinition").is_empty());
    let cluster_rules = kustomize(&env, "deploy")
        .into_iter()
        .find(|o| o["kind"] == "ClusterRole")
        .expect("deploy/ has a ClusterRole")["rules"]
        .clone();
    let role = of_kind("Role")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "thing-operator")
        .expect("the overlay's Role");
    assert_eq!(role["rules"], cluster_rules, "Role and ClusterRole differ");
    assert!(
        objects
            .iter()
            .all(|o| o["kind"] == "Namespace" || o["metadata"]["namespace"] == TEAM_NS)
    );

    let _cleanup = DeleteNamespace(env.clone());
    env.kubectl(&["apply", "--server-side", "-k", &repo(NAMESPACED)]);
    let (operator, kubeconfig) =
        service_account_client(&env, &s.client, TEAM_NS, "thing-operator").await;

    // Run the binary the way the overlay's Deployment does: its args and env, with the
    // downward-API fields resolved as the kubelet would, under the overlay's service account;
    // plus the test broker (the overlay configures no backend).
    let deployment = of_kind("Deployment")[0];
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"], json!(["run"]));
    let mut builder = common::OperatorBuilder::new(&env, TEAM_NS)
        .cluster_wide() // no --watch-namespace from the harness: the Deployment's env decides
        .mqtt("kz")
        .env("KUBECONFIG", kubeconfig.path().display().to_string());
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.namespace") => TEAM_NS.to_string(),
            Some("metadata.name") => "thing-operator-0".to_string(),
            Some(other) => panic!("unexpected fieldRef {other}"),
            None => var["value"].as_str().unwrap().to_string(),
        };
        builder = builder.env(name, value);
    }
    let op = builder.ready().await;

    // It reconciles a Thing in its namespace.
    let team_things: Api<Thing> = Api::namespaced(s.client.clone(), TEAM_NS);
    thing("lamp")
        .broker("Mosquitto")
        .desired(json!({"on": true}))
        .create(&team_things)
        .await;
    s.wait_ready(&team_things, "lamp").await;

    // Outside its namespace the API server refuses its account every verb the operator uses.
    let outside_things: Api<Thing> = Api::namespaced(operator.clone(), &s.ns);
    thing("stranger").create(&s.things()).await;
    assert!(forbidden(outside_things.list(&ListParams::default()).await));
    assert!(forbidden(outside_things.get("stranger").await));
    let patch = Patch::Merge(json!({"metadata": {"finalizers": ["x"]}}));
    assert!(forbidden(
        outside_things
            .patch("stranger", &PatchParams::default(), &patch)
            .await
    ));
    assert!(forbidden(
        outside_things
            .patch_status(
                "stranger",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {}}))
            )
            .await
    ));
    let outside_secrets: Api<Secret> = Api::namespaced(operator.clone(), &s.ns);
    assert!(forbidden(outside_secrets.get("anything").await));
    assert!(forbidden(
        Api::<Thing>::all(operator.clone())
            .list(&ListParams::default())
            .await
    ));
    // ... while in its own namespace the same account is allowed.
    let own: Api<Thing> = Api::namespaced(operator, TEAM_NS);
    assert_eq!(
        own.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );

    // Leave nothing behind: the operator removes its device before the namespace goes.
    team_things
        .delete("lamp", &Default::default())
        .await
        .unwrap();
    s.wait_gone(&team_things, "lamp").await;
    drop(op);
}
