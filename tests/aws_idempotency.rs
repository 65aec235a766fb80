//! Reconciling again changes nothing: no AWS write, no status write, no Secret write, the same
//! state in moto; also after a restart of the operator (empty memory, full checks).
//! Covers both credential sources; the CloudIssued Thing also goes through deletion.

mod aws_support;
mod common;

use aws_support::*;
use common::{OperatorProcess, TestEnv, create_namespace, delete_namespace, wait_for};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
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
async fn snapshot(env: &TestEnv, client: &Client, ns: &str, name: &str) -> String {
    let iot = iot(env);
    let data = data(env);
    let thing_name = format!("{ns}_{name}");
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
    let principals = iot
        .list_thing_principals()
        .thing_name(&thing_name)
        .send()
        .await
        .unwrap();
    let mut certs = Vec::new();
    for arn in principals.principals() {
        let id = arn.rsplit('/').next().unwrap();
        certs.push(format!("{id}={:?}", cert_status(&iot, id).await));
    }
    let sh = shadow(&data, &thing_name).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret_rv = secrets
        .get(&format!("{name}-device"))
        .await
        .unwrap()
        .metadata
        .resource_version;
    let things: Api<Thing> = Api::namespaced(client.clone(), ns);
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
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "aws-idem").await;
    let mut op = start_operator(&env, &ns, &[], &[]);
    op.wait_ready().await;
    let api: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let spec = |source: &str| {
        json!({
            "broker": "AWS",
            "attributes": {"model": "rpi4", "site": "a"},
            "desired": {"temp": 26, "mode": {"fan": "auto"}},
            "credentials": {"source": source},
            "shadow": {"pollInterval": "1s"}
        })
    };
    create(&api, "incluster", spec("InCluster")).await;
    create(&api, "cloud", spec("CloudIssued")).await;
    wait_ready(&api, "incluster").await;
    wait_ready(&api, "cloud").await;

    // The CloudIssued key is stored and matches its certificate (openssl: moto's keys are PKCS#1).
    let secret = secret_data(&client, &ns, "cloud-device").await.unwrap();
    assert!(secret["tls.key"].contains("PRIVATE KEY"));
    assert!(!secret.contains_key("pendingCertificateSince"));
    assert_eq!(
        key_modulus(&secret["tls.key"], true),
        key_modulus(&secret["tls.crt"], false)
    );

    // Let the status settle (the first reconciles write conditions), then look.
    let settle = reconciles(&op).await;
    wait_for("a few reconciles", WAIT, || async {
        (reconciles(&op).await >= settle + 2.0).then_some(())
    })
    .await;
    let before = (
        snapshot(&env, &client, &ns, "incluster").await,
        snapshot(&env, &client, &ns, "cloud").await,
    );
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
    wait_for("eight more reconciles", WAIT, || async {
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
    let after = (
        snapshot(&env, &client, &ns, "incluster").await,
        snapshot(&env, &client, &ns, "cloud").await,
    );
    assert_eq!(before, after);

    // A new process knows nothing: it runs full checks and still writes nothing.
    op.terminate();
    let op2 = start_operator(&env, &ns, &[], &[]);
    op2.wait_ready().await;
    wait_for("restarted operator reconciled both", WAIT, || async {
        (reconciles(&op2).await >= 6.0).then_some(())
    })
    .await;
    assert_eq!(aws_writes(&op2).await, 0.0, "a restart wrote to AWS");
    assert_eq!(status_writes(&op2).await, 0.0, "a restart wrote status");
    let after_restart = (
        snapshot(&env, &client, &ns, "incluster").await,
        snapshot(&env, &client, &ns, "cloud").await,
    );
    assert_eq!(before, after_restart);

    // CloudIssued teardown leaves nothing behind either.
    let iot = iot(&env);
    let cloud_cert = secret["certificateId"].clone();
    for name in ["incluster", "cloud"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["incluster", "cloud"] {
        wait_for("Thing deleted", WAIT, || async {
            api.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
        let thing_name = format!("{ns}_{name}");
        assert!(!thing_exists(&iot, &thing_name).await);
        assert!(!policy_exists(&iot, &format!("{thing_name}-policy")).await);
    }
    assert!(cert_status(&iot, &cloud_cert).await.is_none());
    drop(op2);
    delete_namespace(&client, &ns).await;
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
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "aws-rename").await;
    let op = start_operator(&env, &ns, &[], &[]);
    op.wait_ready().await;
    let api: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let tn = format!("{}-first", ns.replace('-', "_"));
    api.create(
        &PostParams::default(),
        &thing("dev", json!({"broker": "AWS", "thingName": tn})),
    )
    .await
    .unwrap();
    wait_ready(&api, "dev").await;
    let iot = iot(&env);
    let patch = json!({"spec": {"thingName": format!("{tn}-second")}});
    api.patch(
        "dev",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(patch),
    )
    .await
    .unwrap();
    wait_for("rename refused", WAIT, || async {
        let t = api.get("dev").await.ok()?;
        (condition(&t, "Ready")?.1 == "BackendRejected").then_some(())
    })
    .await;
    assert!(thing_exists(&iot, &tn).await);
    assert!(!thing_exists(&iot, &format!("{tn}-second")).await);
    // Deleting still removes what was provisioned, under the recorded name.
    api.delete("dev", &DeleteParams::default()).await.unwrap();
    wait_for("Thing deleted", WAIT, || async {
        api.get_opt("dev").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(!thing_exists(&iot, &tn).await);
    drop(op);
    delete_namespace(&client, &ns).await;
}
