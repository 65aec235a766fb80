//! Reconciling again changes nothing: no AWS write, no status write, no Secret write, the same
//! state in moto; also after a restart of the operator (empty memory, full checks).
//! Covers both credential sources; the CloudIssued Thing also goes through deletion. And the
//! other side of it (issue 11): a Thing never provisioned costs six cloud calls, none of them a
//! read, and the reconciles its own Secret and status writes trigger cost none.

mod aws_support;
mod common;

use aws_support::*;
use common::{OperatorProcess, Setup, merge_patch, thing};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::DeleteParams};
use serde_json::json;
use thing_operator::api::Thing;

const WRITE_OPS: &[&str] = &[
    "CreateThing",
    "UpdateThing",
    "DeleteThing",
    "CreatePolicy",
    "CreatePolicyVersion",
    "DeletePolicyVersion",
    "DeletePolicy",
    "AttachPolicy",
    "DetachPolicy",
    "AttachThingPrincipal",
    "DetachThingPrincipal",
    "RegisterCertificateWithoutCA",
    "CreateKeysAndCertificate",
    "UpdateCertificate",
    "DeleteCertificate",
    "UpdateThingShadow",
    "DeleteThingShadow",
];

async fn aws_writes(op: &OperatorProcess) -> f64 {
    let mut sum = 0.0;
    for w in WRITE_OPS {
        let filter = format!("operation=\"{w}\"");
        sum += op
            .metric(
                "thing_operator_backend_calls_total",
                &["backend=\"aws\"", &filter],
            )
            .await;
    }
    sum
}

async fn reconciles(op: &OperatorProcess) -> f64 {
    op.metric(
        "thing_operator_reconciles_total",
        &["kind=\"Thing\"", "outcome=\"ok\""],
    )
    .await
}

async fn status_writes(op: &OperatorProcess) -> f64 {
    op.metric("thing_operator_status_writes_total", &["kind=\"Thing\""])
        .await
}

/// Everything about one Thing that a write would change, in moto and in Kubernetes.
async fn snapshot(s: &Setup, name: &str) -> String {
    let iot = iot(&s.env);
    let data = data(&s.env);
    let thing_name = format!("{}_{name}", s.ns);
    let d = iot
        .describe_thing()
        .thing_name(&thing_name)
        .send()
        .await
        .unwrap();
    let p = iot
        .get_policy()
        .policy_name(format!("{thing_name}-policy"))
        .send()
        .await
        .unwrap();
    let principals = thing_principals(&iot, &thing_name).await;
    let mut certs = Vec::new();
    for arn in principals {
        let id = arn.rsplit('/').next().unwrap();
        certs.push(format!("{id}={:?}", cert_status(&iot, id).await));
    }
    let sh = shadow(&data, &thing_name).await.unwrap();
    let secrets: Api<Secret> = s.api();
    let secret_rv = secrets
        .get(&format!("{name}-device"))
        .await
        .unwrap()
        .metadata
        .resource_version;
    let things: Api<Thing> = s.api();
    let thing_rv = things.get(name).await.unwrap().metadata.resource_version;
    format!(
        "attrs={:?} thing_version={} policy_version={:?} certs={certs:?} shadow_version={} secret_rv={secret_rv:?} thing_rv={thing_rv:?}",
        d.attributes()
            .map(|a| a.iter().collect::<std::collections::BTreeMap<_, _>>()),
        d.version(),
        p.default_version_id(),
        sh["version"],
    )
}

