//! The whole AWS lifecycle against a real kube-apiserver and moto: create, Ready, Secret,
//! desired -> shadow, reported -> status, drift repaired, rotation with overlap, deletion leaves
//! nothing of this Thing in moto, and no key material in status, Events or logs.

mod aws_support;
mod common;
mod mosquitto_support;

use aws_smithy_types::Blob;
use aws_support::*;
use common::{is_ready, merge_patch, thing};
use kube::{Api, api::DeleteParams};
use mosquitto_support::{Credentials, Device, DeviceEvent, topic_prefix};
use serde_json::json;
use thing_operator::{api::Thing, credentials::pki};

#[tokio::test]
async fn aws_thing_full_lifecycle() {
    let s = setup("aws-life").await;
    let (client, ns) = (&s.client, &s.ns);
    let mut op = s.operator().aws().ready().await;
    let iot = iot(&s.env);
    let data = data(&s.env);
    let api = s.things();

    thing("pump")
        .spec(json!({
            "broker": "AWS",
            "attributes": {"model": "rpi4"},
            "desired": {"temp": 26},
            "credentials": {"rotationOverlap": "3s"},
            "shadow": {"pollInterval": "1s"}
        }))
        .create(&api)
        .await;
    let t = s.wait_ready(&api, "pump").await;
    let thing_name = format!("{ns}_pump");
    let st = t.status.clone().unwrap();
    let dev = st.device.clone().unwrap();
    assert_eq!(dev.thing_name.as_deref(), Some(thing_name.as_str()));
    assert!(
        dev.thing_arn
            .as_deref()
            .unwrap()
            .ends_with(&format!(":thing/{thing_name}"))
    );
    assert_eq!(
        dev.policy_name.as_deref(),
        Some(format!("{thing_name}-policy").as_str())
    );
    assert_eq!(dev.endpoint.as_deref(), Some("device.example.com:8883"));
    assert_eq!(dev.secret_name.as_deref(), Some("pump-device"));
    let cert_id = dev.certificate_id.clone().unwrap();
    let cert_arn = dev.certificate_arn.clone().unwrap();
    for c in ["Provisioned", "CredentialsReady", "InSync"] {
        assert!(st.conditions.is_true(c), "{c}: {:?}", st.conditions);
    }
    assert_eq!(st.observed_generation, t.metadata.generation);

    // The cloud side, through the SDK.
    let described = iot
        .describe_thing()
        .thing_name(&thing_name)
        .send()
        .await
        .unwrap();
    assert_eq!(
        described
            .attributes()
            .unwrap()
            .get("model")
            .map(String::as_str),
        Some("rpi4")
    );
    let policy = iot
        .get_policy()
        .policy_name(dev.policy_name.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    let doc = policy.policy_document().unwrap();
    assert!(doc.contains(&format!("client/{thing_name}")), "{doc}");
    assert!(doc.contains(&format!("topic/things/{ns}/pump/*")), "{doc}");
    let principals = thing_principals(&iot, &thing_name).await;
    assert_eq!(principals, std::slice::from_ref(&cert_arn));
    let attached = iot
        .list_attached_policies()
        .target(&cert_arn)
        .send()
        .await
        .unwrap();
    assert_eq!(attached.policies().len(), 1);
    assert_eq!(cert_status(&iot, &cert_id).await.as_deref(), Some("ACTIVE"));
    let sh = shadow(&data, &thing_name).await.unwrap();
    assert_eq!(sh["state"]["desired"], json!({"temp": 26}));
    // moto's own dump agrees.
    let dump = moto_dump(&s.env).await.to_string();
    assert!(dump.contains(&thing_name));

    // The Secret: mountable keys, owned by the Thing, key matches the registered certificate.
    let secret = secret_data(client, ns, "pump-device").await.unwrap();
    for k in [
        "tls.crt",
        "tls.key",
        "ca.crt",
        "endpoint",
        "thingName",
        "clientId",
        "certificateId",
    ] {
        assert!(secret.contains_key(k), "Secret lacks {k}");
    }
    assert_eq!(secret["certificateId"], cert_id);
    assert_eq!(secret["thingName"], thing_name);
    assert!(pki::key_matches_certificate(&secret["tls.key"], &secret["tls.crt"]).unwrap());
    let registered = iot
        .describe_certificate()
        .certificate_id(&cert_id)
        .send()
        .await
        .unwrap();
    let registered_pem = registered
        .certificate_description()
        .unwrap()
        .certificate_pem()
        .unwrap()
        .to_string();
    assert_eq!(registered_pem.trim(), secret["tls.crt"].trim());
    assert_eq!(secret["ca.crt"].matches("BEGIN CERTIFICATE").count(), 2);
    let sapi: Api<k8s_openapi::api::core::v1::Secret> = s.api();
    let owner = sapi
        .get("pump-device")
        .await
        .unwrap()
        .metadata
        .owner_references
        .unwrap();
    assert_eq!(owner[0].uid, t.metadata.uid.clone().unwrap());

    // A device reports: reported, delta and version reach status.
    data.update_thing_shadow()
        .thing_name(&thing_name)
        .payload(Blob::new(
            json!({"state": {"reported": {"temp": 24}}}).to_string(),
        ))
        .send()
        .await
        .unwrap();
    let t = s
        .wait_for("reported state in status", || async {
            let t = api.get("pump").await.ok()?;
            let s = t.status.clone()?;
            (s.reported.as_ref()?.0.get("temp")? == &json!(24)).then_some(t)
        })
        .await;
    let st = t.status.unwrap();
    assert_eq!(st.delta.unwrap().0.get("temp"), Some(&json!(26)));
    assert!(st.version.unwrap() >= 2);
    assert!(st.last_reported_time.is_some());
    assert_eq!(st.reported_summary.as_deref(), Some(r#"{"temp":24}"#));

    // A spec change reaches the shadow.
    merge_patch(
        &api,
        "pump",
        json!({"spec": {"desired": {"temp": 27}, "attributes": {"model": "rpi5"}}}),
    )
    .await;
    s.wait_for("desired 27 in the shadow", || async {
        let sh = shadow(&data, &thing_name).await?;
        (sh["state"]["desired"] == json!({"temp": 27})).then_some(())
    })
    .await;
    s.wait_for("attributes updated in place", || async {
        let d = iot
            .describe_thing()
            .thing_name(&thing_name)
            .send()
            .await
            .ok()?;
        (d.attributes()?.get("model").map(String::as_str) == Some("rpi5")).then_some(())
    })
    .await;

    // Drift: someone detaches and deletes the policy. It comes back, attached, with an Event.
    let policy_name = dev.policy_name.clone().unwrap();
    iot.detach_policy()
        .policy_name(&policy_name)
        .target(&cert_arn)
        .send()
        .await
        .unwrap();
    iot.delete_policy()
        .policy_name(&policy_name)
        .send()
        .await
        .unwrap();
    s.wait_for("policy recreated and attached", || async {
        let a = iot
            .list_attached_policies()
            .target(&cert_arn)
            .send()
            .await
            .ok()?;
        a.policies()
            .iter()
            .any(|p| p.policy_name() == Some(policy_name.as_str()))
            .then_some(())
    })
    .await;
    s.wait_for("DriftRepaired event", || async {
        events(client, ns)
            .await
            .iter()
            .any(|e| e.starts_with("DriftRepaired"))
            .then_some(())
    })
    .await;
    // Drift: the certificate is deactivated outside the operator.
    iot.update_certificate()
        .certificate_id(&cert_id)
        .new_status(aws_sdk_iot::types::CertificateStatus::Inactive)
        .send()
        .await
        .unwrap();
    s.wait_for("certificate reactivated", || async {
        (cert_status(&iot, &cert_id).await.as_deref() == Some("ACTIVE")).then_some(())
    })
    .await;

    // Rotation on demand: a new certificate, the Secret follows, the old one is revoked after the overlap.
    merge_patch(
        &api,
        "pump",
        json!({"metadata": {"annotations": {"iot.thing-operator.dev/rotate": "1"}}}),
    )
    .await;
    let new_id = s
        .wait_for("rotated certificate in status", || async {
            let t = api.get("pump").await.ok()?;
            let id = t.status.as_ref()?.device.as_ref()?.certificate_id.clone()?;
            (id != cert_id && is_ready(&t)).then_some(id)
        })
        .await;
    let secret = secret_data(client, ns, "pump-device").await.unwrap();
    assert_eq!(secret["certificateId"], new_id);
    assert!(pki::key_matches_certificate(&secret["tls.key"], &secret["tls.crt"]).unwrap());
    assert_eq!(cert_status(&iot, &new_id).await.as_deref(), Some("ACTIVE"));
    s.wait_for(
        "old certificate revoked and deleted after the overlap",
        || async { cert_status(&iot, &cert_id).await.is_none().then_some(()) },
    )
    .await;
    let t = api.get("pump").await.unwrap();
    let new_arn = t
        .status
        .as_ref()
        .unwrap()
        .device
        .as_ref()
        .unwrap()
        .certificate_arn
        .clone()
        .unwrap();
    let principals = thing_principals(&iot, &thing_name).await;
    assert_eq!(principals, std::slice::from_ref(&new_arn));
    assert!(
        events(client, ns)
            .await
            .iter()
            .any(|e| e.starts_with("CertificateRotated"))
    );

    // No key material in status, Events or logs.
    let key_body: String = secret["tls.key"]
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let status_json = serde_json::to_string(&api.get("pump").await.unwrap().status).unwrap();
    let all_events = events(client, ns).await.join("\n");
    let logs = op.logs();
    for (what, text) in [
        ("status", &status_json),
        ("events", &all_events),
        ("logs", &logs),
    ] {
        assert!(
            !text.contains("PRIVATE KEY"),
            "{what} mentions a private key"
        );
        assert!(!text.contains(&key_body[..40]), "{what} holds key material");
    }

    // Deletion: everything of this Thing leaves moto, in an order moto accepts.
    api.delete("pump", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "pump").await;
    assert!(!thing_exists(&iot, &thing_name).await);
    assert!(!policy_exists(&iot, &policy_name).await);
    assert!(cert_status(&iot, &new_id).await.is_none());
    assert!(shadow(&data, &thing_name).await.is_none());
    // moto's data.json keeps every instance ever created (deleted ones too), so "nothing left"
    // is asserted through the list APIs.
    let things = iot.list_things().send().await.unwrap();
    assert!(
        !things
            .things()
            .iter()
            .any(|t| t.thing_name() == Some(thing_name.as_str())),
        "thing left in moto"
    );
    let policies = iot.list_policies().send().await.unwrap();
    assert!(
        !policies
            .policies()
            .iter()
            .any(|p| p.policy_name() == Some(policy_name.as_str())),
        "policy left in moto"
    );
    let certs = all_certificate_ids(&iot).await;
    assert!(
        !certs.contains(&new_id) && !certs.contains(&cert_id),
        "certificate left in moto"
    );

    op.terminate();
}

/// A named shadow and a user policy template, both changed in place.
#[tokio::test]
async fn aws_named_shadow_and_policy_template_changes() {
    let s = setup("aws-named").await;
    let ns = &s.ns;
    let op = s.operator().aws().ready().await;
    let iot = iot(&s.env);
    let data = data(&s.env);
    let api = s.things();
    let template = |action: &str| {
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": action,
            "Resource": "arn:aws:iot:${region}:${account}:client/${clientId}"}]})
        .to_string()
    };
    thing("valve")
        .spec(json!({
            "broker": "AWS",
            "desired": {"open": false},
            "shadow": {"name": "config", "pollInterval": "1s"},
            "policy": {"template": template("iot:Connect")}
        }))
        .create(&api)
        .await;
    s.wait_ready(&api, "valve").await;
    let thing_name = format!("{ns}_valve");
    let policy_name = format!("{thing_name}-policy");
    let named = || async {
        let out = data
            .get_thing_shadow()
            .thing_name(&thing_name)
            .shadow_name("config")
            .send()
            .await
            .ok()?;
        serde_json::from_slice::<serde_json::Value>(out.payload()?.as_ref()).ok()
    };
    assert_eq!(
        named().await.unwrap()["state"]["desired"],
        json!({"open": false})
    );
    assert!(
        shadow(&data, &thing_name).await.is_none(),
        "the classic shadow must stay untouched"
    );
    let doc = iot
        .get_policy()
        .policy_name(&policy_name)
        .send()
        .await
        .unwrap();
    assert!(
        doc.policy_document()
            .unwrap()
            .contains(&format!(":client/{thing_name}"))
    );

    data.update_thing_shadow()
        .thing_name(&thing_name)
        .shadow_name("config")
        .payload(Blob::new(
            json!({"state": {"reported": {"open": true}}}).to_string(),
        ))
        .send()
        .await
        .unwrap();
    s.wait_for("named shadow reported state in status", || async {
        let t = api.get("valve").await.ok()?;
        (t.status?.reported?.0.get("open")? == &json!(true)).then_some(())
    })
    .await;

    let patch = json!({"spec": {"policy": {"template": template("iot:*")}}});
    merge_patch(&api, "valve", patch).await;
    s.wait_for("new policy version is the default", || async {
        let p = iot
            .get_policy()
            .policy_name(&policy_name)
            .send()
            .await
            .ok()?;
        p.policy_document()?.contains("iot:*").then_some(())
    })
    .await;
    let versions = iot
        .list_policy_versions()
        .policy_name(&policy_name)
        .send()
        .await
        .unwrap();
    assert!(versions.policy_versions().len() >= 2);

    api.delete("valve", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "valve").await;
    assert!(!thing_exists(&iot, &thing_name).await);
    assert!(!policy_exists(&iot, &policy_name).await);
    assert!(named().await.is_none(), "named shadow left");
    drop(op);
}

