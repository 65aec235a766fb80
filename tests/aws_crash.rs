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
use common::{OperatorBuilder, Setup, is_ready, merge_patch, thing};
use kube::{ResourceExt, api::DeleteParams};
use serde_json::json;
use thing_operator::credentials::pki;

/// The operator with the AWS backend, run from the private copy of the failpoints build (a
/// concurrent build without the feature would replace the binary under test).
fn operator(s: &Setup) -> OperatorBuilder {
    s.operator().aws().failpoints_binary()
}

/// Starts an operator that exits at `step`, runs `action`, and waits for the exit.
async fn crash_at<F, Fut>(s: &Setup, step: &str, action: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut op = operator(s).failpoint(&format!("{step}=return")).start();
    op.wait_ready().await;
    action().await;
    op.wait_exit(&format!("operator to crash at {step}"), WAIT)
        .await;
    assert!(
        op.logs().contains("failpoint reached"),
        "{step}: the process ended for another reason:\n{}",
        op.logs()
    );
}

fn clean_operator(s: &Setup) -> common::OperatorProcess {
    operator(s).start()
}

/// Deletes every Thing of the namespace with a clean operator and checks that nothing of the
/// namespace is left in moto (things, policies and certificates are named after it).
async fn delete_all_and_check(s: &Setup) {
    let ns = &s.ns;
    let api = s.things();
    let op = clean_operator(s);
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
    s.wait_all_gone(&api).await;
    drop(op);
    let iot = iot(&s.env);
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

/// Certificates in moto whose subject names `cn` (in-cluster certificates carry the thing name).
async fn certs_named(iot: &aws_sdk_iot::Client, cn: &str) -> Vec<String> {
    let mut out = Vec::new();
    for id in all_certificate_ids(iot).await {
        if certificate_subject(iot, &id).await == Some(format!("CN={cn}")) {
            out.push(id);
        }
    }
    out
}

/// The invariants after convergence: one active certificate, attached, matching the Secret's key.
async fn assert_converged(s: &Setup, name: &str) -> String {
    let api = s.things();
    let iot = iot(&s.env);
    let t = api.get(name).await.unwrap();
    let dev = t.status.unwrap().device.unwrap();
    let thing_name = dev.thing_name.unwrap();
    let id = dev.certificate_id.unwrap();
    let arn = dev.certificate_arn.unwrap();
    let secret = secret_data(&s.client, &s.ns, &format!("{name}-device"))
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
    let principals = thing_principals(&iot, &thing_name).await;
    assert_eq!(principals, std::slice::from_ref(&arn), "{name}: principals");
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
    let s = setup("aws-crash-prov").await;
    let ns = &s.ns;
    let api = s.things();
    let iot = iot(&s.env);
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
        crash_at(&s, step, || async {
            thing(&name).spec(spec).create(&api).await;
        })
        .await;
        let op = clean_operator(&s);
        s.wait_ready(&api, &name).await;
        let id = assert_converged(&s, &name).await;
        let thing_name = format!("{ns}_{name}");
        assert_eq!(
            certs_named(&iot, &thing_name).await,
            vec![id],
            "{step}: orphaned certificate"
        );
        let sh = shadow(&data(&s.env), &thing_name).await.unwrap();
        assert_eq!(sh["state"]["desired"], json!({"n": i}), "{step}");
        drop(op);
    }
    delete_all_and_check(&s).await;
}

#[tokio::test]
async fn crash_during_cloud_issuance_leaves_no_orphan() {
    let s = setup("aws-crash-cloud").await;
    let ns = &s.ns;
    let api = s.things();
    let iot = iot(&s.env);
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
        crash_at(&s, step, || async {
            thing(&name).spec(spec).create(&api).await;
        })
        .await;
        let op = clean_operator(&s);
        s.wait_ready(&api, &name).await;
        let id = assert_converged(&s, &name).await;
        // Every certificate AWS issued since the start of this round, except the active one, must
        // go once the orphan grace (2s) has passed. The other crash tests issue in-cluster
        // certificates, so "AWS IoT Certificate" subjects are this test's.
        s.wait_for(&format!("{step}: no unrecorded certificate"), || async {
            let mut extra = Vec::new();
            for c in all_certificate_ids(&iot)
                .await
                .into_iter()
                .filter(|c| !before.contains(c) && *c != id)
            {
                let Some(subject) = certificate_subject(&iot, &c).await else {
                    continue;
                };
                if subject.contains("AWS IoT Certificate") {
                    extra.push(c);
                }
            }
            extra.is_empty().then_some(())
        })
        .await;
        s.wait_for(&format!("{step}: orphan bookkeeping cleared"), || async {
            let secret = secret_data(&s.client, ns, &format!("{name}-device")).await?;
            (!secret.contains_key("pendingCertificateSince")
                && !secret.contains_key("orphanWindow"))
            .then_some(())
        })
        .await;
        drop(op);
    }
    delete_all_and_check(&s).await;
}