#[tokio::test]
async fn reconciling_again_changes_nothing() {
    let s = setup("aws-idem").await;
    let mut op = s.operator().aws().ready().await;
    let api = s.things();
    let spec = |source: &str| {
        json!({
            "broker": "AWS",
            "attributes": {"model": "rpi4", "site": "a"},
            "desired": {"temp": 26, "mode": {"fan": "auto"}},
            "credentials": {"source": source},
            "shadow": {"pollInterval": "1s"}
        })
    };
    thing("incluster")
        .spec(spec("InCluster"))
        .create(&api)
        .await;
    thing("cloud").spec(spec("CloudIssued")).create(&api).await;
    s.wait_ready(&api, "incluster").await;
    s.wait_ready(&api, "cloud").await;

    // The CloudIssued key is stored and matches its certificate (openssl: moto's keys are PKCS#1).
    let secret = secret_data(&s.client, &s.ns, "cloud-device").await.unwrap();
    assert!(secret["tls.key"].contains("PRIVATE KEY"));
    assert!(!secret.contains_key("pendingCertificateSince"));
    assert_eq!(
        key_modulus(&secret["tls.key"], true),
        key_modulus(&secret["tls.crt"], false)
    );

    // Let the status settle (the first reconciles write conditions), then look.
    let settle = reconciles(&op).await;
    s.wait_for("a few reconciles", || async {
        (reconciles(&op).await >= settle + 2.0).then_some(())
    })
    .await;
    let before = (snapshot(&s, "incluster").await, snapshot(&s, "cloud").await);
    let (writes, statuses, count) = (
        aws_writes(&op).await,
        status_writes(&op).await,
        reconciles(&op).await,
    );
    assert!(
        writes >= 10.0,
        "provisioning two Things took only {writes} AWS writes: is the metric counted?"
    );
    // Resync is 2s: eight more reconciles include several full drift checks of each Thing.
    s.wait_for("eight more reconciles", || async {
        (reconciles(&op).await >= count + 8.0).then_some(())
    })
    .await;
    assert_eq!(
        aws_writes(&op).await,
        writes,
        "an idle reconcile wrote to AWS"
    );
    assert_eq!(
        status_writes(&op).await,
        statuses,
        "an idle reconcile wrote status"
    );
    let after = (snapshot(&s, "incluster").await, snapshot(&s, "cloud").await);
    assert_eq!(before, after);

    // A new process knows nothing: it runs full checks and still writes nothing.
    op.terminate();
    let op2 = s.operator().aws().ready().await;
    s.wait_for("restarted operator reconciled both", || async {
        (reconciles(&op2).await >= 6.0).then_some(())
    })
    .await;
    assert_eq!(aws_writes(&op2).await, 0.0, "a restart wrote to AWS");
    assert_eq!(status_writes(&op2).await, 0.0, "a restart wrote status");
    let after_restart = (snapshot(&s, "incluster").await, snapshot(&s, "cloud").await);
    assert_eq!(before, after_restart);

    // CloudIssued teardown leaves nothing behind either.
    let iot = iot(&s.env);
    let cloud_cert = secret["certificateId"].clone();
    for name in ["incluster", "cloud"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["incluster", "cloud"] {
        s.wait_gone(&api, name).await;
        let thing_name = format!("{}_{name}", s.ns);
        assert!(!thing_exists(&iot, &thing_name).await);
        assert!(!policy_exists(&iot, &format!("{thing_name}-policy")).await);
    }
    assert!(cert_status(&iot, &cloud_cert).await.is_none());
    drop(op2);
}

/// The RSA modulus of a PEM key or certificate, through openssl (independent of the operator).
fn key_modulus(pem: &str, is_key: bool) -> String {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(pem.as_bytes()).unwrap();
    let kind = if is_key { "rsa" } else { "x509" };
    let out = std::process::Command::new("openssl")
        .args([kind, "-noout", "-modulus", "-in"])
        .arg(f.path())
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {kind}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn a_changed_thing_name_is_refused_not_leaked() {
    let s = setup("aws-rename").await;
    let op = s.operator().aws().ready().await;
    let api = s.things();
    let tn = format!("{}_first", s.ns);
    thing("dev")
        .broker("AWS")
        .field("thingName", json!(tn))
        .create(&api)
        .await;
    s.wait_ready(&api, "dev").await;
    let iot = iot(&s.env);
    let patch = json!({"spec": {"thingName": format!("{tn}-second")}});
    merge_patch(&api, "dev", patch).await;
    s.wait_condition(&api, "dev", "Ready", |c| c.reason == "BackendRejected")
        .await;
    assert!(thing_exists(&iot, &tn).await);
    assert!(!thing_exists(&iot, &format!("{tn}-second")).await);
    // Deleting still removes what was provisioned, under the recorded name.
    api.delete("dev", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "dev").await;
    assert!(!thing_exists(&iot, &tn).await);
    drop(op);
}

/// AWS calls so far by operation (`thing_operator_backend_calls_total`).
async fn calls_by_operation(op: &OperatorProcess) -> std::collections::BTreeMap<String, f64> {
    let (_, body) = op.get("/metrics").await.expect("metrics served");
    let mut calls = std::collections::BTreeMap::new();
    for line in body.lines().filter(|l| {
        l.starts_with("thing_operator_backend_calls_total{") && l.contains("backend=\"aws\"")
    }) {
        let operation = line
            .split("operation=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default();
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        *calls.entry(operation.to_string()).or_default() += value;
    }
    calls
}

#[tokio::test]
async fn provisioning_writes_first_and_its_own_writes_cost_no_call() {
    let s = setup("aws-six").await;
    // No drift check and no poll falls into the test: every call is provisioning's or a
    // reconcile's that the operator's own writes triggered.
    let op = s.operator().aws_resync("1h").ready().await;
    let api = s.things();
    thing("lamp")
        .spec(json!({
            "broker": "AWS",
            "attributes": {"model": "rpi4"},
            "desired": {"temp": 26},
            "shadow": {"pollInterval": "1h"}
        }))
        .create(&api)
        .await;
    s.wait_ready(&api, "lamp").await;
    // The finalizer and provisioning (one reconcile), and at least one reconcile queued by the
    // finalizer, Secret and status writes of provisioning.
    s.wait_for("the reconciles of the operator's own writes", || async {
        (reconciles(&op).await >= 2.0).then_some(())
    })
    .await;
    let calls = calls_by_operation(&op).await;
    let want: std::collections::BTreeMap<String, f64> = [
        "CreateThing",
        "CreatePolicy",
        "RegisterCertificateWithoutCA",
        "AttachPolicy",
        "AttachThingPrincipal",
        "UpdateThingShadow",
    ]
    .into_iter()
    .map(|o| (o.to_string(), 1.0))
    .collect();
    assert_eq!(calls, want, "after {} reconciles", reconciles(&op).await);
    // Status took the shadow as the first write left it: the delta is the whole desired state.
    let t = api.get("lamp").await.unwrap();
    let status = t.status.unwrap();
    assert_eq!(status.version, Some(1));
    assert_eq!(
        status.delta.map(|d| d.0),
        json!({"temp": 26}).as_object().cloned()
    );
    api.delete("lamp", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "lamp").await;
    assert!(!thing_exists(&iot(&s.env), &format!("{}_lamp", s.ns)).await);
    drop(op);
}