#[tokio::test]
async fn a_renamed_or_deleted_device_secret_leaves_no_usable_certificate() {
    let s = setup("aws-secret").await;
    let _op = s.operator().aws().ready().await;
    let iot = iot(&s.env);
    let api = s.things();
    thing("valve").broker("AWS").create(&api).await;
    let t = s.wait_ready(&api, "valve").await;
    let first = t.status.unwrap().device.unwrap().certificate_id.unwrap();
    assert_eq!(cert_status(&iot, &first).await.as_deref(), Some("ACTIVE"));

    // A new Secret name: a new certificate there, the old one revoked (an Event says so).
    merge_patch(
        &api,
        "valve",
        json!({"spec": {"credentials": {"secretName": "valve-creds-2"}}}),
    )
    .await;
    let t = s
        .wait_until(
            &api,
            "valve",
            "a certificate in the new Secret",
            |t: &Thing| {
                let d = t.status.as_ref().and_then(|st| st.device.as_ref());
                d.and_then(|d| d.certificate_id.as_deref())
                    .is_some_and(|id| id != first)
                    && is_ready(t)
            },
        )
        .await;
    let second = t.status.unwrap().device.unwrap().certificate_id.unwrap();
    assert_eq!(cert_status(&iot, &second).await.as_deref(), Some("ACTIVE"));
    assert_eq!(
        cert_status(&iot, &first).await,
        None,
        "the old certificate is still there"
    );
    s.wait_for("a CredentialRevoked Event", || async {
        events(&s.client, &s.ns)
            .await
            .iter()
            .any(|e| e.contains("CredentialRevoked"))
            .then_some(())
    })
    .await;

    // The device Secret deleted: reissued, and the certificate it held revoked.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = s.api();
    secrets
        .delete("valve-creds-2", &DeleteParams::default())
        .await
        .expect("Secret deleted");
    merge_patch(
        &api,
        "valve",
        json!({"metadata": {"annotations": {"poke": "1"}}}),
    )
    .await;
    let t = s
        .wait_until(&api, "valve", "a reissued certificate", |t: &Thing| {
            let d = t.status.as_ref().and_then(|st| st.device.as_ref());
            d.and_then(|d| d.certificate_id.as_deref())
                .is_some_and(|id| id != second)
                && is_ready(t)
        })
        .await;
    let third = t.status.unwrap().device.unwrap().certificate_id.unwrap();
    assert_eq!(cert_status(&iot, &third).await.as_deref(), Some("ACTIVE"));
    assert_eq!(
        cert_status(&iot, &second).await,
        None,
        "the deleted Secret's certificate is still there"
    );
}

