//! Crash safety: the operator process exits (a crash, as far as AWS and Kubernetes can tell) at
//! every step of provisioning, CloudIssued issuance, rotation and teardown in turn; a restarted
//! operator converges, moto holds no orphaned certificate, policy or thing, and the Secret's key
//! matches the active certificate.
//!
//! Needs the `failpoints` feature: `cargo test --features failpoints --test aws_crash`.
#![cfg(feature = "failpoints")]

mod aws_support;
mod common;

use aws_support::*;
use std::{
    path::PathBuf,
    process::{Child, Command},
    sync::OnceLock,
    time::Duration,
};

use common::{TestEnv, create_namespace, delete_namespace, wait_for};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;
use thing_operator::{api::Thing, credentials::pki};

/// A private copy of the operator binary, taken once: a concurrent `cargo build` without the
/// `failpoints` feature replaces target/debug/thing-operator, and an operator without failpoints
/// never crashes where it is told to.
fn binary() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_BIN_EXE_thing-operator"));
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let dst = dir.join(format!("thing-operator-failpoints-{}", std::process::id()));
        std::fs::copy(&src, &dst).expect("copy the operator binary");
        let bytes = std::fs::read(&dst).expect("read the operator binary");
        let marker = b"exiting like a crash";
        assert!(
            bytes.windows(marker.len()).any(|w| w == marker),
            "{} was built without the failpoints feature (a concurrent build?); rerun with --features failpoints",
            src.display()
        );
        dst
    })
}

/// One operator process from the private binary (the harness's OperatorProcess always runs
/// target/debug/thing-operator).
struct Operator {
    child: Option<Child>,
    port: u16,
    log_path: PathBuf,
}

