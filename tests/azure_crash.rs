//! Crash safety: the operator process exits (a crash, as far as the hub and Kubernetes can tell)
//! at every step of provisioning and teardown in turn; a restarted operator converges, the hub
//! holds exactly one device per Thing whose registered thumbprint is the certificate in the
//! Secret (whose key matches it), and after deletion no device identity of the namespace is left.
//! The crash between creating a device and writing its owner tag is the interesting one: the
//! restarted operator proves the device is its own by the thumbprint of the key it kept. A
//! symmetric-key rotation is interrupted at each of its steps too.
//!
//! Needs the `failpoints` feature: `cargo test --features failpoints --test azure_crash`.
#![cfg(feature = "failpoints")]

mod azure_support;
mod common;

use azure_support::*;
use common::{OperatorBuilder, Setup, thing};
use kube::{ResourceExt, api::DeleteParams};
use serde_json::json;
use thing_operator::{credentials::pki, provider::azure::credentials::thumbprint};

fn operator(s: &Setup) -> OperatorBuilder {
    azure(s.operator(), &s.env).failpoints_binary()
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

/// Devices of the namespace in the hub (derived ids start with `<namespace>_`).
async fn devices_of(hub: &Hub, ns: &str) -> Vec<String> {
    let prefix = format!("{ns}_");
    hub.state().await["devices"]
        .as_object()
        .map(|m| {
            m.keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

async fn assert_converged(s: &Setup, hub: &Hub, name: &str, desired: serde_json::Value) {
    let t = s.things().get(name).await.unwrap();
    let id = t.status.unwrap().device.unwrap().device_id.unwrap();
    let secret = secret_data(&s.client, s.ns.name(), &format!("{name}-device"))
        .await
        .unwrap();
    assert!(pki::key_matches_certificate(&secret["tls.key"], &secret["tls.crt"]).unwrap());
    let device = hub.device(&id).await.unwrap();
    assert_eq!(
        device["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        json!(thumbprint(&secret["tls.crt"]).unwrap()),
        "{name}: the hub holds another certificate than the Secret"
    );
    let twin = hub.twin(&id).await.unwrap();
    assert_eq!(
        twin["tags"]["thing-operator-owner"],
        json!(format!(
            "{}/{name}/{}",
            s.ns.name(),
            t.metadata.uid.unwrap()
        ))
    );
    let mut got = twin["properties"]["desired"].clone();
    got.as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with('$'));
    assert_eq!(got, desired, "{name}");
}

#[tokio::test]
async fn crash_at_every_step_converges_without_orphaned_devices() {
    let s = setup("az-crash").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    let steps = [
        "azure-after-secret-written",
        "azure-before-create-device",
        "azure-after-create-device",
        "azure-after-twin-update",
    ];
    for (i, step) in steps.iter().enumerate() {
        let name = format!("c{i}");
        let desired = json!({"n": i});
        let spec =
            json!({"broker": "Azure", "attributes": {"step": i.to_string()}, "desired": desired});
        crash_at(&s, step, || async {
            thing(&name).spec(spec).create(&api).await;
        })
        .await;
        let op = operator(&s).start();
        s.wait_ready(&api, &name).await;
        assert_converged(&s, &hub, &name, desired).await;
        drop(op);
    }
    assert_eq!(devices_of(&hub, s.ns.name()).await.len(), steps.len());

    // Rotation interrupted after the new key is in the Secret and before the hub has it, and
    // after the hub has it: the restarted operator registers new and old side by side.
    for (i, step) in [
        "azure-after-rotate-secret",
        "azure-after-register-thumbprints",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("c{i}");
        let old = secret_data(&s.client, s.ns.name(), &format!("{name}-device"))
            .await
            .unwrap();
        let old_thumb = thumbprint(&old["tls.crt"]).unwrap();
        crash_at(&s, step, || async {
            common::merge_patch(
                &api,
                &name,
                json!({"metadata": {"annotations": {"iot.thing-operator.dev/rotate": "r1"}}}),
            )
            .await;
        })
        .await;
        let op = operator(&s).start();
        let id = format!("{}_{name}", s.ns.name());
        s.wait_for("new and old thumbprints registered", || async {
            let d = secret_data(&s.client, s.ns.name(), &format!("{name}-device")).await?;
            let new_thumb = thumbprint(&d["tls.crt"])?;
            let t = hub.device(&id).await?["authentication"]["x509Thumbprint"].clone();
            (new_thumb != old_thumb
                && t["primaryThumbprint"] == json!(new_thumb)
                && t["secondaryThumbprint"] == json!(old_thumb))
            .then_some(())
        })
        .await;
        s.wait_ready(&api, &name).await;
        drop(op);
    }

    // A symmetric-key device: a crash before and after the create call. The key was in the
    // Secret before the call, so the untagged device is proven to be this Thing's by it.
    for step in ["azure-before-create-device", "azure-after-create-device"] {
        let name = format!("k{}", step.len());
        let spec = json!({"broker": "Azure", "credentials": {"source": "CloudIssued"}});
        crash_at(&s, step, || async {
            thing(&name).spec(spec).create(&api).await;
        })
        .await;
        let op = operator(&s).start();
        s.wait_ready(&api, &name).await;
        let id = format!("{}_{name}", s.ns.name());
        let key = hub.device(&id).await.unwrap()["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_string();
        let secret = secret_data(&s.client, s.ns.name(), &format!("{name}-device"))
            .await
            .unwrap();
        assert!(secret["connectionString"].ends_with(&key), "{step}");
        drop(op);
    }

    // A symmetric-key rotation interrupted at each of its steps in turn: after the new key is in
    // the Secret's next slot, after the hub has it as primary, and after the hub dropped the old
    // key at the end of the overlap. At every crash the Secret's working key opens the device
    // (zero downtime), and the restarted operator finishes the rotation.
    let name = format!("k{}", "azure-after-create-device".len());
    let id = format!("{}_{name}", s.ns.name());
    let working = || async {
        let d = secret_data(&s.client, s.ns.name(), &format!("{name}-device"))
            .await
            .unwrap();
        key_of(&d["connectionString"])
    };
    let old = working().await;
    crash_at(&s, "azure-after-rotate-secret", || async {
        common::merge_patch(
            &api,
            &name,
            json!({"spec": {"credentials": {"rotationOverlap": "2s"}},
                "metadata": {"annotations": {"iot.thing-operator.dev/rotate": "r1"}}}),
        )
        .await;
    })
    .await;
    assert_eq!(
        working().await,
        old,
        "the working key moved before the hub had the new one"
    );
    assert_eq!(hub.report_with_key(&id, &old, json!({"at": 1})).await, 200);
    crash_at(&s, "azure-after-register-keys", || async {}).await;
    assert_eq!(
        hub.report_with_key(&id, &working().await, json!({"at": 2}))
            .await,
        200
    );
    crash_at(&s, "azure-after-revoke-previous-key", || async {}).await;
    let new = working().await;
    assert_ne!(new, old);
    assert_eq!(hub.report_with_key(&id, &new, json!({"at": 3})).await, 200);
    let op = operator(&s).start();
    s.wait_for("the rotation finished", || async {
        let d = secret_data(&s.client, s.ns.name(), &format!("{name}-device")).await?;
        let k = hub.device(&id).await?["authentication"]["symmetricKey"].clone();
        (!d.contains_key("previous.connectionString")
            && !d.contains_key("next.connectionString")
            && k["primaryKey"] == json!(new)
            && k["secondaryKey"] != json!(old))
        .then_some(())
    })
    .await;
    assert_eq!(hub.report_with_key(&id, &old, json!({"at": 4})).await, 401);
    s.wait_ready(&api, &name).await;
    drop(op);

    // Teardown interrupted just before the device is deleted: the restarted operator finishes.
    let names: Vec<String> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|t| t.name_any())
        .collect();
    crash_at(&s, "azure-before-delete-device", || async {
        api.delete(&names[0], &DeleteParams::default())
            .await
            .unwrap();
    })
    .await;
    let _op = operator(&s).start();
    for name in &names {
        api.delete(name, &DeleteParams::default()).await.ok();
    }
    s.wait_all_gone(&api).await;
    let left = devices_of(&hub, s.ns.name()).await;
    assert!(left.is_empty(), "device identities left: {left:?}");
}