/// The end of a rotation overlap is a deadline of its own: with a shadow poll of ten minutes,
/// the old certificate is still revoked once its short overlap has passed (the reconcile the
/// rotation's own status write triggers must not push the deadline back to the poll).
#[tokio::test]
async fn aws_rotation_overlap_ends_without_waiting_for_the_poll() {
    let s = setup("aws-overlap").await;
    let op = s.operator().aws().ready().await;
    let iot = iot(&s.env);
    let api = s.things();
    thing("fan")
        .spec(json!({
            "broker": "AWS",
            "credentials": {"rotationOverlap": "3s"},
            "shadow": {"pollInterval": "10m"}
        }))
        .create(&api)
        .await;
    let t = s.wait_ready(&api, "fan").await;
    let old = t.status.unwrap().device.unwrap().certificate_id.unwrap();
    merge_patch(
        &api,
        "fan",
        json!({"metadata": {"annotations": {"iot.thing-operator.dev/rotate": "1"}}}),
    )
    .await;
    s.wait_for("rotated", || async {
        let t = api.get("fan").await.ok()?;
        let id = t.status.as_ref()?.device.as_ref()?.certificate_id.clone()?;
        (id != old).then_some(())
    })
    .await;
    // Bounded by the test's wait (90 s), far below the ten-minute poll that would otherwise be
    // the next look at this Thing.
    s.wait_for("old certificate revoked at the overlap's end", || async {
        let t = api.get("fan").await.ok()?;
        let recorded = t.status?.credentials?.previous_certificate_id;
        (recorded.is_none() && cert_status(&iot, &old).await.is_none()).then_some(())
    })
    .await;
    api.delete("fan", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "fan").await;
    drop(op);
}