impl Operator {
    fn start(env: &TestEnv, ns: &str, failpoints: Option<&str>) -> Operator {
        let port = common::free_port();
        let log_dir = env.dir.join("logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let log_path = log_dir.join(format!("operator-{ns}-{port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let moto = moto_url(env);
        let mut cmd = Command::new(binary());
        cmd.args([
            "run",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--watch-namespace",
            ns,
        ])
        .args([
            "--aws",
            "--aws-region",
            "us-east-1",
            "--aws-iot-endpoint",
            &moto,
            "--aws-data-endpoint",
            &moto,
        ])
        .args([
            "--aws-device-endpoint",
            "device.example.com:8883",
            "--poll-interval",
            "1s",
        ])
        .args(["--resync-interval", "2s", "--aws-orphan-grace", "2s"])
        .args(["--min-poll-interval", "1s", "--min-rotation-overlap", "1s"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KUBECONFIG", env.var("OPERATOR_KUBECONFIG"))
        .env("RUST_LOG", "info,thing_operator=debug,kube_runtime=warn")
        .envs(aws_env())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        if let Some(f) = failpoints {
            cmd.env("FAILPOINTS", f);
        }
        let child = cmd.spawn().expect("operator starts");
        Operator {
            child: Some(child),
            port,
            log_path,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    async fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        wait_for("operator /readyz", WAIT, || async {
            let r = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?;
            (r.status().as_u16() == 200).then_some(())
        })
        .await;
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts an operator that exits at `step`, runs `action`, and waits for the exit.
async fn crash_at<F, Fut>(env: &TestEnv, ns: &str, step: &str, action: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut op = Operator::start(env, ns, Some(&format!("{step}=return")));
    op.wait_ready().await;
    action().await;
    wait_for(&format!("operator to crash at {step}"), WAIT, || {
        let running = op.is_running();
        async move { (!running).then_some(()) }
    })
    .await;
    assert!(
        op.logs().contains("failpoint reached"),
        "{step}: the process ended for another reason:\n{}",
        op.logs()
    );
}

fn clean_operator(env: &TestEnv, ns: &str) -> Operator {
    Operator::start(env, ns, None)
}

/// Deletes every Thing of the namespace with a clean operator and checks that nothing of the
/// namespace is left in moto (things, policies and certificates are named after it).
async fn delete_all_and_check(env: &TestEnv, client: &Client, ns: &str) {
    let api: Api<Thing> = Api::namespaced(client.clone(), ns);
    let op = clean_operator(env, ns);
    let names: Vec<String> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|t| t.name_any())
        .collect();
    for name in &names {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait_for("all Things deleted", WAIT, || async {
        api.list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    drop(op);
    let iot = iot(env);
    let prefix = format!("{ns}_");
    let things = iot.list_things().max_results(250).send().await.unwrap();
    let left: Vec<_> = things
        .things()
        .iter()
        .filter_map(|t| t.thing_name())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "things left: {left:?}");
    let policies = iot.list_policies().send().await.unwrap();
    let left: Vec<_> = policies
        .policies()
        .iter()
        .filter_map(|p| p.policy_name())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "policies left: {left:?}");
    for name in names {
        assert!(
            certs_named(&iot, &format!("{ns}_{name}")).await.is_empty(),
            "certificate of {name} left"
        );
    }
}

fn subject(pem: &str) -> String {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    parsed.parse_x509().expect("X.509").subject().to_string()
}

/// Certificates in moto whose subject names `cn` (in-cluster certificates carry the thing name).
async fn certs_named(iot: &aws_sdk_iot::Client, cn: &str) -> Vec<String> {
    let mut out = Vec::new();
    for id in all_certificate_ids(iot).await {
        let Ok(d) = iot.describe_certificate().certificate_id(&id).send().await else {
            continue;
        };
        let pem = d
            .certificate_description()
            .and_then(|d| d.certificate_pem())
            .unwrap_or_default()
            .to_string();
        if subject(&pem) == format!("CN={cn}") {
            out.push(id);
        }
    }
    out
}

/// The invariants after convergence: one active certificate, attached, matching the Secret's key.
async fn assert_converged(env: &TestEnv, client: &Client, ns: &str, name: &str) -> String {
    let api: Api<Thing> = Api::namespaced(client.clone(), ns);
    let iot = iot(env);
    let t = api.get(name).await.unwrap();
    let dev = t.status.unwrap().device.unwrap();
    let thing_name = dev.thing_name.unwrap();
    let id = dev.certificate_id.unwrap();
    let arn = dev.certificate_arn.unwrap();
    let secret = secret_data(client, ns, &format!("{name}-device"))
        .await
        .unwrap();
    assert_eq!(
        secret["certificateId"], id,
        "{name}: Secret and status disagree"
    );
    if secret["tls.key"].contains("BEGIN PRIVATE KEY") {
        assert!(
            pki::key_matches_certificate(&secret["tls.key"], &secret["tls.crt"]).unwrap(),
            "{name}: key mismatch"
        );
    }
    let registered = iot
        .describe_certificate()
        .certificate_id(&id)
        .send()
        .await
        .unwrap();
    let desc = registered.certificate_description().unwrap();
    assert_eq!(desc.status().map(|s| s.as_str()), Some("ACTIVE"));
    assert_eq!(
        desc.certificate_pem().unwrap().trim(),
        secret["tls.crt"].trim(),
        "{name}: Secret holds another certificate"
    );
    let principals = iot
        .list_thing_principals()
        .thing_name(&thing_name)
        .send()
        .await
        .unwrap();
    assert_eq!(
        principals.principals(),
        std::slice::from_ref(&arn),
        "{name}: principals"
    );
    let attached = iot
        .list_attached_policies()
        .target(&arn)
        .send()
        .await
        .unwrap();
    assert_eq!(attached.policies().len(), 1, "{name}: policy attachment");
    id
}

#[tokio::test]
async fn crash_during_provisioning_converges_without_orphans() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "aws-crash-prov").await;
    let api: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let iot = iot(&env);
    let steps = [
        "aws-before-create-thing",
        "aws-after-create-thing",
        "aws-before-create-policy",
        "aws-after-create-policy",
        "aws-after-write-key",
        "aws-before-register-certificate",
        "aws-after-register-certificate",
        "aws-before-attach-policy",
        "aws-before-attach-principal",
        "aws-after-attachments",
        "aws-before-update-shadow",
    ];
    for (i, step) in steps.iter().enumerate() {
        let name = format!("p{i}");
        let spec =
            json!({"broker": "AWS", "attributes": {"step": i.to_string()}, "desired": {"n": i}});
        crash_at(&env, &ns, step, || create(&api, &name, spec)).await;
        let op = clean_operator(&env, &ns);
        wait_ready(&api, &name).await;
        let id = assert_converged(&env, &client, &ns, &name).await;
        let thing_name = format!("{ns}_{name}");
        assert_eq!(
            certs_named(&iot, &thing_name).await,
            vec![id],
            "{step}: orphaned certificate"
        );
        let sh = shadow(&data(&env), &thing_name).await.unwrap();
        assert_eq!(sh["state"]["desired"], json!({"n": i}), "{step}");
        drop(op);
    }
    delete_all_and_check(&env, &client, &ns).await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn crash_during_cloud_issuance_leaves_no_orphan() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "aws-crash-cloud").await;
    let api: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let iot = iot(&env);
    for (i, step) in [
        "aws-before-create-keys",
        "aws-after-create-keys",
        "aws-after-store-cloud-key",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("c{i}");
        let before = all_certificate_ids(&iot).await;
        let spec = json!({"broker": "AWS", "credentials": {"source": "CloudIssued"}});
        crash_at(&env, &ns, step, || create(&api, &name, spec)).await;
        let op = clean_operator(&env, &ns);
        wait_ready(&api, &name).await;
        let id = assert_converged(&env, &client, &ns, &name).await;
        // Every certificate AWS issued since the start of this round, except the active one, must
        // go once the orphan grace (2s) has passed. The other crash tests issue in-cluster
        // certificates, so "AWS IoT Certificate" subjects are this test's.
        wait_for(
            &format!("{step}: no unrecorded certificate"),
            WAIT,
            || async {
                let mut extra = Vec::new();
                for c in all_certificate_ids(&iot)
                    .await
                    .into_iter()
                    .filter(|c| !before.contains(c) && *c != id)
                {
                    let Ok(d) = iot.describe_certificate().certificate_id(&c).send().await else {
                        continue;
                    };
                    let pem = d
                        .certificate_description()
                        .and_then(|d| d.certificate_pem())
                        .unwrap_or_default()
                        .to_string();
                    if subject(&pem).contains("AWS IoT Certificate") {
                        extra.push(c);
                    }
                }
                extra.is_empty().then_some(())
            },
        )
        .await;
        wait_for(
            &format!("{step}: orphan bookkeeping cleared"),
            WAIT,
            || async {
                let secret = secret_data(&client, &ns, &format!("{name}-device")).await?;
                (!secret.contains_key("pendingCertificateSince")
                    && !secret.contains_key("orphanWindow"))
                .then_some(())
            },
        )
        .await;
        drop(op);
    }
    delete_all_and_check(&env, &client, &ns).await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn crash_during_rotation_converges_and_revokes_the_old_certificate() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "aws-crash-rot").await;
    let api: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let iot = iot(&env);
    let steps = [
        "aws-before-rotate",
        "aws-after-write-key",
        "aws-after-register-certificate",
        "aws-after-rotate",
        "aws-before-attach-policy",
        "aws-before-detach-policy",
        "aws-before-detach-principal",
        "aws-before-deactivate-certificate",
        "aws-before-delete-certificate",
    ];
    for (i, step) in steps.iter().enumerate() {
        let name = format!("r{i}");
        let spec = json!({"broker": "AWS", "credentials": {"rotationOverlap": "1s"}});
        {
            let op = clean_operator(&env, &ns);
            create(&api, &name, spec).await;
            wait_ready(&api, &name).await;
            drop(op);
        }
        let old = assert_converged(&env, &client, &ns, &name).await;
        crash_at(&env, &ns, step, || async {
            let patch =
                json!({"metadata": {"annotations": {"iot.thing-operator.dev/rotate": "now"}}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .unwrap();
        })
        .await;
        let op = clean_operator(&env, &ns);
        let thing_name = format!("{ns}_{name}");
        let new = wait_for(
            &format!("{step}: rotated and the old certificate gone"),
            WAIT,
            || async {
                let t = api.get(&name).await.ok()?;
                let id = t.status.as_ref()?.device.as_ref()?.certificate_id.clone()?;
                let ready = is_ready(&t);
                let gone = cert_status(&iot, &old).await.is_none();
                (ready && id != old && gone).then_some(id)
            },
        )
        .await;
        assert_eq!(assert_converged(&env, &client, &ns, &name).await, new);
        assert_eq!(
            certs_named(&iot, &thing_name).await,
            vec![new],
            "{step}: orphaned certificate"
        );
        drop(op);
    }
    // Deleted while the operator is down, right after a rotation registered a certificate it had
    // not recorded yet: teardown still finds and deletes it.
    {
        let op = clean_operator(&env, &ns);
        create(
            &api,
            "rdown",
            json!({"broker": "AWS", "credentials": {"rotationOverlap": "1h"}}),
        )
        .await;
        wait_ready(&api, "rdown").await;
        drop(op);
    }
    crash_at(&env, &ns, "aws-after-register-certificate", || async {
        let patch = json!({"metadata": {"annotations": {"iot.thing-operator.dev/rotate": "now"}}});
        api.patch("rdown", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
    })
    .await;
    api.delete("rdown", &DeleteParams::default()).await.unwrap();
    {
        let op = clean_operator(&env, &ns);
        wait_for("rdown deleted", WAIT, || async {
            api.get_opt("rdown").await.ok()?.is_none().then_some(())
        })
        .await;
        drop(op);
    }
    assert!(
        certs_named(&iot, &format!("{ns}_rdown")).await.is_empty(),
        "the unrecorded rotated certificate leaked"
    );
    delete_all_and_check(&env, &client, &ns).await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn crash_during_teardown_completes_after_restart() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "aws-crash-del").await;
    let api: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let iot = iot(&env);
    let steps = [
        "aws-before-detach-policy",
        "aws-before-detach-principal",
        "aws-before-deactivate-certificate",
        "aws-before-delete-certificate",
        "aws-after-delete-certificate",
        "aws-before-delete-shadow",
        "aws-before-delete-policy",
        "aws-before-delete-thing",
    ];
    {
        let op = clean_operator(&env, &ns);
        for i in 0..steps.len() {
            create(
                &api,
                &format!("d{i}"),
                json!({"broker": "AWS", "desired": {"x": 1}}),
            )
            .await;
        }
        for i in 0..steps.len() {
            wait_ready(&api, &format!("d{i}")).await;
        }
        drop(op);
    }
    for (i, step) in steps.iter().enumerate() {
        let name = format!("d{i}");
        let thing_name = format!("{ns}_{name}");
        crash_at(&env, &ns, step, || async {
            api.delete(&name, &DeleteParams::default()).await.unwrap();
        })
        .await;
        let op = clean_operator(&env, &ns);
        wait_for(&format!("{step}: Thing deleted"), WAIT, || async {
            api.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await;
        assert!(!thing_exists(&iot, &thing_name).await, "{step}: thing left");
        assert!(
            !policy_exists(&iot, &format!("{thing_name}-policy")).await,
            "{step}: policy left"
        );
        assert!(
            certs_named(&iot, &thing_name).await.is_empty(),
            "{step}: certificate left"
        );
        assert!(
            shadow(&data(&env), &thing_name).await.is_none(),
            "{step}: shadow left"
        );
        drop(op);
    }
    delete_all_and_check(&env, &client, &ns).await;
    delete_namespace(&client, &ns).await;
}

/// A crash before the first status write leaves nothing recorded in status; deleting the Thing
/// while the operator is down must still remove what the crashed run created in AWS.
#[tokio::test]
async fn deleted_after_a_crash_before_any_status_write_leaves_no_orphan() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "aws-crash-early").await;
    let api: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let iot = iot(&env);
    for (i, step) in ["aws-after-create-thing", "aws-after-register-certificate"]
        .iter()
        .enumerate()
    {
        let name = format!("e{i}");
        crash_at(&env, &ns, step, || {
            create(&api, &name, json!({"broker": "AWS"}))
        })
        .await;
        let thing = api.get(&name).await.unwrap();
        assert!(
            thing
                .status
                .as_ref()
                .and_then(|s| s.device.as_ref())
                .is_none(),
            "{step}: status was written before the crash"
        );
        let thing_name = format!("{ns}_{name}");
        assert!(
            iot.describe_thing()
                .thing_name(&thing_name)
                .send()
                .await
                .is_ok(),
            "{step}: the crashed run did not create the thing"
        );
        api.delete(&name, &DeleteParams::default()).await.unwrap();
        let op = clean_operator(&env, &ns);
        wait_for("Thing deleted", WAIT, || async {
            api.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await;
        drop(op);
        assert!(
            iot.describe_thing()
                .thing_name(&thing_name)
                .send()
                .await
                .is_err(),
            "{step}: thing left in AWS"
        );
        assert!(
            certs_named(&iot, &thing_name).await.is_empty(),
            "{step}: certificate left"
        );
    }
    delete_namespace(&client, &ns).await;
}