#[tokio::test]
async fn crash_during_rotation_converges_and_revokes_the_old_certificate() {
    let s = setup("aws-crash-rot").await;
    let ns = &s.ns;
    let api = s.things();
    let iot = iot(&s.env);
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
            let op = clean_operator(&s);
            thing(&name).spec(spec).create(&api).await;
            s.wait_ready(&api, &name).await;
            drop(op);
        }
        let old = assert_converged(&s, &name).await;
        crash_at(&s, step, || async {
            let patch =
                json!({"metadata": {"annotations": {"iot.thing-operator.dev/rotate": "now"}}});
            merge_patch(&api, &name, patch).await;
        })
        .await;
        let op = clean_operator(&s);
        let thing_name = format!("{ns}_{name}");
        let new = s
            .wait_for(
                &format!("{step}: rotated and the old certificate gone"),
                || async {
                    let t = api.get(&name).await.ok()?;
                    let id = t.status.as_ref()?.device.as_ref()?.certificate_id.clone()?;
                    let ready = is_ready(&t);
                    let gone = cert_status(&iot, &old).await.is_none();
                    (ready && id != old && gone).then_some(id)
                },
            )
            .await;
        assert_eq!(assert_converged(&s, &name).await, new);
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
        let op = clean_operator(&s);
        thing("rdown")
            .broker("AWS")
            .field("credentials", json!({"rotationOverlap": "1h"}))
            .create(&api)
            .await;
        s.wait_ready(&api, "rdown").await;
        drop(op);
    }
    crash_at(&s, "aws-after-register-certificate", || async {
        let patch = json!({"metadata": {"annotations": {"iot.thing-operator.dev/rotate": "now"}}});
        merge_patch(&api, "rdown", patch).await;
    })
    .await;
    api.delete("rdown", &DeleteParams::default()).await.unwrap();
    {
        let op = clean_operator(&s);
        s.wait_gone(&api, "rdown").await;
        drop(op);
    }
    assert!(
        certs_named(&iot, &format!("{ns}_rdown")).await.is_empty(),
        "the unrecorded rotated certificate leaked"
    );
    delete_all_and_check(&s).await;
}

#[tokio::test]
async fn crash_during_teardown_completes_after_restart() {
    let s = setup("aws-crash-del").await;
    let ns = &s.ns;
    let api = s.things();
    let iot = iot(&s.env);
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
        let op = clean_operator(&s);
        for i in 0..steps.len() {
            thing(&format!("d{i}"))
                .broker("AWS")
                .desired(json!({"x": 1}))
                .create(&api)
                .await;
        }
        for i in 0..steps.len() {
            s.wait_ready(&api, &format!("d{i}")).await;
        }
        drop(op);
    }
    for (i, step) in steps.iter().enumerate() {
        let name = format!("d{i}");
        let thing_name = format!("{ns}_{name}");
        crash_at(&s, step, || async {
            api.delete(&name, &DeleteParams::default()).await.unwrap();
        })
        .await;
        let op = clean_operator(&s);
        s.wait_gone(&api, &name).await;
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
            shadow(&data(&s.env), &thing_name).await.is_none(),
            "{step}: shadow left"
        );
        drop(op);
    }
    delete_all_and_check(&s).await;
}

/// A crash before the first status write leaves nothing recorded in status; deleting the Thing
/// while the operator is down must still remove what the crashed run created in AWS.
#[tokio::test]
async fn deleted_after_a_crash_before_any_status_write_leaves_no_orphan() {
    let s = setup("aws-crash-early").await;
    let ns = &s.ns;
    let api = s.things();
    let iot = iot(&s.env);
    for (i, step) in ["aws-after-create-thing", "aws-after-register-certificate"]
        .iter()
        .enumerate()
    {
        let name = format!("e{i}");
        crash_at(&s, step, || async {
            thing(&name).broker("AWS").create(&api).await;
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
        let op = clean_operator(&s);
        s.wait_gone(&api, &name).await;
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
}