/// Deleting an AWS Thing clears what the REST message broker retained for it (its `state` topic),
/// as for every backend: a subscriber that comes later gets no document of a Thing that is gone.
#[tokio::test]
async fn aws_thing_deletion_clears_its_retained_state() {
    let s = setup("aws-retained").await;
    let prefix = topic_prefix();
    let op = s.operator().aws().mqtt(&prefix).ready().await;
    let api = s.things();
    thing("meter").broker("AWS").create(&api).await;
    s.wait_ready(&api, "meter").await;
    let state_topic = format!("{prefix}/namespaces/{}/things/meter/state", s.ns);
    let mut watcher = Device::start(&Credentials::admin(&s.env), vec![state_topic.clone()]);
    watcher.connected().await;
    let state = watcher.message(&state_topic).await;
    assert_eq!(state["name"], json!("meter"));
    drop(watcher);

    api.delete("meter", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "meter").await;
    // A retained message is delivered right after the SUBACK, before anything published later on
    // the same connection: a marker published after subscribing arrives first only when nothing
    // is retained.
    let marker = format!("{prefix}/test/marker");
    let mut late = Device::start(
        &Credentials::admin(&s.env),
        vec![state_topic.clone(), marker.clone()],
    );
    late.connected().await;
    late.suback().await;
    late.publish(&marker, "{}").await;
    let first = late
        .next("the marker or a retained state", |e| match e {
            DeviceEvent::Message(topic, payload) => Some((topic.clone(), payload.clone())),
            _ => None,
        })
        .await;
    assert_eq!(
        first.0,
        marker,
        "retained state of a deleted Thing: {}",
        String::from_utf8_lossy(&first.1)
    );
    drop(op);
}

