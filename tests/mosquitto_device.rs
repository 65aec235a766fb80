//! Mosquitto Things end to end: real kube-apiserver, real Mosquitto with dynamic security, the
//! operator as a process, devices as rumqttc clients using their Secret.

mod common;
mod mosquitto_support;

use std::time::Duration;

use serde_json::json;

use common::{create_resource, merge_patch, thing};
use mosquitto_support::{Device, setup, try_connect};

/// A device connects with its Secret, reports, and the status shows it; a desired edit reaches
/// it as a delta; deleting the Thing removes its broker client.
#[tokio::test]
async fn device_reports_gets_delta_and_is_removed_on_delete() {
    let s = setup("mq-device", &["--status-write-interval", "500ms"]).await;
    thing("lamp")
        .desired(json!({"on": false}))
        .create(&s.things)
        .await;
    let thing = s.wait_ready(&s.things, "lamp").await;
    let status = thing.status.unwrap();
    let device_status = status.device.unwrap();
    let creds = s.credentials("lamp").await;
    assert_eq!(
        device_status.client_id.as_deref(),
        Some(creds.client_id.as_str())
    );
    assert_eq!(device_status.topic.as_deref(), Some(creds.topic.as_str()));
    assert_eq!(
        creds.topic,
        format!("{}/namespaces/{}/things/lamp", s.prefix, s.ns)
    );
    // The password is in the Secret only.
    let status_json = serde_json::to_string(&s.things.get("lamp").await.unwrap().status).unwrap();
    assert!(!status_json.contains(&creds.password));

    let root = creds.aws_root();
    let mut dev = Device::start(
        &creds,
        vec![
            format!("{root}/update/accepted"),
            format!("{root}/update/rejected"),
            format!("{root}/update/delta"),
            format!("{root}/get/accepted"),
        ],
    );
    dev.connected().await;
    // Subscriptions are granted (SUBACK success for all four).
    let ok = dev.suback().await;
    assert!(
        ok.iter().all(|b| *b),
        "device may subscribe to its own shadow topics"
    );

    // The desired state is there for the device to fetch.
    dev.publish(&format!("{root}/get"), r#"{"clientToken":"g1"}"#)
        .await;
    let doc = dev.message(&format!("{root}/get/accepted")).await;
    assert_eq!(doc["state"]["desired"], json!({"on": false}));
    assert_eq!(doc["clientToken"], "g1");

    dev.publish(
        &format!("{root}/update"),
        r#"{"state":{"reported":{"on":false,"temp":21.5}},"clientToken":"r1"}"#,
    )
    .await;
    let acc = dev.message(&format!("{root}/update/accepted")).await;
    assert_eq!(acc["clientToken"], "r1");
    assert!(acc["metadata"]["reported"]["temp"]["timestamp"].is_i64());
    s.wait_until(&s.things, "lamp", "reported state in status", |t| {
        t.status
            .as_ref()
            .and_then(|s| s.reported.as_ref())
            .is_some_and(|r| r.0.get("temp") == Some(&json!(21.5)))
    })
    .await;

    // kubectl edit of desired reaches the device as a delta, and shows in status.
    merge_patch(
        &s.things,
        "lamp",
        json!({"spec": {"desired": {"on": true}}}),
    )
    .await;
    let delta = dev.message(&format!("{root}/update/delta")).await;
    assert_eq!(delta["state"], json!({"on": true}));
    s.wait_until(&s.things, "lamp", "delta in status", |t| {
        t.status
            .as_ref()
            .and_then(|s| s.delta.as_ref())
            .is_some_and(|d| d.0.get("on") == Some(&json!(true)))
    })
    .await;
    // The device applies it; the delta clears.
    dev.publish(
        &format!("{root}/update"),
        r#"{"state":{"reported":{"on":true}}}"#,
    )
    .await;
    dev.message(&format!("{root}/update/accepted")).await;
    let t = s
        .wait_until(&s.things, "lamp", "delta cleared", |t| {
            t.status.as_ref().is_some_and(|s| {
                s.delta.is_none()
                    && s.reported
                        .as_ref()
                        .is_some_and(|r| r.0.get("on") == Some(&json!(true)))
            })
        })
        .await;
    assert!(t.status.unwrap().version.unwrap() >= 3);

    // The same shadow is on the Thing's own topic tree.
    let path_root = format!("{}/shadow", creds.topic);
    drop(dev);
    let mut dev = Device::start(
        &creds,
        vec![
            format!("{path_root}/get/accepted"),
            format!("{}/state", creds.topic),
        ],
    );
    dev.connected().await;
    // The retained state document of the REST message broker arrives on subscribing.
    let state = dev.message(&format!("{}/state", creds.topic)).await;
    dev.publish(&format!("{path_root}/get"), "").await;
    let doc = dev.message(&format!("{path_root}/get/accepted")).await;
    assert_eq!(doc["state"]["reported"]["on"], json!(true));
    assert_eq!(state["name"], "lamp");
    drop(dev);

    // Deleting the Thing removes its broker client: its credentials stop working.
    s.things.delete("lamp", &Default::default()).await.unwrap();
    s.wait_gone(&s.things, "lamp").await;
    assert!(
        try_connect(&creds).await.is_err(),
        "deleted Thing's credentials still accepted"
    );
    // Client and role are gone from the dynamic-security configuration.
    let admin = s.admin_credentials();
    let ctrl = |what: &str, name: &str| {
        let out = std::process::Command::new("mosquitto_ctrl")
            .args(["-h", "127.0.0.1", "-p", &s.env.var("MQTT_PORT")])
            .args([
                "-u",
                &admin.username,
                "-P",
                &admin.password,
                "dynsec",
                what,
                name,
            ])
            .output()
            .expect("mosquitto_ctrl runs");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(ctrl("getClient", &creds.username).contains("not found"));
    assert!(ctrl("getRole", &format!("thing:{}", creds.thing_name)).contains("not found"));
}

/// A device cannot reach another Thing's topics; bad credentials cannot connect.
#[tokio::test]
async fn acl_isolation_and_bad_credentials() {
    let s = setup("mq-acl", &[]).await;
    thing("a").desired(json!({})).create(&s.things).await;
    thing("b").desired(json!({})).create(&s.things).await;
    s.wait_ready(&s.things, "a").await;
    s.wait_ready(&s.things, "b").await;
    let (ca, cb) = (s.credentials("a").await, s.credentials("b").await);

    // Wrong password, unknown user, someone else's client id: refused at connect.
    let mut wrong = ca.clone();
    wrong.password = "not-the-password".into();
    assert!(try_connect(&wrong).await.is_err());
    let mut unknown = ca.clone();
    unknown.username = "nobody".into();
    assert!(try_connect(&unknown).await.is_err());
    let mut stolen_id = ca.clone();
    stolen_id.client_id = cb.client_id.clone();
    assert!(
        try_connect(&stolen_id).await.is_err(),
        "a device may only use its own client id"
    );

    // Subscribing to b's topics is refused in the SUBACK.
    let (ra, rb) = (ca.aws_root(), cb.aws_root());
    let mut dev = Device::start(
        &ca,
        vec![
            format!("{rb}/update/accepted"),
            format!("{}/#", cb.topic),
            format!("{ra}/update/accepted"),
        ],
    );
    dev.connected().await;
    let acks = dev.suback().await;
    assert_eq!(acks, vec![false, false, true]);

    // Publishing into b's shadow is dropped by the broker: a's own report, sent after it on the
    // same connection, is answered, and b's shadow is still empty.
    dev.publish(
        &format!("{rb}/update"),
        r#"{"state":{"reported":{"hacked":true}}}"#,
    )
    .await;
    dev.publish(
        &format!("{}/shadow/update", cb.topic),
        r#"{"state":{"reported":{"hacked":true}}}"#,
    )
    .await;
    dev.publish(
        &format!("{ra}/update"),
        r#"{"state":{"reported":{"mine":1}}}"#,
    )
    .await;
    dev.message(&format!("{ra}/update/accepted")).await;
    let mut devb = Device::start(&cb, vec![format!("{rb}/get/accepted")]);
    devb.connected().await;
    devb.publish(&format!("{rb}/get"), "").await;
    let doc = devb.message(&format!("{rb}/get/accepted")).await;
    assert_eq!(doc["version"], 0, "b's shadow untouched: {doc}");
    assert!(doc["state"]["reported"].as_object().unwrap().is_empty());
}

/// Malformed requests get a rejection with the right code and change nothing.
#[tokio::test]
async fn malformed_payloads_are_rejected() {
    let mut s = setup("mq-bad", &[]).await;
    thing("m").desired(json!({"x": 1})).create(&s.things).await;
    s.wait_ready(&s.things, "m").await;
    let c = s.credentials("m").await;
    let root = c.aws_root();
    let mut dev = Device::start(
        &c,
        vec![
            format!("{root}/update/rejected"),
            format!("{root}/update/accepted"),
            format!("{root}/get/accepted"),
        ],
    );
    dev.connected().await;
    dev.publish(
        &format!("{root}/update"),
        r#"{"state":{"reported":{"x":1}}}"#,
    )
    .await;
    // Created with its desired state: the shadow starts at version 0, the report makes it 1.
    assert_eq!(
        dev.message(&format!("{root}/update/accepted")).await["version"],
        1
    );

    let deep = format!(
        r#"{{"state":{{"reported":{}1{}}}}}"#,
        r#"{"a":"#.repeat(10),
        "}".repeat(10)
    );
    let big = format!(
        r#"{{"state":{{"reported":{{"x":"{}"}}}}}}"#,
        "a".repeat(20_000)
    );
    let cases: Vec<(Vec<u8>, i64)> = vec![
        (b"not json at all".to_vec(), 400),
        (b"[1,2,3]".to_vec(), 400),
        (br#""a string""#.to_vec(), 400),
        (big.into_bytes(), 413),
        (deep.into_bytes(), 400),
        (
            br#"{"state":{"reported":{"x":5}},"version":5}"#.to_vec(),
            409,
        ),
        (br#"{"state":{"desired":{"x":5}}}"#.to_vec(), 400),
        (vec![0xff, 0x00, 0xfe], 400),
    ];
    for (payload, code) in cases {
        dev.publish(&format!("{root}/update"), payload).await;
        let rej = dev.message(&format!("{root}/update/rejected")).await;
        assert_eq!(rej["code"], code, "{rej}");
    }
    dev.publish(&format!("{root}/get"), "").await;
    let doc = dev.message(&format!("{root}/get/accepted")).await;
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["state"]["reported"], json!({"x": 1}));
    assert!(s.operator.is_running());
    // And it still works.
    dev.publish(
        &format!("{root}/update"),
        r#"{"state":{"reported":{"x":2}},"version":1}"#,
    )
    .await;
    assert_eq!(
        dev.message(&format!("{root}/update/accepted")).await["version"],
        2
    );
}

/// Device reports reach Observers from memory at once, not through paced status writes: with a
/// 30 s status interval, the tenth report of a burst is forwarded within seconds while the
/// status still shows the first.
#[tokio::test]
async fn observers_see_reports_before_status_does() {
    let (url, received) = common::http_receiver().await;

    // The sink is on loopback, which HTTP sinks may not reach by default.
    let s = setup(
        "mq-observe",
        &[
            "--status-write-interval",
            "30s",
            "--http-sink-allow-cidr",
            "127.0.0.0/8",
        ],
    )
    .await;
    thing("meter").desired(json!({})).create(&s.things).await;
    s.wait_ready(&s.things, "meter").await;
    let observers: kube::Api<thing_operator::api::Observer> = s.api();
    create_resource(
        &observers,
        "o",
        json!({
            "source": {"thingName": "meter"},
            "filter": {"section": "Reported"},
            "sink": {"http": {"url": url}},
        }),
    )
    .await;

    let c = s.credentials("meter").await;
    let root = c.aws_root();
    let mut dev = Device::start(&c, vec![format!("{root}/update/accepted")]);
    dev.connected().await;
    for seq in 1..=10 {
        dev.publish(
            &format!("{root}/update"),
            format!(r#"{{"state":{{"reported":{{"seq":{seq}}}}}}}"#),
        )
        .await;
        dev.message(&format!("{root}/update/accepted")).await;
    }
    common::wait_for(
        "the last report at the Observer's sink",
        Duration::from_secs(20),
        || async {
            let r = received.lock().unwrap().clone();
            r.iter()
                .any(|e| e["data"]["state"]["seq"] == json!(10))
                .then_some(())
        },
    )
    .await;
    let t = s.things.get("meter").await.unwrap();
    let status_seq = t
        .status
        .and_then(|st| st.reported)
        .and_then(|r| r.0.get("seq").cloned());
    assert_ne!(
        status_seq,
        Some(json!(10)),
        "status is paced: it cannot have the last report yet"
    );
}

#[tokio::test]
async fn a_cluster_id_goes_into_the_derived_device_name() {
    let s = setup("mq-cluster", &["--cluster-id", "east-1"]).await;
    thing("lamp").create(&s.things).await;
    let t = s.wait_ready(&s.things, "lamp").await;
    let expected = format!("east-1:{}_lamp", s.ns);
    let device = t.status.and_then(|st| st.device).expect("device status");
    assert_eq!(device.thing_name.as_deref(), Some(expected.as_str()));
    let creds = s.credentials("lamp").await;
    assert_eq!(creds.thing_name, expected);
    // The device logs in and is served under that name (its AWS-layout shadow topics).
    let root = creds.aws_root();
    let mut dev = Device::start(&creds, vec![format!("{root}/update/accepted")]);
    dev.connected().await;
    dev.publish(
        &format!("{root}/update"),
        r#"{"state":{"reported":{"on":true}}}"#,
    )
    .await;
    let accepted = dev.message(&format!("{root}/update/accepted")).await;
    assert_eq!(
        accepted["state"]["reported"]["on"],
        json!(true),
        "{accepted}"
    );
}

#[tokio::test]
async fn a_renamed_device_secret_leaves_no_usable_password() {
    let s = setup("mq-secret", &[]).await;
    thing("lamp").create(&s.things).await;
    s.wait_ready(&s.things, "lamp").await;
    let old = s.credentials("lamp").await;
    try_connect(&old).await.expect("the first password works");

    merge_patch(
        &s.things,
        "lamp",
        json!({"spec": {"credentials": {"secretName": "lamp-creds-2"}}}),
    )
    .await;
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = s.api();
    let renewed = s
        .wait_for("the new Secret", || async {
            secrets.get_opt("lamp-creds-2").await.ok().flatten()
        })
        .await;
    let new = mosquitto_support::Credentials::from_secret(&renewed);
    assert_ne!(new.password, old.password);
    s.wait_for("the new password to work", || async {
        try_connect(&new).await.ok()
    })
    .await;
    assert!(
        try_connect(&old).await.is_err(),
        "the old Secret's password still logs in"
    );
}

/// Ownership on the broker is per Thing uid, and roles carry it too: a Thing deleted with
/// `deletionPolicy: Orphan` and created again under the same name does not take its
/// predecessor's broker client, and a role of the device's name made by someone else keeps its
/// ACLs. Both are `Conflict`, with no credential issued.
#[tokio::test]
async fn a_recreated_thing_or_a_foreign_role_is_a_conflict_not_a_takeover() {
    let s = setup("mq-owner", &[]).await;
    thing("lamp")
        .field("deletionPolicy", json!("Orphan"))
        .create(&s.things)
        .await;
    s.wait_ready(&s.things, "lamp").await;
    let orphaned = s.credentials("lamp").await;
    s.things.delete("lamp", &Default::default()).await.unwrap();
    s.wait_gone(&s.things, "lamp").await;
    try_connect(&orphaned)
        .await
        .expect("an orphaned device keeps working");

    thing("lamp").create(&s.things).await;
    let ready = s
        .wait_condition(&s.things, "lamp", "Ready", |c| c.reason == "Conflict")
        .await;
    assert!(
        ready.message.contains(&orphaned.username),
        "{}",
        ready.message
    );
    try_connect(&orphaned)
        .await
        .expect("the predecessor's password was not replaced");

    // A role named as the next device's would be, made by another tool with its own mark.
    let admin = s.admin_credentials();
    let role = format!("thing:{}_heater", s.ns);
    let publisher = Device::start(&admin, vec![]);
    let create_role = json!({"commands": [{
        "command": "createRole", "rolename": role, "textname": "another tool",
        "acls": [{"acltype": "subscribePattern", "topic": "elsewhere/#", "allow": true}],
    }]});
    publisher
        .publish("$CONTROL/dynamic-security/v1", create_role.to_string())
        .await;
    let get_role = || {
        let out = std::process::Command::new("mosquitto_ctrl")
            .args(["-h", "127.0.0.1", "-p", &s.env.var("MQTT_PORT")])
            .args(["-u", &admin.username, "-P", &admin.password])
            .args(["dynsec", "getRole", &role])
            .output()
            .expect("mosquitto_ctrl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    s.wait_for("the other tool's role", || async {
        get_role().contains("elsewhere/#").then_some(())
    })
    .await;
    thing("heater").create(&s.things).await;
    let ready = s
        .wait_condition(&s.things, "heater", "Ready", |c| c.reason == "Conflict")
        .await;
    assert!(ready.message.contains(&role), "{}", ready.message);
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = s.api();
    assert!(
        secrets.get_opt("heater-device").await.unwrap().is_none(),
        "no credential is issued for a name someone else holds"
    );
    let after = get_role();
    assert!(after.contains("elsewhere/#"), "{after}");
    assert!(
        !after.contains("shadow"),
        "the role got the Thing's ACLs: {after}"
    );
    // Deleting the Thing leaves the other tool's role alone.
    s.things
        .delete("heater", &Default::default())
        .await
        .unwrap();
    s.wait_gone(&s.things, "heater").await;
    assert!(get_role().contains("elsewhere/#"));
}

/// Delivery modes under a burst of reports: `Every` delivers each report in order; `Latest`
/// may skip but never goes backwards (no older version after a newer one).
#[tokio::test]
async fn every_delivers_each_report_in_order_and_latest_never_goes_back() {
    let (every_url, every) = common::http_receiver().await;
    let (latest_url, latest) = common::http_receiver().await;
    let s = setup("mq-delivery", &["--http-sink-allow-cidr", "127.0.0.0/8"]).await;
    thing("meter").desired(json!({})).create(&s.things).await;
    s.wait_ready(&s.things, "meter").await;
    let observers: kube::Api<thing_operator::api::Observer> = s.api();
    for (name, url, mode) in [
        ("every", &every_url, "Every"),
        ("latest", &latest_url, "Latest"),
    ] {
        create_resource(
            &observers,
            name,
            json!({"source": {"thingName": "meter"}, "filter": {"section": "Reported"},
                   "delivery": mode, "sink": {"http": {"url": url}}}),
        )
        .await;
        s.wait_ready(&observers, name).await;
    }
    let c = s.credentials("meter").await;
    let root = c.aws_root();
    let mut dev = Device::start(&c, vec![format!("{root}/update/accepted")]);
    dev.connected().await;
    const REPORTS: i64 = 60;
    for seq in 1..=REPORTS {
        dev.publish(
            &format!("{root}/update"),
            format!(r#"{{"state":{{"reported":{{"seq":{seq}}}}}}}"#),
        )
        .await;
    }
    let seqs = |r: &common::Received| -> Vec<i64> {
        r.lock()
            .unwrap()
            .iter()
            .filter_map(|e| e["data"]["state"]["seq"].as_i64())
            .collect()
    };
    for received in [&every, &latest] {
        s.wait_for("the last report at the sink", || async {
            seqs(received).contains(&REPORTS).then_some(())
        })
        .await;
    }
    let every_seqs = seqs(&every);
    assert_eq!(
        every_seqs,
        (1..=REPORTS).collect::<Vec<_>>(),
        "Every: each report, in order"
    );
    let latest_seqs = seqs(&latest);
    assert!(
        latest_seqs.windows(2).all(|w| w[0] < w[1]),
        "Latest never goes backwards: {latest_seqs:?}"
    );
}
