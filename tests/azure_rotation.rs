//! Credential rotation on IoT Hub with zero downtime: the rotate annotation issues a new key and
//! certificate into the Secret, the hub registers the new thumbprint as primary and keeps the old
//! one as secondary for the overlap (a device still on the old certificate keeps working), and
//! after the overlap only the new one is registered (the old certificate is refused). The same
//! for a symmetric-key device: a new key becomes the hub's primary and the old one its secondary
//! for the overlap, then the old one is replaced by a key nobody holds.

mod azure_support;
mod common;

use azure_support::*;
use common::{merge_patch, thing};
use serde_json::json;
use thing_operator::{credentials::pki, provider::azure::credentials::thumbprint};

#[tokio::test]
async fn rotation_overlaps_old_and_new_certificates_then_drops_the_old() {
    let s = setup("az-rotate").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    let _op = azure(s.operator(), &s.env).ready().await;
    thing("meter")
        .spec(json!({"broker": "Azure", "credentials": {"rotationOverlap": "15s"}}))
        .create(&api)
        .await;
    s.wait_ready(&api, "meter").await;
    let id = format!("{}_meter", s.ns.name());
    let old = secret_data(&s.client, s.ns.name(), "meter-device")
        .await
        .unwrap();
    let old_thumb = thumbprint(&old["tls.crt"]).unwrap();

    merge_patch(
        &api,
        "meter",
        json!({"metadata": {"annotations": {"iot.thing-operator.dev/rotate": "1"}}}),
    )
    .await;
    let new = s
        .wait_for("a new certificate in the Secret", || async {
            let d = secret_data(&s.client, s.ns.name(), "meter-device").await?;
            (thumbprint(&d["tls.crt"])? != old_thumb).then_some(d)
        })
        .await;
    assert!(pki::key_matches_certificate(&new["tls.key"], &new["tls.crt"]).unwrap());
    let new_thumb = thumbprint(&new["tls.crt"]).unwrap();
    // The overlap: both registered, both certificates work.
    s.wait_for("both thumbprints registered", || async {
        let d = hub.device(&id).await?;
        let t = &d["authentication"]["x509Thumbprint"];
        (t["primaryThumbprint"] == json!(new_thumb) && t["secondaryThumbprint"] == json!(old_thumb))
            .then_some(())
    })
    .await;
    // The status write that records the overlap may come a moment after the hub call.
    s.wait_for("the overlap in status", || async {
        let t = api.get("meter").await.ok()?.status?;
        (t.credentials?.previous_certificate_id.as_deref() == Some(old_thumb.as_str()))
            .then_some(())
    })
    .await;
    assert_eq!(hub.report(&id, &old["tls.crt"], json!({"v": 1})).await, 200);
    assert_eq!(hub.report(&id, &new["tls.crt"], json!({"v": 2})).await, 200);
    s.wait_for("a CertificateRotated Event", || async {
        let ev = events(&s.client, s.ns.name()).await;
        ev.iter()
            .any(|e| e.starts_with("CertificateRotated"))
            .then_some(())
    })
    .await;

    // After the overlap only the new certificate is registered, and the Secret forgets the old.
    s.wait_for("old thumbprint dropped", || async {
        let d = hub.device(&id).await?;
        let t = &d["authentication"]["x509Thumbprint"];
        (t["primaryThumbprint"] == json!(new_thumb) && t["secondaryThumbprint"].is_null())
            .then_some(())
    })
    .await;
    assert_eq!(hub.report(&id, &old["tls.crt"], json!({"v": 3})).await, 401);
    assert_eq!(hub.report(&id, &new["tls.crt"], json!({"v": 4})).await, 200);
    s.wait_for("previous certificate forgotten", || async {
        let st = api.get("meter").await.ok()?.status?;
        let d = secret_data(&s.client, s.ns.name(), "meter-device").await?;
        (st.credentials?.previous_certificate_id.is_none()
            && !d.contains_key("previousCertificateId"))
        .then_some(())
    })
    .await;
    s.wait_ready(&api, "meter").await;
    // No drift was reported for the operator's own changes.
    let ev = events(&s.client, s.ns.name()).await;
    assert!(!ev.iter().any(|e| e.starts_with("DriftRepaired")), "{ev:?}");
}

