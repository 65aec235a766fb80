//! Subscribers against the real API server and Mosquitto: HTTP and MQTT sources, bad input,
//! authentication, coalesced writes under a storm, and reported state through the shadow.

mod common;

use std::time::Duration;

use common::{OperatorProcess, TestEnv, create_namespace, delete_namespace, wait_for};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::PostParams};
use serde_json::{Value, json};
use thing_operator::api::{Subscriber, Thing};

const WAIT: Duration = Duration::from_secs(60);

fn thing(name: &str, spec: Value) -> Thing {
    common::resource("Thing", name, spec)
}

fn subscriber(name: &str, spec: Value) -> Subscriber {
    common::resource("Subscriber", name, spec)
}

fn mqtt_args(env: &TestEnv, ns: &str) -> Vec<String> {
    vec![
        "--mqtt-url".into(),
        env.var("MQTT_URL"),
        "--mqtt-username".into(),
        env.var("MQTT_ADMIN_USER"),
        "--mqtt-password-file".into(),
        env.var("MQTT_ADMIN_PASSWORD_FILE"),
        "--mqtt-topic-prefix".into(),
        format!("t-{ns}"),
    ]
}

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

async fn ready_reason(api: &Api<Subscriber>, name: &str) -> String {
    wait_for("Subscriber condition", WAIT, || async {
        api.get(name)
            .await
            .ok()?
            .status?
            .conditions
            .get("Ready")
            .map(|c| c.reason.clone())
    })
    .await
}

