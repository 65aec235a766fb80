//! The broker restarts mid-stream. In a test binary of its own: restarting the shared broker
//! disconnects every other test's devices, so it must not run beside them.

mod common;
mod mosquitto_support;

use serde_json::json;

use common::thing;
use mosquitto_support::{Device, DeviceEvent, setup};

fn reported_seq(t: &thing_operator::api::Thing) -> Option<i64> {
    t.status.as_ref()?.reported.as_ref()?.0.get("seq")?.as_i64()
}

/// Waits for the operator's retained `online` announcement on a watcher connection.
async fn operator_online(watcher: &mut Device, topic: &str) {
    let t = topic.to_string();
    watcher
        .next("operator online", |e| match e {
            DeviceEvent::Message(tp, p) if *tp == t && p.as_slice() == b"online" => Some(()),
            _ => None,
        })
        .await;
}

/// The broker restarts mid-stream: the operator reconnects, and QoS 1 reports a device made
/// while it was cut off are applied.
#[tokio::test]
async fn broker_restart_keeps_qos1_reports() {
    let s = setup("mq-restart", &["--status-write-interval", "300ms"]).await;
    thing("meter").desired(json!({})).create(&s.things).await;
    s.wait_ready(&s.things, "meter").await;
    let c = s.credentials("meter").await;
    let root = c.aws_root();
    let status_topic = format!("{}/_operator/status", s.prefix);
    let mut watcher = Device::start(&s.admin_credentials(), vec![status_topic.clone()]);
    operator_online(&mut watcher, &status_topic).await;

    let mut dev = Device::start(&c, vec![format!("{root}/update/accepted")]);
    dev.connected().await;
    dev.publish(
        &format!("{root}/update"),
        r#"{"state":{"reported":{"seq":0}}}"#,
    )
    .await;
    dev.message(&format!("{root}/update/accepted")).await;

    // The device stays offline after the broker goes away until the test releases it, so the
    // reports below are made while it is cut off, and the operator is back before they arrive
    // (with no persistence, the broker would drop messages nobody is subscribed to).
    dev.hold(true);
    let env = s.env.clone();
    let restart = tokio::task::spawn_blocking(move || env.script("restart-mosquitto"));
    dev.next("device disconnected", |e| {
        matches!(e, DeviceEvent::Error(_)).then_some(())
    })
    .await;
    for seq in 1..=5 {
        dev.publish(
            &format!("{root}/update"),
            format!(r#"{{"state":{{"reported":{{"seq":{seq}}}}}}}"#),
        )
        .await;
    }
    restart.await.unwrap();
    watcher
        .next("watcher disconnected", |e| {
            matches!(e, DeviceEvent::Error(_)).then_some(())
        })
        .await;
    operator_online(&mut watcher, &status_topic).await;
    dev.hold(false);
    dev.connected().await;
    s.wait_until(
        &s.things,
        "meter",
        "reports made during the outage in status",
        |t| reported_seq(t) == Some(5),
    )
    .await;
}
