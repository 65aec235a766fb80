//! Subscribers against the real API server and Mosquitto: HTTP and MQTT sources, bad input,
//! authentication, coalesced writes under a storm, and reported state through the shadow.

mod common;

use std::time::Duration;

use common::{OperatorProcess, Setup, create_resource, thing};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::PostParams};
use serde_json::{Value, json};
use thing_operator::api::Subscriber;

async fn post(op: &OperatorProcess, path: &str, body: &[u8], token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}{}", op.http_port, path))
        .body(body.to_vec())
        .timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("operator answers");
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

async fn ready_reason(s: &Setup, api: &Api<Subscriber>, name: &str) -> String {
    s.wait_condition(api, name, "Ready", |_| true).await.reason
}

#[tokio::test]
async fn http_source_writes_desired_and_refuses_bad_input() {
    let s = Setup::new("sub-http").await;
    let ns = &s.ns;
    let op = s.operator().ready().await;
    let things = s.things();
    let subs: Api<Subscriber> = s.api();
    let secrets: Api<Secret> = s.api();
    thing("lamp")
        .broker("Azure")
        .desired(json!({"on": false}))
        .create(&things)
        .await;
    let mut secret = Secret::default();
    secret.metadata.name = Some("feed-token".into());
    secret.data = Some([("token".to_string(), ByteString(b"s3cret-token".to_vec()))].into());
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    create_resource(
        &subs,
        "feed",
        json!({
            "source": {"http": {"path": "lamp-feed", "tokenSecret": "feed-token"}},
            "target": {"thingName": "lamp", "field": "Desired", "path": "/schedule"},
            "maxMessageBytes": 256,
        }),
    )
    .await;
    assert_eq!(ready_reason(&s, &subs, "feed").await, "Running");
    let path = format!("/subscribers/{ns}/lamp-feed");

    assert_eq!(post(&op, &path, br#"{"at":"07:00"}"#, None).await.0, 401);
    assert_eq!(
        post(&op, &path, br#"{"at":"07:00"}"#, Some("wrong"))
            .await
            .0,
        401
    );
    let (code, body) = post(&op, &path, b"{not json", Some("s3cret-token")).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["result"].as_str().unwrap().contains("not JSON"));
    assert_eq!(
        post(&op, &path, b"[1,2,3]", Some("s3cret-token")).await.0,
        400
    );
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(300));
    assert_eq!(
        post(&op, &path, big.as_bytes(), Some("s3cret-token"))
            .await
            .0,
        413
    );
    assert_eq!(
        post(&op, &format!("/subscribers/{ns}/nobody"), b"{}", None)
            .await
            .0,
        404
    );
    let (code, _) = post(
        &op,
        &path,
        br#"{"at":"07:00","days":["mon"]}"#,
        Some("s3cret-token"),
    )
    .await;
    assert_eq!(code, 202);

    s.wait_for("desired written", || async {
        let d = things.get("lamp").await.ok()?.spec.desired?;
        (d.0.get("schedule")? == &json!({"at": "07:00", "days": ["mon"]})
            && d.0.get("on")? == &json!(false))
            .then_some(())
    })
    .await;
    let status = s
        .wait_for("counters in status", || async {
            let st = subs.get("feed").await.ok()?.status?;
            (st.received == Some(1) && st.rejected == Some(3)).then_some(st)
        })
        .await;
    // Rejections say why, and never echo the payload.
    let last_error = status.last_error.unwrap_or_default();
    assert!(last_error.contains("over the limit"), "{last_error}");
    assert!(!last_error.contains("xxxx"));
}

#[tokio::test]
async fn mqtt_storm_is_coalesced_and_the_latest_state_lands() {
    let s = Setup::new("sub-mqtt").await;
    let ns = &s.ns;
    let op = s.operator().mqtt(&format!("t-{ns}")).ready().await;
    let things = s.things();
    let subs: Api<Subscriber> = s.api();
    thing("panel")
        .broker("Azure")
        .desired(json!({}))
        .create(&things)
        .await;
    create_resource(
        &subs,
        "sensors",
        json!({
            "source": {"mqtt": {"topicFilter": format!("t-{ns}/namespaces/{ns}/sensors/+"), "qos": 1}},
            "target": {"thingName": "panel", "field": "Desired", "path": "/sensors"},
        }),
    )
    .await;
    assert_eq!(ready_reason(&s, &subs, "sensors").await, "Running");
    let generation_before = things
        .get("panel")
        .await
        .unwrap()
        .metadata
        .generation
        .unwrap();

    let mut options = rumqttc::MqttOptions::new(
        format!("storm-{ns}"),
        "127.0.0.1",
        s.env.var("MQTT_PORT").parse().unwrap(),
    );
    options.set_credentials(s.env.var("MQTT_ADMIN_USER"), s.env.mqtt_admin_password());
    let (device, mut eventloop) = rumqttc::AsyncClient::new(options, 1024);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    const MESSAGES: i64 = 300;
    for i in 1..=MESSAGES {
        let sensor = if i % 2 == 0 { "a" } else { "b" };
        let payload = json!({ sensor: {"seq": i} }).to_string();
        device
            .publish(
                format!("t-{ns}/namespaces/{ns}/sensors/{sensor}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }
    // A malformed one in the middle of the stream changes nothing and is counted.
    device
        .publish(
            format!("t-{ns}/namespaces/{ns}/sensors/a"),
            rumqttc::QoS::AtLeastOnce,
            false,
            "garbage",
        )
        .await
        .unwrap();

    let t = s
        .wait_for("latest state of both sensors", || async {
            let t = things.get("panel").await.ok()?;
            let sensors = t.spec.desired.as_ref()?.0.get("sensors")?.clone();
            (sensors == json!({"a": {"seq": MESSAGES}, "b": {"seq": MESSAGES - 1}})).then_some(t)
        })
        .await;
    let status = s
        .wait_for("all messages counted", || async {
            let st = subs.get("sensors").await.ok()?.status?;
            (st.received == Some(MESSAGES) && st.rejected == Some(1)).then_some(st)
        })
        .await;
    let writes = t.metadata.generation.unwrap() - generation_before;
    assert!(
        (1..=20).contains(&writes),
        "{MESSAGES} messages caused {writes} writes of the Thing"
    );
    assert!(status.last_error.unwrap_or_default().contains("not JSON"));
    drop(op);
}

#[tokio::test]
async fn reported_target_goes_through_the_mosquitto_shadow() {
    let s = Setup::new("sub-rep").await;
    let ns = &s.ns;
    let op = s.operator().mqtt(&format!("t-{ns}")).ready().await;
    let things = s.things();
    let subs: Api<Subscriber> = s.api();
    thing("meter")
        .broker("Mosquitto")
        .desired(json!({"unit": "kWh"}))
        .create(&things)
        .await;
    thing("cloudy").broker("Azure").create(&things).await;
    s.wait_ready(&things, "meter").await;
    for (name, target, path) in [
        ("to-meter", "meter", "meter-in"),
        ("to-cloudy", "cloudy", "cloudy-in"),
    ] {
        create_resource(
            &subs,
            name,
            json!({
                "source": {"http": {"path": path}},
                "target": {"thingName": target, "field": "Reported"},
            }),
        )
        .await;
        assert_eq!(ready_reason(&s, &subs, name).await, "Running");
    }
    let (code, _) = post(
        &op,
        &format!("/subscribers/{ns}/meter-in"),
        br#"{"energy": 42.5}"#,
        None,
    )
    .await;
    assert_eq!(code, 202);
    let status = s
        .wait_for("reported state from the Subscriber", || async {
            let st = things.get("meter").await.ok()?.status?;
            (st.reported.as_ref()?.0.get("energy")? == &json!(42.5)).then_some(st)
        })
        .await;
    assert!(status.version.unwrap_or(0) >= 1);
    // A Thing whose backend has no shadow here: the caller is told the write can never
    // happen (422, answered only once the write was tried), and the Subscriber says why.
    let (code, body) = post(
        &op,
        &format!("/subscribers/{ns}/cloudy-in"),
        br#"{"x": 1}"#,
        None,
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["result"]
            .as_str()
            .unwrap_or_default()
            .contains("needs a Mosquitto Thing"),
        "{body}"
    );
    let st = s
        .wait_for("error on the Subscriber", || async {
            let st = subs.get("to-cloudy").await.ok()?.status?;
            (st.rejected == Some(1)).then_some(st)
        })
        .await;
    let err = st.last_error.unwrap_or_default();
    assert!(err.contains("needs a Mosquitto Thing"), "{err}");
    drop(op);
}
