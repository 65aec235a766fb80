//! The whole Azure lifecycle against a real kube-apiserver and the IoT Hub double: create, Ready,
//! Secret (certificate whose thumbprint the hub holds, key only in the cluster), attributes to
//! tags, desired to the twin, reported (written by the device simulator) to status, idle reconciles
//! that write nothing, a device deleted behind the operator's back re-created, a certificate
//! changed behind its back restored, deletion leaves no device, and no key material in status,
//! Events or logs. Also: the double validates SAS tokens (a wrong or missing one is refused).

mod azure_support;
mod common;

use azure_support::*;
use common::{merge_patch, thing};
use kube::api::DeleteParams;
use serde_json::json;
use thing_operator::{credentials::pki, provider::azure::credentials::thumbprint};

#[tokio::test]
async fn azure_thing_full_lifecycle() {
    let s = setup("az-life").await;
    let (client, ns) = (&s.client, &s.ns);
    let op = azure(s.operator(), &s.env).ready().await;
    let hub = Hub::new(&s.env);
    let api = s.things();

    thing("pump")
        .spec(json!({
            "broker": "Azure",
            "attributes": {"model": "rpi4"},
            "desired": {"temp": 26, "mode": {"fan": "auto"}},
            "shadow": {"pollInterval": "1s"}
        }))
        .create(&api)
        .await;
    let t = s.wait_ready(&api, "pump").await;
    let id = format!("{ns}_pump");
    let st = t.status.clone().unwrap();
    let dev = st.device.clone().unwrap();
    assert_eq!(dev.thing_name.as_deref(), Some(id.as_str()));
    assert_eq!(dev.device_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        dev.endpoint.as_deref(),
        Some("double.azure-devices.net:8883")
    );
    assert_eq!(dev.secret_name.as_deref(), Some("pump-device"));
    for c in ["Provisioned", "CredentialsReady", "InSync"] {
        assert!(st.conditions.is_true(c), "{c}: {:?}", st.conditions);
    }

    // The hub side: a self-signed device whose thumbprint is the Secret's certificate's.
    let device = hub.device(&id).await.expect("device in the hub");
    assert_eq!(device["authentication"]["type"], "selfSigned");
    let secret = secret_data(client, ns, "pump-device").await.unwrap();
    for k in [
        "tls.crt",
        "tls.key",
        "ca.crt",
        "endpoint",
        "hostName",
        "deviceId",
        "thingName",
    ] {
        assert!(secret.contains_key(k), "Secret lacks {k}");
    }
    assert_eq!(secret["hostName"], "double.azure-devices.net");
    assert_eq!(secret["deviceId"], id);
    assert!(pki::key_matches_certificate(&secret["tls.key"], &secret["tls.crt"]).unwrap());
    let thumb = thumbprint(&secret["tls.crt"]).unwrap();
    assert_eq!(
        device["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        json!(thumb)
    );
    assert_eq!(dev.certificate_id.as_deref(), Some(thumb.as_str()));
    assert_eq!(secret["ca.crt"].matches("BEGIN CERTIFICATE").count(), 2);
    // The twin: attributes as tags with the owner record, desired as desired properties.
    let twin = hub.twin(&id).await.unwrap();
    assert_eq!(twin["tags"]["model"], "rpi4");
    assert_eq!(
        twin["tags"]["thing-operator-owner"],
        json!(format!("{ns}/pump/{}", t.metadata.uid.clone().unwrap()))
    );
    assert_eq!(twin["properties"]["desired"]["temp"], 26);
    assert_eq!(
        twin["properties"]["desired"]["mode"],
        json!({"fan": "auto"})
    );

    // The device reports (as the holder of the Secret's certificate): reported, delta and
    // $version reach status. A certificate the hub does not know is refused by the double.
    let other = pki::generate_self_signed("intruder", 1).unwrap();
    assert_eq!(
        hub.report(&id, &other.certificate_pem, json!({"temp": 99}))
            .await,
        401
    );
    assert_eq!(
        hub.report(&id, &secret["tls.crt"], json!({"temp": 24}))
            .await,
        200
    );
    let t = s
        .wait_for("reported state in status", || async {
            let t = api.get("pump").await.ok()?;
            let st = t.status.clone()?;
            (st.reported.as_ref()?.0.get("temp")? == &json!(24)).then_some(t)
        })
        .await;
    let st = t.status.clone().unwrap();
    let reported_version = hub.twin(&id).await.unwrap()["properties"]["reported"]["$version"]
        .as_i64()
        .unwrap();
    assert_eq!(st.version, Some(reported_version));
    assert_eq!(st.delta.as_ref().unwrap().0.get("temp"), Some(&json!(26)));
    assert_eq!(st.reported_summary.as_deref(), Some(r#"{"temp":24}"#));

    // Idle: twin reads go on (paced by the poll interval) but nothing is written, neither to
    // the hub nor to the Thing.
    let rv = t.metadata.resource_version.clone();
    let desired_version = hub.twin(&id).await.unwrap()["properties"]["desired"]["$version"].clone();
    let reads = hub.requests(&format!("GET /twins/{id}")).await;
    s.wait_for("three more twin reads", || async {
        (hub.requests(&format!("GET /twins/{id}")).await >= reads + 3).then_some(())
    })
    .await;
    let twin = hub.twin(&id).await.unwrap();
    assert_eq!(twin["properties"]["desired"]["$version"], desired_version);
    assert_eq!(
        api.get("pump").await.unwrap().metadata.resource_version,
        rv,
        "an idle Thing got a status write"
    );

    // A spec change reaches the twin: changed keys set, removed keys deleted, tags updated.
    merge_patch(
        &api,
        "pump",
        json!({"spec": {"desired": {"temp": 27, "mode": null}, "attributes": {"model": "rpi5"}}}),
    )
    .await;
    s.wait_for("desired 27 and tags in the twin", || async {
        let twin = hub.twin(&id).await?;
        let desired = &twin["properties"]["desired"];
        (desired["temp"] == 27 && desired.get("mode").is_none() && twin["tags"]["model"] == "rpi5")
            .then_some(())
    })
    .await;
    // The device catches up: delta gone.
    hub.report(&id, &secret["tls.crt"], json!({"temp": 27}))
        .await;
    s.wait_for("delta cleared", || async {
        let st = api.get("pump").await.ok()?.status?;
        (st.reported.as_ref()?.0.get("temp")? == &json!(27) && st.delta.is_none()).then_some(())
    })
    .await;

    // Drift: the device's certificate is replaced outside the operator; it is put back.
    let (status, _) = hub
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{id}"),
            Some("*"),
            Some(
                json!({"deviceId": id, "authentication": {"type": "selfSigned",
                "x509Thumbprint": {"primaryThumbprint": "00".repeat(32)}}}),
            ),
        )
        .await;
    assert_eq!(status, 200);
    s.wait_for("thumbprint restored", || async {
        let d = hub.device(&id).await?;
        (d["authentication"]["x509Thumbprint"]["primaryThumbprint"] == json!(thumb)).then_some(())
    })
    .await;
    // Drift: the device is deleted outside the operator; it is re-created with the same key.
    assert_eq!(hub.delete_device(&id).await, 204);
    s.wait_for("device re-created", || async {
        let d = hub.device(&id).await?;
        (d["authentication"]["x509Thumbprint"]["primaryThumbprint"] == json!(thumb)).then_some(())
    })
    .await;
    s.wait_for("desired restored in the new twin", || async {
        let twin = hub.twin(&id).await?;
        (twin["properties"]["desired"]["temp"] == 27).then_some(())
    })
    .await;
    // (kube's Recorder folds repeats of a reason into one Event series: one line suffices.)
    s.wait_for("a DriftRepaired Event", || async {
        let ev = events(client, ns).await;
        ev.iter()
            .any(|e| e.starts_with("DriftRepaired"))
            .then_some(())
    })
    .await;
    s.wait_ready(&api, "pump").await;

    // No key material in status, Events or logs.
    let status_json = serde_json::to_string(&api.get("pump").await.unwrap().status).unwrap();
    let cs = std::fs::read_to_string(s.env.var("AZURE_CONNECTION_STRING_FILE")).unwrap();
    let policy_key = cs
        .split("SharedAccessKey=")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    let key_body: String = secret["tls.key"]
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let all_events = events(client, ns).await.join("\n");
    let logs = op.logs();
    for (what, text) in [
        ("status", &status_json),
        ("events", &all_events),
        ("logs", &logs),
    ] {
        assert!(!text.contains("PRIVATE KEY"), "{what} holds a private key");
        assert!(
            !text.contains(&key_body[..40]),
            "{what} holds the device key"
        );
        assert!(
            !text.contains(&policy_key),
            "{what} holds the hub policy key"
        );
        assert!(
            !text.contains("SharedAccessSignature"),
            "{what} holds a SAS token"
        );
    }

    // Deletion: the device goes, then the Thing; the Secret is garbage-collected.
    api.delete("pump", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "pump").await;
    assert!(hub.device(&id).await.is_none(), "device left in the hub");
    assert!(hub.twin(&id).await.is_none());
    drop(op);
}

/// The double checks SAS tokens as IoT Hub documents them, so a client that signs wrongly
/// cannot pass the tests: no token, a token signed with another key, an expired token and a
/// token for another hub are all refused with 401 IotHubUnauthorizedAccess.
#[tokio::test]
async fn the_double_refuses_tokens_iot_hub_would_refuse() {
    let s = setup("az-sas").await;
    let hub = Hub::new(&s.env);
    let host = s.env.var("AZURE_HUB");
    let path = "/devices/nobody";
    let other_key = thing_operator::provider::azure::sas::ConnectionString::parse(&format!(
        "HostName={host};SharedAccessKeyName=iothubowner;SharedAccessKey=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
    ))
    .unwrap();
    let now = chrono::Utc::now().timestamp();
    let cs_text = std::fs::read_to_string(s.env.var("AZURE_CONNECTION_STRING_FILE")).unwrap();
    let ours = thing_operator::provider::azure::sas::ConnectionString::parse(&cs_text).unwrap();
    let cases = [
        ("no token", None),
        (
            "another key",
            Some(other_key.token_for(&host, now + 600).unwrap()),
        ),
        ("expired", Some(ours.token_for(&host, now - 10).unwrap())),
        (
            "another hub",
            Some(
                ours.token_for("other.azure-devices.net", now + 600)
                    .unwrap(),
            ),
        ),
    ];
    for (what, auth) in cases {
        let (status, body) = hub
            .call_with(reqwest::Method::GET, path, None, None, auth)
            .await;
        assert_eq!(status, 401, "{what}: {body}");
    }
    // The right token gets through (404: no such device).
    let (status, _) = hub.call(reqwest::Method::GET, path, None, None).await;
    assert_eq!(status, 404);
}

/// Reported state written by the device reaches Observers through the state feed, once per
/// reported `$version`: idle twin reads forward nothing.
#[tokio::test]
async fn reported_state_reaches_observers_once_per_version() {
    let s = setup("az-obs").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    let (url, received) = common::http_receiver().await;
    // The sink is on loopback, which HTTP sinks may not reach by default.
    let _op = azure(s.operator(), &s.env)
        .args(["--http-sink-allow-cidr", "127.0.0.0/8"])
        .ready()
        .await;
    thing("gauge")
        .spec(json!({"broker": "Azure", "shadow": {"pollInterval": "1s"}}))
        .create(&api)
        .await;
    s.wait_ready(&api, "gauge").await;
    let observers: kube::Api<thing_operator::api::Observer> = s.api();
    common::create_resource(
        &observers,
        "o1",
        json!({"source": {"thingName": "gauge"}, "filter": {"section": "Reported"}, "sink": {"http": {"url": url}}}),
    )
    .await;
    let id = format!("{}_gauge", s.ns.name());
    let cert = secret_data(&s.client, s.ns.name(), "gauge-device")
        .await
        .unwrap()["tls.crt"]
        .clone();
    let levels = || {
        received
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| e["data"]["state"]["level"].as_i64())
            .collect::<Vec<_>>()
    };
    assert_eq!(hub.report(&id, &cert, json!({"level": 3})).await, 200);
    s.wait_for("level 3 forwarded", || async {
        levels().contains(&3).then_some(())
    })
    .await;
    // Idle: more twin reads, nothing new forwarded.
    let reads = hub.requests(&format!("GET /twins/{id}")).await;
    s.wait_for("three more twin reads", || async {
        (hub.requests(&format!("GET /twins/{id}")).await >= reads + 3).then_some(())
    })
    .await;
    assert_eq!(
        levels(),
        vec![3],
        "an unchanged $version was forwarded again"
    );
    assert_eq!(hub.report(&id, &cert, json!({"level": 4})).await, 200);
    s.wait_for("level 4 forwarded", || async {
        (levels() == vec![3, 4]).then_some(())
    })
    .await;
}

/// `credentials.source: CloudIssued`: a symmetric-key device; the Secret holds its connection
/// string, the device simulator reports with a SAS token signed with
/// that key, keys regenerated on the hub reach the Secret, and deletion removes the device.
#[tokio::test]
async fn symmetric_key_device() {
    let s = setup("az-sas-dev").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    let _op = azure(s.operator(), &s.env).ready().await;
    thing("tag")
        .spec(json!({"broker": "Azure", "credentials": {"source": "CloudIssued"}, "desired": {"beep": 1}}))
        .create(&api)
        .await;
    s.wait_ready(&api, "tag").await;
    let id = format!("{}_tag", s.ns.name());
    let device = hub.device(&id).await.unwrap();
    assert_eq!(device["authentication"]["type"], "sas");
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let secret = secret_data(&s.client, s.ns.name(), "tag-device")
        .await
        .unwrap();
    assert_eq!(
        secret["connectionString"],
        format!("HostName=double.azure-devices.net;DeviceId={id};SharedAccessKey={key}")
    );
    assert!(!secret.contains_key("tls.key"));
    let status_json = serde_json::to_string(&api.get("tag").await.unwrap().status).unwrap();
    assert!(!status_json.contains(&key), "the key is in status");

    // The device reports with a token signed with its key (the way an SDK would).
    let token = thing_operator::provider::azure::sas::token(
        &format!("double.azure-devices.net/devices/{id}"),
        None,
        &azure_core::credentials::Secret::new(key.clone()),
        chrono::Utc::now().timestamp() + 600,
    )
    .unwrap();
    let r = reqwest::Client::new()
        .patch(format!(
            "{}/_double/devices/{id}/reported",
            s.env.var("AZURE_URL")
        ))
        .header("Authorization", token)
        .json(&json!({"beep": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    s.wait_for("reported state in status", || async {
        let st = api.get("tag").await.ok()?.status?;
        (st.reported?.0.get("beep")? == &json!(1)).then_some(())
    })
    .await;

    // Keys regenerated on the hub: the Secret follows.
    let (code, _) = hub
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{id}"),
            Some("*"),
            Some(json!({"deviceId": id, "authentication": {"type": "sas"}})),
        )
        .await;
    assert_eq!(code, 200);
    let new_key = hub.device(&id).await.unwrap()["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_key, key);
    s.wait_for("the Secret follows the hub's new key", || async {
        let d = secret_data(&s.client, s.ns.name(), "tag-device").await?;
        d["connectionString"].ends_with(&new_key).then_some(())
    })
    .await;

    api.delete("tag", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "tag").await;
    assert!(hub.device(&id).await.is_none());
}
