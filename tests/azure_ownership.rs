//! Who may touch an IoT Hub device. A hub is shared by every namespace (and other clusters and
//! tools): a second namespace asking for a device id another Thing owns gets `Conflict` and
//! changes nothing, and deleting it leaves the device alone; a device made outside the operator
//! is a `Conflict` until the operator is told to adopt unowned devices.

mod azure_support;
mod common;

use azure_support::*;
use common::thing;
use kube::api::DeleteParams;
use serde_json::json;

#[tokio::test]
async fn a_second_namespace_cannot_take_over_a_device() {
    let a = setup("az-own-a").await;
    let b = setup("az-own-b").await;
    let hub = Hub::new(&a.env);
    let _op_a = azure(a.operator(), &a.env).ready().await;
    let op_b = azure(b.operator(), &b.env).ready().await;
    // A thingName without '_' is any namespace's to ask for: the first one gets it.
    let device_id = format!("lamp-{}", a.ns.name().trim_start_matches("az-own-a-"));
    let spec = json!({"broker": "Azure", "thingName": device_id, "desired": {"on": true}});
    thing("lamp").spec(spec.clone()).create(&a.things()).await;
    let owned = a.wait_ready(&a.things(), "lamp").await;
    let before = hub.device(&device_id).await.unwrap();
    let twin_before = hub.twin(&device_id).await.unwrap();

    let hostile = json!({"broker": "Azure", "thingName": device_id,
        "desired": {"on": false}, "attributes": {"stolen": "yes"}});
    thing("lamp").spec(hostile).create(&b.things()).await;
    let c = b
        .wait_condition(&b.things(), "lamp", "Ready", |c| c.reason == "Conflict")
        .await;
    assert!(
        c.message.contains("belongs to another Thing"),
        "{}",
        c.message
    );
    // Nothing of the owner's device changed: auth, tags, desired.
    let after = hub.device(&device_id).await.unwrap();
    assert_eq!(after["authentication"], before["authentication"]);
    assert_eq!(after["etag"], before["etag"]);
    let twin_after = hub.twin(&device_id).await.unwrap();
    assert_eq!(twin_after["tags"], twin_before["tags"]);
    assert_eq!(twin_after["properties"]["desired"]["on"], true);
    assert_eq!(
        twin_after["tags"]["thing-operator-owner"],
        json!(format!(
            "{}/lamp/{}",
            a.ns.name(),
            owned.metadata.uid.clone().unwrap()
        ))
    );

    // Deleting the hostile Thing deletes nothing in the hub.
    b.things()
        .delete("lamp", &DeleteParams::default())
        .await
        .unwrap();
    b.wait_gone(&b.things(), "lamp").await;
    assert_eq!(
        hub.device(&device_id).await.unwrap()["etag"],
        before["etag"]
    );
    let ev = events(&b.client, b.ns.name()).await;
    assert!(ev.iter().any(|e| e.starts_with("LeftAlone")), "{ev:?}");
    drop(op_b);

    // The owner still works.
    a.wait_ready(&a.things(), "lamp").await;

    // Someone with rights on the hub gives the device to another owner: the operator stops
    // (Conflict) instead of writing its record back; given back, it goes on.
    let ours = twin_before["tags"]["thing-operator-owner"].clone();
    let retag = |owner: serde_json::Value| {
        let hub = &hub;
        let path = format!("/twins/{device_id}");
        async move {
            let body = json!({"tags": {"thing-operator-owner": owner}});
            let (s, _) = hub
                .call(reqwest::Method::PATCH, &path, Some("*"), Some(body))
                .await;
            assert_eq!(s, 200);
        }
    };
    retag(json!("elsewhere/other/uid-x")).await;
    a.wait_condition(&a.things(), "lamp", "Ready", |c| c.reason == "Conflict")
        .await;
    assert_eq!(
        hub.twin(&device_id).await.unwrap()["tags"]["thing-operator-owner"],
        "elsewhere/other/uid-x"
    );
    retag(ours).await;
    a.wait_ready(&a.things(), "lamp").await;

    // Its deletion removes the device.
    a.things()
        .delete("lamp", &DeleteParams::default())
        .await
        .unwrap();
    a.wait_gone(&a.things(), "lamp").await;
    assert!(hub.device(&device_id).await.is_none());
}

#[tokio::test]
async fn a_device_made_outside_the_operator_is_adopted_only_when_allowed() {
    let s = setup("az-foreign").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    let device_id = format!("{}_sensor", s.ns.name());
    hub.create_foreign_device(&device_id, json!({"site": "plant-1"}))
        .await;
    let op = azure(s.operator(), &s.env).ready().await;
    thing("sensor")
        .spec(json!({"broker": "Azure", "desired": {"rate": 5}}))
        .create(&api)
        .await;
    let c = s
        .wait_condition(&api, "sensor", "Ready", |c| c.reason == "Conflict")
        .await;
    assert!(c.message.contains("no owner record"), "{}", c.message);
    let device = hub.device(&device_id).await.unwrap();
    assert_eq!(device["authentication"]["type"], "sas", "touched");
    drop(op);

    // With --azure-adopt-unowned the device becomes this Thing's: owner tag, certificate.
    let _op = azure(s.operator(), &s.env)
        .arg("--azure-adopt-unowned")
        .ready()
        .await;
    let t = s.wait_ready(&api, "sensor").await;
    let twin = hub.twin(&device_id).await.unwrap();
    assert_eq!(
        twin["tags"]["thing-operator-owner"],
        json!(format!(
            "{}/sensor/{}",
            s.ns.name(),
            t.metadata.uid.unwrap()
        ))
    );
    assert_eq!(
        hub.device(&device_id).await.unwrap()["authentication"]["type"],
        "selfSigned"
    );
    api.delete("sensor", &DeleteParams::default())
        .await
        .unwrap();
    s.wait_gone(&api, "sensor").await;
    assert!(hub.device(&device_id).await.is_none());
}

/// `deletionPolicy: Orphan` leaves the device in the hub; `--cluster-id` prefixes derived ids.
#[tokio::test]
async fn orphan_policy_keeps_the_device_and_cluster_id_prefixes_it() {
    let s = setup("az-orphan").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    let _op = azure(s.operator(), &s.env)
        .args(["--cluster-id", "blue"])
        .ready()
        .await;
    thing("kept")
        .spec(json!({"broker": "Azure", "deletionPolicy": "Orphan", "desired": {"x": 1}}))
        .create(&api)
        .await;
    let t = s.wait_ready(&api, "kept").await;
    let id = format!("blue:{}_kept", s.ns.name());
    assert_eq!(
        t.status.unwrap().device.unwrap().device_id.as_deref(),
        Some(id.as_str())
    );
    assert!(hub.device(&id).await.is_some());
    api.delete("kept", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "kept").await;
    assert!(
        hub.device(&id).await.is_some(),
        "an orphaned device was deleted"
    );
    // Clean up what the test left in the shared double.
    assert_eq!(hub.delete_device(&id).await, 204);
}