#[tokio::test]
async fn symmetric_key_rotation_overlaps_old_and_new_keys_then_drops_the_old() {
    let s = setup("az-rotate-key").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    let _op = azure(s.operator(), &s.env).ready().await;
    thing("tag")
        .spec(json!({"broker": "Azure",
            "credentials": {"source": "CloudIssued", "rotationOverlap": "15s"}}))
        .create(&api)
        .await;
    s.wait_ready(&api, "tag").await;
    let id = format!("{}_tag", s.ns.name());
    let before = secret_data(&s.client, s.ns.name(), "tag-device")
        .await
        .unwrap();
    let old = key_of(&before["connectionString"]);
    assert!(!before.contains_key("previous.connectionString"));
    assert_eq!(hub.report_with_key(&id, &old, json!({"v": 0})).await, 200);

    merge_patch(
        &api,
        "tag",
        json!({"metadata": {"annotations": {"iot.thing-operator.dev/rotate": "1"}}}),
    )
    .await;
    // The new key is the working one in the Secret; the old one stays readable beside it.
    let new = s
        .wait_for("a new key in the Secret", || async {
            let d = secret_data(&s.client, s.ns.name(), "tag-device").await?;
            let new = key_of(&d["connectionString"]);
            (new != old && key_of(d.get("previous.connectionString")?) == old).then_some(new)
        })
        .await;
    // The overlap: the hub holds both, and both work.
    let keys = &hub.device(&id).await.unwrap()["authentication"]["symmetricKey"];
    assert_eq!(keys["primaryKey"], json!(new));
    assert_eq!(keys["secondaryKey"], json!(old));
    s.wait_for("the overlap in status", || async {
        let t = api.get("tag").await.ok()?.status?;
        t.credentials?.previous_revoke_at.map(|_| ())
    })
    .await;
    assert_eq!(hub.report_with_key(&id, &old, json!({"v": 1})).await, 200);
    assert_eq!(hub.report_with_key(&id, &new, json!({"v": 2})).await, 200);
    s.wait_for("a KeyRotated Event", || async {
        let ev = events(&s.client, s.ns.name()).await;
        ev.iter().any(|e| e.starts_with("KeyRotated")).then_some(())
    })
    .await;

    // After the overlap the old key is refused, the new one works, the Secret forgets the old.
    s.wait_for("old key replaced on the hub", || async {
        let d = hub.device(&id).await?;
        let k = &d["authentication"]["symmetricKey"];
        (k["primaryKey"] == json!(new) && k["secondaryKey"] != json!(old)).then_some(())
    })
    .await;
    assert_eq!(hub.report_with_key(&id, &old, json!({"v": 3})).await, 401);
    assert_eq!(hub.report_with_key(&id, &new, json!({"v": 4})).await, 200);
    s.wait_for("previous key forgotten", || async {
        let d = secret_data(&s.client, s.ns.name(), "tag-device").await?;
        (!d.contains_key("previous.connectionString") && key_of(&d["connectionString"]) == new)
            .then_some(())
    })
    .await;
    s.wait_for("a PreviousKeyRevoked Event", || async {
        let ev = events(&s.client, s.ns.name()).await;
        ev.iter()
            .any(|e| e.starts_with("PreviousKeyRevoked"))
            .then_some(())
    })
    .await;
    let shown = format!(
        "{}\n{}",
        serde_json::to_string(&api.get("tag").await.unwrap()).unwrap(),
        events(&s.client, s.ns.name()).await.join("\n")
    );
    assert!(
        !shown.contains(&old) && !shown.contains(&new),
        "a key in status or Events"
    );
    s.wait_ready(&api, "tag").await;
}
