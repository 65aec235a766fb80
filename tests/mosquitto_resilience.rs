//! Mosquitto Things under stress: a telemetry storm, and an operator crash.

mod common;
mod mosquitto_support;

use std::time::{Duration, Instant};

use serde_json::json;

use common::thing;
use mosquitto_support::{Device, DeviceEvent, MosquittoSetup, setup};

/// The status-write counter once it stopped moving (bounded wait).
async fn settled_writes(s: &MosquittoSetup) -> f64 {
    let mut before = metric(s).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = metric(s).await;
        if now == before {
            return now;
        }
        assert!(Instant::now() < deadline, "status writes never settled");
        before = now;
    }
}

/// Resident memory of the operator process watching `ns` (found through /proc).
fn operator_rss_kib(ns: &str) -> Option<u64> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let watches = args
            .windows(2)
            .any(|w| w[0] == b"--watch-namespace" && w[1] == ns.as_bytes());
        if !watches {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        return line.split_whitespace().nth(1)?.parse().ok();
    }
    None
}

async fn metric(s: &MosquittoSetup) -> f64 {
    s.operator
        .metric("thing_operator_status_writes_total", &["kind=\"Thing\""])
        .await
}

fn reported_seq(t: &thing_operator::api::Thing) -> Option<i64> {
    t.status.as_ref()?.reported.as_ref()?.0.get("seq")?.as_i64()
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
        thing(&name)
            .desired(json!({"rate": 1}))
            .create(&s.things)
            .await;
    }
    for i in 0..THINGS {
        let name = format!("sensor-{i}");
        s.wait_ready(&s.things, &name).await;
        let c = s.credentials(&name).await;
        let mut d = Device::start(&c, vec![]);
        d.connected().await;
        devices.push((c, d));
    }
    // Let the writes of provisioning settle: the counter must be stable before the storm.
    let before = settled_writes(&s).await;
    let rss_before = operator_rss_kib(&s.ns);

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
    let publishing = started.elapsed();
    for i in 0..THINGS {
        s.wait_until(
            &s.things,
            &format!("sensor-{i}"),
            "latest report in status",
            |t| reported_seq(t) == Some(REPORTS),
        )
        .await;
    }
    let landed = started.elapsed();
    // Count the tail too: the last paced write may come up to one interval after the last report.
    let after = settled_writes(&s).await;
    let rss_after = operator_rss_kib(&s.ns);
    let writes = after - before;
    // Per Thing: one write at the first report, then at most one per interval, the last at most
    // one interval after the last report: floor(publishing / interval) + 2.
    let per_thing_bound = (publishing.as_secs_f64() / interval.as_secs_f64()).floor() + 2.0;
    // (A reconcile reading the Thing from a cache that has not seen our last write yet does not
    // repeat it: the controller remembers what it wrote.)
    let bound = THINGS as f64 * per_thing_bound;
    let reports = THINGS as i64 * REPORTS;
    println!(
        "storm: {reports} reports from {THINGS} devices over {publishing:?}, all landed after {landed:?}; \
         {writes} status writes (bound {bound}); operator RSS {rss_before:?} -> {rss_after:?} KiB"
    );
    assert!(
        writes <= bound,
        "{writes} status writes for {reports} reports, bound {bound}"
    );
    assert!(
        writes >= THINGS as f64,
        "every Thing's latest state was written"
    );
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        assert!(
            a < b + 64 * 1024,
            "operator memory grew from {b} KiB to {a} KiB"
        );
    }
}

/// The operator crashes: the new one restores each shadow from the Thing's status, so the
/// reported state and version continue where they were, and the device's credentials and
/// broker client are reused, not replaced.
#[tokio::test]
async fn operator_restart_restores_shadows() {
    let mut s = setup("mq-oprestart", &["--status-write-interval", "300ms"]).await;
    thing("valve")
        .desired(json!({"open": true}))
        .create(&s.things)
        .await;
    s.wait_ready(&s.things, "valve").await;
    let c = s.credentials("valve").await;
    let root = c.aws_root();
    let status_topic = format!("{}/_operator/status", s.prefix);
    let mut dev = Device::start(
        &c,
        vec![
            format!("{root}/update/accepted"),
            format!("{root}/get/accepted"),
            status_topic.clone(),
        ],
    );
    dev.connected().await;
    dev.publish(
        &format!("{root}/update"),
        r#"{"state":{"reported":{"open":true,"flow":3}}}"#,
    )
    .await;
    let version = dev.message(&format!("{root}/update/accepted")).await["version"]
        .as_i64()
        .unwrap();
    s.wait_until(&s.things, "valve", "report in status", |t| {
        t.status
            .as_ref()
            .is_some_and(|st| st.version == Some(version) && st.reported.is_some())
    })
    .await;

    s.restart_operator().await;
    // The killed operator's last will says offline; the new one says online once it serves
    // shadow requests (after its first reconcile).
    let st = status_topic.clone();
    dev.next("operator offline then online", {
        let mut seen_offline = false;
        move |e| match e {
            DeviceEvent::Message(t, p) if *t == st && p.as_slice() == b"offline" => {
                seen_offline = true;
                None
            }
            DeviceEvent::Message(t, p) if *t == st && p.as_slice() == b"online" && seen_offline => {
                Some(())
            }
            _ => None,
        }
    })
    .await;
    // The device was never disconnected by the restart and needs no new credentials.
    assert_eq!(s.credentials("valve").await.password, c.password);
    dev.publish(&format!("{root}/get"), "").await;
    let doc = dev.message(&format!("{root}/get/accepted")).await;
    assert_eq!(doc["version"], version, "version restored: {doc}");
    assert_eq!(doc["state"]["reported"], json!({"open": true, "flow": 3}));
    dev.publish(
        &format!("{root}/update"),
        r#"{"state":{"reported":{"flow":4}}}"#,
    )
    .await;
    assert_eq!(
        dev.message(&format!("{root}/update/accepted")).await["version"],
        version + 1
    );
    s.wait_until(&s.things, "valve", "merged report after restart", |t| {
        t.status
            .as_ref()
            .and_then(|st| st.reported.as_ref())
            .is_some_and(|r| {
                r.0.get("flow") == Some(&json!(4)) && r.0.get("open") == Some(&json!(true))
            })
    })
    .await;
}
