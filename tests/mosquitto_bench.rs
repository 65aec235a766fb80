//! Benchmark of the Mosquitto shadow service (prints numbers; run explicitly):
//!
//! ```text
//! cargo test --test mosquitto_bench -- --ignored --nocapture
//! ```
//!
//! - request -> accepted reply round trip (device -> broker -> operator's in-memory shadow ->
//!   broker -> device), p50/p99: the upper bound of publish -> state visible in memory;
//! - devices x reports per second the operator keeps up with, the latest state landing in
//!   status within the coalescing interval;
//! - Mosquitto's own loopback throughput (mosquitto_pub -> mosquitto_sub) as the ceiling.

mod common;
mod mosquitto_support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;

use common::thing;
use mosquitto_support::{Device, setup};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_mosquitto_shadow_service() {
    const DEVICES: usize = 20;
    let interval = Duration::from_secs(1);
    let s = setup("mq-bench", &["--status-write-interval", "1s"]).await;
    for i in 0..DEVICES {
        thing(&format!("d{i}"))
            .desired(json!({}))
            .create(&s.things)
            .await;
    }
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let name = format!("d{i}");
        s.wait_ready(&s.things, &name).await;
        let c = s.credentials(&name).await;
        let mut d = Device::start(&c, vec![format!("{}/update/accepted", c.aws_root())]);
        d.connected().await;
        devices.push((c, d));
    }

    // 1. Round trip, one request at a time.
    {
        let (c, d) = &mut devices[0];
        let (update, accepted) = (
            format!("{}/update", c.aws_root()),
            format!("{}/update/accepted", c.aws_root()),
        );
        let mut rtts = Vec::new();
        for seq in 0..300 {
            let t = Instant::now();
            d.publish(
                &update,
                format!(r#"{{"state":{{"reported":{{"seq":{seq}}}}}}}"#),
            )
            .await;
            d.message(&accepted).await;
            rtts.push(t.elapsed());
        }
        rtts.sort();
        println!(
            "bench: report -> accepted round trip over {} requests: p50 {:?}, p99 {:?}, max {:?}",
            rtts.len(),
            percentile(&rtts, 0.5),
            percentile(&rtts, 0.99),
            rtts[rtts.len() - 1]
        );
    }

    // 2. Sustained load: every device reports at `rate`/s for 3 s.
    let rates: Vec<u64> = std::env::var("BENCH_RATES")
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 50, 100, 200]);
    for rate in rates {
        let duration = Duration::from_secs(3);
        let per_device = rate * duration.as_secs();
        let base = rate as i64 * 1_000_000;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (c, d) in &devices {
            let client = d.client.clone();
            let topic = format!("{}/update", c.aws_root());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
                for i in 1..=per_device as i64 {
                    tick.tick().await;
                    let body = format!(r#"{{"state":{{"reported":{{"seq":{}}}}}}}"#, base + i);
                    let _ = client
                        .publish(
                            topic.clone(),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            body.into_bytes(),
                        )
                        .await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let published = started.elapsed();
        let last = base + per_device as i64;
        // Bounded: a device whose latest report has not landed after 10 s counts as lost.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut landed_after = Duration::ZERO;
        let mut lost = 0;
        for i in 0..DEVICES {
            loop {
                let t = s.things.get(&format!("d{i}")).await.unwrap();
                let seq = t
                    .status
                    .as_ref()
                    .and_then(|st| st.reported.as_ref())
                    .and_then(|r| r.0.get("seq")?.as_i64());
                if seq == Some(last) {
                    landed_after = landed_after.max(started.elapsed().saturating_sub(published));
                    break;
                }
                if Instant::now() > deadline {
                    lost += 1;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Drain the accepted replies so the next round starts clean.
        for (_, d) in devices.iter_mut() {
            while d.events.try_recv().is_ok() {}
        }
        let offered = DEVICES as f64 * rate as f64;
        let verdict = match (lost, landed_after <= interval + Duration::from_millis(1500)) {
            (0, true) => "kept up".to_string(),
            (0, false) => "behind".to_string(),
            (n, _) => format!("LOST the latest report of {n} devices"),
        };
        println!(
            "bench: {DEVICES} devices x {rate}/s = {offered:.0} reports/s offered, sent in {published:?}; \
             latest state of all devices in status {landed_after:?} after the last report (interval {interval:?}, \
             observed by polling): {verdict}"
        );
    }

    // 3. The broker's own ceiling on this machine.
    let admin = s.admin_credentials();
    let port = s.env.var("MQTT_PORT");
    let n = 20_000;
    let topic = format!("{}/bench/ceiling", s.prefix);
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            &admin.username,
            "-P",
            &admin.password,
            "-t",
            &topic,
        ])
        .args(["-C", &n.to_string(), "-q", "1"])
        .stdout(Stdio::null())
        .spawn()
        .expect("mosquitto_sub runs");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            &admin.username,
            "-P",
            &admin.password,
            "-t",
            &topic,
        ])
        .args([
            "-m",
            r#"{"state":{"reported":{"seq":1}}}"#,
            "-q",
            "1",
            "--repeat",
            &n.to_string(),
            "--repeat-delay",
            "0",
        ])
        .status()
        .expect("mosquitto_pub runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while sub.try_wait().ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "mosquitto_sub did not get all messages"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = t.elapsed();
    println!(
        "bench: mosquitto loopback ceiling, QoS 1, one publisher -> one subscriber: {n} messages in {elapsed:?} = {:.0}/s",
        n as f64 / elapsed.as_secs_f64()
    );
}