#[tokio::test]
async fn http_source_writes_desired_and_refuses_bad_input() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "sub-http").await;
    let op = OperatorProcess::start(&env, &ns, &[], &[]);
    op.wait_ready().await;
    let things: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let subs: Api<Subscriber> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    things
        .create(
            &PostParams::default(),
            &thing("lamp", json!({"broker": "Azure", "desired": {"on": false}})),
        )
        .await
        .unwrap();
    let mut secret = Secret::default();
    secret.metadata.name = Some("feed-token".into());
    secret.data = Some([("token".to_string(), ByteString(b"s3cret-token".to_vec()))].into());
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    subs.create(
        &PostParams::default(),
        &subscriber(
            "feed",
            json!({
                "source": {"http": {"path": "lamp-feed", "tokenSecret": "feed-token"}},
                "target": {"thingName": "lamp", "field": "Desired", "path": "/schedule"},
                "maxMessageBytes": 256,
            }),
        ),
    )
    .await
    .unwrap();
    assert_eq!(ready_reason(&subs, "feed").await, "Running");
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

    wait_for("desired written", WAIT, || async {
        let d = things.get("lamp").await.ok()?.spec.desired?;
        (d.0.get("schedule")? == &json!({"at": "07:00", "days": ["mon"]})
            && d.0.get("on")? == &json!(false))
            .then_some(())
    })
    .await;
    let status = wait_for("counters in status", WAIT, || async {
        let s = subs.get("feed").await.ok()?.status?;
        (s.received == Some(1) && s.rejected == Some(3)).then_some(s)
    })
    .await;
    // Rejections say why, and never echo the payload.
    let last_error = status.last_error.unwrap_or_default();
    assert!(last_error.contains("over the limit"), "{last_error}");
    assert!(!last_error.contains("xxxx"));
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn mqtt_storm_is_coalesced_and_the_latest_state_lands() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "sub-mqtt").await;
    let args = mqtt_args(&env, &ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let op = OperatorProcess::start(&env, &ns, &args, &[]);
    op.wait_ready().await;
    let things: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let subs: Api<Subscriber> = Api::namespaced(client.clone(), &ns);
    things
        .create(
            &PostParams::default(),
            &thing("panel", json!({"broker": "Azure", "desired": {}})),
        )
        .await
        .unwrap();
    subs.create(
        &PostParams::default(),
        &subscriber(
            "sensors",
            json!({
                "source": {"mqtt": {"topicFilter": format!("t-{ns}/namespaces/{ns}/sensors/+"), "qos": 1}},
                "target": {"thingName": "panel", "field": "Desired", "path": "/sensors"},
            }),
        ),
    )
    .await
    .unwrap();
    assert_eq!(ready_reason(&subs, "sensors").await, "Running");
    let generation_before = things
        .get("panel")
        .await
        .unwrap()
        .metadata
        .generation
        .unwrap();

    let password = std::fs::read_to_string(env.var("MQTT_ADMIN_PASSWORD_FILE")).unwrap();
    let mut options = rumqttc::MqttOptions::new(
        format!("storm-{ns}"),
        "127.0.0.1",
        env.var("MQTT_PORT").parse().unwrap(),
    );
    options.set_credentials(env.var("MQTT_ADMIN_USER"), password.trim());
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

    let t = wait_for("latest state of both sensors", WAIT, || async {
        let t = things.get("panel").await.ok()?;
        let s = t.spec.desired.as_ref()?.0.get("sensors")?.clone();
        (s == json!({"a": {"seq": MESSAGES}, "b": {"seq": MESSAGES - 1}})).then_some(t)
    })
    .await;
    let status = wait_for("all messages counted", WAIT, || async {
        let s = subs.get("sensors").await.ok()?.status?;
        (s.received == Some(MESSAGES) && s.rejected == Some(1)).then_some(s)
    })
    .await;
    let writes = t.metadata.generation.unwrap() - generation_before;
    assert!(
        (1..=20).contains(&writes),
        "{MESSAGES} messages caused {writes} writes of the Thing"
    );
    assert!(status.last_error.unwrap_or_default().contains("not JSON"));
    drop(op);
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn reported_target_goes_through_the_mosquitto_shadow() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "sub-rep").await;
    let args = mqtt_args(&env, &ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let op = OperatorProcess::start(&env, &ns, &args, &[]);
    op.wait_ready().await;
    let things: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let subs: Api<Subscriber> = Api::namespaced(client.clone(), &ns);
    things
        .create(
            &PostParams::default(),
            &thing(
                "meter",
                json!({"broker": "Mosquitto", "desired": {"unit": "kWh"}}),
            ),
        )
        .await
        .unwrap();
    things
        .create(
            &PostParams::default(),
            &thing("cloudy", json!({"broker": "Azure"})),
        )
        .await
        .unwrap();
    wait_for("Mosquitto Thing Ready", WAIT, || async {
        things
            .get("meter")
            .await
            .ok()?
            .status?
            .conditions
            .is_true("Ready")
            .then_some(())
    })
    .await;
    for (name, target, path) in [
        ("to-meter", "meter", "meter-in"),
        ("to-cloudy", "cloudy", "cloudy-in"),
    ] {
        subs.create(
            &PostParams::default(),
            &subscriber(
                name,
                json!({
                    "source": {"http": {"path": path}},
                    "target": {"thingName": target, "field": "Reported"},
                }),
            ),
        )
        .await
        .unwrap();
        assert_eq!(ready_reason(&subs, name).await, "Running");
    }
    let (code, _) = post(
        &op,
        &format!("/subscribers/{ns}/meter-in"),
        br#"{"energy": 42.5}"#,
        None,
    )
    .await;
    assert_eq!(code, 202);
    let status = wait_for("reported state from the Subscriber", WAIT, || async {
        let s = things.get("meter").await.ok()?.status?;
        (s.reported.as_ref()?.0.get("energy")? == &json!(42.5)).then_some(s)
    })
    .await;
    assert!(status.version.unwrap_or(0) >= 1);
    // A Thing whose backend has no shadow here: the Subscriber says why instead of losing data silently.
    assert_eq!(
        post(
            &op,
            &format!("/subscribers/{ns}/cloudy-in"),
            br#"{"x": 1}"#,
            None
        )
        .await
        .0,
        202
    );
    let s = wait_for("error on the Subscriber", WAIT, || async {
        let s = subs.get("to-cloudy").await.ok()?.status?;
        (s.rejected == Some(1)).then_some(s)
    })
    .await;
    let err = s.last_error.unwrap_or_default();
    assert!(err.contains("needs a Mosquitto Thing"), "{err}");
    drop(op);
    delete_namespace(&client, &ns).await;
}