/// A policy with this Thing's policy name that another tool made before the Thing existed is
/// not taken over: `Conflict`, and its document stays as it was. A policy made after the Thing
/// (an interrupted run of its own) is adopted; tests/aws_crash.rs covers that.
#[tokio::test]
async fn a_policy_made_outside_the_operator_is_a_conflict() {
    let s = setup("aws-pol").await;
    let ns = &s.ns;
    let iot = iot(&s.env);
    let policy_name = format!("{ns}_heater-policy");
    let foreign = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]})
    .to_string();
    iot.create_policy()
        .policy_name(&policy_name)
        .policy_document(&foreign)
        .send()
        .await
        .expect("another tool's policy");
    // The Thing comes later than the policy by more than the clock-skew margin (5 s): wait on
    // the API server's clock, not on a timer.
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> = s.api();
    let policy_time = chrono::Utc::now();
    s.wait_for("the API server's clock past the margin", || async {
        let name = format!("clock-{:08x}", rand::random::<u32>());
        let cm: k8s_openapi::api::core::v1::ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        let made = configmaps.create(&Default::default(), &cm).await.ok()?;
        let at = made.metadata.creation_timestamp?.0.as_second();
        (at > policy_time.timestamp() + 6).then_some(())
    })
    .await;
    let _op = s.operator().aws().ready().await;
    let api = s.things();
    thing("heater").broker("AWS").create(&api).await;
    let ready = s
        .wait_condition(&api, "heater", "Ready", |c| c.reason == "Conflict")
        .await;
    assert!(ready.message.contains(&policy_name), "{}", ready.message);
    let after = iot
        .get_policy()
        .policy_name(&policy_name)
        .send()
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(after.policy_document().unwrap()).unwrap();
    assert_eq!(
        doc,
        serde_json::from_str::<serde_json::Value>(&foreign).unwrap()
    );
}

