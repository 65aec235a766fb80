//! GitOps and the operator writing the same `spec.desired` (docs/operations.md, "GitOps"): a
//! Thing's Git manifest re-applied the way a GitOps tool does, client-side (`kubectl apply`, Argo
//! CD's default) and server-side (`kubectl apply --server-side`, Flux, Argo CD with
//! ServerSideApply), after a Subscriber wrote a key into the same Thing, changes nothing the
//! operator wrote; and a change in Git lands and is not undone by the operator.

mod common;

use std::time::Duration;

use common::{Setup, create_resource};
use kube::Api;
use serde_json::{Value, json};
use thing_operator::api::{Subscriber, Thing};

/// The Thing as it is in Git.
fn manifest(name: &str, brightness: u32) -> String {
    format!(
        "apiVersion: iot.thing-operator.dev/v1alpha1\nkind: Thing\nmetadata:\n  name: {name}\n  labels: {{team: lights}}\nspec:\n  broker: Mosquitto\n  desired:\n    mode: auto\n    brightness: {brightness}\n"
    )
}

/// `kubectl apply` of `yaml` in the test's namespace (`extra` selects server-side).
fn apply(s: &Setup, yaml: &str, extra: &[&str]) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    let path = file.path().display().to_string();
    let mut args = vec!["apply", "-n", &s.ns, "-f", &path];
    args.extend_from_slice(extra);
    s.env.kubectl(&args)
}

async fn post(port: u16, path: &str, body: Value) -> u16 {
    reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{path}"))
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("operator answers")
        .status()
        .as_u16()
}

async fn desired(s: &Setup, name: &str, check: impl Fn(&Value) -> bool) -> Thing {
    s.wait_until(&s.things(), name, "spec.desired", |t: &Thing| {
        check(&serde_json::to_value(&t.spec.desired).unwrap())
    })
    .await
}

/// What an apply may change: spec, labels, annotations, and the field managers' records except
/// the operator's status writes (which go on by themselves, and bump the resourceVersion).
fn applied_view(t: &Thing) -> Value {
    let managed: Vec<Value> = t
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() != Some("thing-operator"))
        .map(|m| serde_json::to_value(m).unwrap())
        .collect();
    json!({
        "spec": t.spec,
        "labels": t.metadata.labels,
        "annotations": t.metadata.annotations,
        "managedFields": managed,
    })
}

/// The fields of `spec.desired` each field manager owns.
fn owners(t: &Thing) -> Vec<(String, Vec<String>)> {
    t.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| {
            let fields = m.fields_v1.as_ref()?.0.clone();
            let desired = fields.pointer("/f:spec/f:desired")?.as_object()?;
            let keys = desired.keys().filter(|k| k.starts_with("f:")).cloned();
            Some((m.manager.clone()?, keys.collect()))
        })
        .collect()
}

async fn git_and_subscriber_coexist(s: &Setup, port: u16, name: &str, server_side: bool) {
    let how: &[&str] = if server_side {
        &["--server-side", "--field-manager", "gitops"]
    } else {
        &[]
    };
    apply(s, &manifest(name, 50), how);
    s.wait_ready(&s.things(), name).await;
    let subs: Api<Subscriber> = s.api();
    create_resource(
        &subs,
        name,
        json!({
            "source": {"http": {"path": name}},
            "target": {"thingName": name, "field": "Desired", "path": "/schedule"},
        }),
    )
    .await;
    s.wait_condition(&subs, name, "Ready", |c| c.reason == "Running")
        .await;
    let path = format!("/subscribers/{}/{name}", s.ns);
    assert_eq!(post(port, &path, json!({"at": "07:00"})).await, 202);
    let written = desired(s, name, |d| d["schedule"] == json!({"at": "07:00"})).await;
    assert!(
        owners(&written)
            .iter()
            .any(|(m, keys)| m == "thing-operator-desired" && keys == &["f:schedule"]),
        "the Subscriber's key is owned by its own field manager: {:?}",
        owners(&written)
    );

    // The unchanged Git manifest re-applied: nothing changes (not even a field manager's
    // timestamp).
    apply(s, &manifest(name, 50), how);
    let after: Thing = s.things().get(name).await.unwrap();
    assert_eq!(
        applied_view(&after),
        applied_view(&written),
        "re-applying the unchanged manifest changed the Thing"
    );

    // A change in Git lands next to the operator's key ...
    apply(s, &manifest(name, 80), how);
    let changed = desired(s, name, |d| {
        d["brightness"] == 80 && d["schedule"] == json!({"at": "07:00"})
    })
    .await;
    // ... the operator reconciles that generation without undoing it ...
    let generation = changed.metadata.generation;
    s.wait_until(
        &s.things(),
        name,
        "the new generation reconciled",
        |t: &Thing| t.status.as_ref().and_then(|st| st.observed_generation) == generation,
    )
    .await;
    // ... and its next write changes only its own key.
    assert_eq!(post(port, &path, json!({"at": "08:00"})).await, 202);
    let last = desired(s, name, |d| d["schedule"] == json!({"at": "08:00"})).await;
    let d = serde_json::to_value(&last.spec.desired).unwrap();
    assert_eq!(d["brightness"], 80, "{d}");
    assert_eq!(d["mode"], "auto", "{d}");

    // Git re-applied once more: still nothing of the operator's is touched.
    apply(s, &manifest(name, 80), how);
    let again: Thing = s.things().get(name).await.unwrap();
    assert_eq!(applied_view(&again), applied_view(&last));
}

#[tokio::test]
async fn git_reapply_keeps_subscriber_keys_and_the_operator_keeps_git_keys() {
    let s = Setup::new("gitops").await;
    let op = s.operator().mqtt("gitops").ready().await;
    git_and_subscriber_coexist(&s, op.http_port, "lamp-client-side", false).await;
    git_and_subscriber_coexist(&s, op.http_port, "lamp-server-side", true).await;
}
