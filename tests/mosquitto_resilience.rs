//! Mosquitto Things under stress: a broker restart mid-stream, and a telemetry storm.

mod common;
mod mosquitto_support;

use std::time::{Duration, Instant};

use serde_json::json;

use mosquitto_support::{Device, DeviceEvent, setup};

async fn metric(s: &mosquitto_support::Setup) -> f64 {
    s.operator.metric("thing_operator_status_writes_total", &["kind=\"Thing\""]).await
}

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
    s.create_thing("meter", json!({})).await;
    s.wait_ready("meter").await;
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
    s.wait_thing("meter", "reports made during the outage in status", |t| {
        reported_seq(t) == Some(5)
    })
    .await;
    common::delete_namespace(&s.client, &s.ns).await;
}

/// Many devices reporting many times a second: status writes stay at one per Thing per
/// interval, and the latest state lands.
#[tokio::test]
async fn telemetry_storm_keeps_status_writes_bounded() {
    const THINGS: usize = 6;
    const REPORTS: i64 = 100;
    const EVERY: Duration = Duration::from_millis(40);
    let interval = Duration::from_secs(1);
    let s = setup("mq-storm", &["--status-write-interval", "1s"]).await;
    let mut devices = Vec::new();
    for i in 0..THINGS {
        let name = format!("sensor-{i}");
        s.create_thing(&name, json!({"rate": 1})).await;
    }
    for i in 0..THINGS {
        let name = format!("sensor-{i}");
        s.wait_ready(&name).await;
        let c = s.credentials(&name).await;
        let mut d = Device::start(&c, vec![]);
        d.connected().await;
        devices.push((c, d));
    }
    // Let the writes of provisioning settle: the counter must be stable before the storm.
    let mut before = metric(&s).await;
    let settle_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Bounded: the writes of provisioning must be over before counting.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = metric(&s).await;
        if now == before {
            break;
        }
        assert!(Instant::now() < settle_deadline, "status writes never settled");
        before = now;
    }

    let started = Instant::now();
    let mut tasks = Vec::new();
    for (c, d) in &devices {
        let client = d.client.clone();
        let topic = format!("{}/update", c.aws_root());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            for seq in 1..=REPORTS {
                tick.tick().await;
                let body = json!({"state": {"reported": {"seq": seq, "temp": 20.0 + (seq as f64) / 10.0}}});
                client
                    .publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, body.to_string().into_bytes())
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..THINGS {
        s.wait_thing(&format!("sensor-{i}"), "latest report in status", |t| {
            reported_seq(t) == Some(REPORTS)
        })
        .await;
    }
    let elapsed = started.elapsed();
    let after = metric(&s).await;
    let writes = after - before;
    let per_thing_bound = (elapsed.as_secs_f64() / interval.as_secs_f64()).ceil() + 1.0;
    let bound = THINGS as f64 * per_thing_bound;
    let reports = THINGS as i64 * REPORTS;
    println!(
        "storm: {reports} reports from {THINGS} devices in {elapsed:?}; {writes} status writes (bound {bound}, {:.1}/s)",
        writes / elapsed.as_secs_f64()
    );
    assert!(
        writes <= bound,
        "{writes} status writes for {reports} reports, bound {bound}"
    );
    assert!(
        writes >= THINGS as f64,
        "every Thing's latest state was written"
    );
    common::delete_namespace(&s.client, &s.ns).await;
}