/// A certificate another tool attached to the Thing's thing does not block deletion, and is not
/// the operator's to delete: AWS refuses DeleteThing while it is attached, the operator then
/// detaches it (and only detaches it) and deletes the thing.
#[tokio::test]
async fn a_principal_attached_by_another_tool_is_detached_not_deleted() {
    let s = setup("aws-principal").await;
    let (client, ns) = (&s.client, &s.ns);
    let op = s.operator().aws().ready().await;
    let iot = iot(&s.env);
    let api = s.things();
    thing("valve").broker("AWS").create(&api).await;
    s.wait_ready(&api, "valve").await;
    let thing_name = format!("{ns}_valve");
    let foreign = iot
        .create_keys_and_certificate()
        .set_as_active(true)
        .send()
        .await
        .expect("another tool's certificate");
    let (foreign_id, foreign_arn) = (
        foreign.certificate_id().unwrap().to_string(),
        foreign.certificate_arn().unwrap().to_string(),
    );
    iot.attach_thing_principal()
        .thing_name(&thing_name)
        .principal(&foreign_arn)
        .send()
        .await
        .expect("attached by another tool");

    api.delete("valve", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "valve").await;
    assert!(!thing_exists(&iot, &thing_name).await);
    assert_eq!(
        cert_status(&iot, &foreign_id).await.as_deref(),
        Some("ACTIVE"),
        "another tool's certificate was changed"
    );
    let all_events = events(client, ns).await.join("\n");
    assert!(
        all_events.contains(&format!("PrincipalDetached: detached {foreign_arn}")),
        "{all_events}"
    );
    let _ = iot
        .update_certificate()
        .certificate_id(&foreign_id)
        .new_status(aws_sdk_iot::types::CertificateStatus::Inactive)
        .send()
        .await;
    let _ = iot
        .delete_certificate()
        .certificate_id(&foreign_id)
        .send()
        .await;
    drop(op);
}
