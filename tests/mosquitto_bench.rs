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
//! - Mosquitto's own loopback throughput (mosquitto_pub -> mosquitto_sub) as the ceiling;
//! - the status-write storm (`bench_status_write_storm`, issue 11): `BENCH_STORM_THINGS`
//!   Things (default 10,000) each reporting once a second for `BENCH_STORM_SECONDS` (60),
//!   published by `BENCH_STORM_CONNECTIONS` (4) clients of the broker's admin account, each
//!   publishing for its share of the devices on their own `$aws/things/<name>/shadow/update`
//!   topics (one device connection each would measure the test, not the operator; QoS 1, or
//!   `BENCH_STORM_QOS=0`): status
//!   writes per second against `--status-write-qps` (`BENCH_STORM_QPS`, default 50), the
//!   operator's peak RSS, and how long after the last report the latest state of every Thing
//!   is in status. `BENCH_STORM_LOCK=/work/quiet.lock` holds that lock shared while the fleet
//!   is created and deleted and exclusive for the storm and its lag; `BENCH_STORM_DELETE=0`
//!   skips the deletion (restart the test environment after). Run it on a release build of
//!   the operator:
//!
//!   ```text
//!   cargo build --release --bin thing-operator
//!   THING_OPERATOR_BENCH_BIN=$CARGO_TARGET_DIR/release/thing-operator \
//!     cargo test --test mosquitto_bench storm -- --ignored --nocapture
//!   ```

mod common;
mod mosquitto_support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use kube::api::{DeleteParams, ListParams};
use serde_json::json;

use common::{
    bench::{FleetWatch, load_average, proc_usage},
    thing,
};
use mosquitto_support::{Credentials, Device, setup};

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

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How often the test broker logged that it dropped messages for a subscriber whose queue
/// (`max_queued_messages`) was full: a Thing whose last report was dropped cannot show it.
fn broker_drops(env: &common::TestEnv) -> usize {
    std::fs::read_to_string(env.dir.join("logs/mosquitto.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Outgoing messages are being dropped"))
        .count()
}

/// How many Things are Ready, and how many hold `seq` as the reported `seq` (0, 0 before the
/// first listing is complete).
fn fleet_counts(fleet: &FleetWatch, seq: i64) -> (usize, usize) {
    let things = fleet.things().unwrap_or_default();
    let ready = |t: &thing_operator::api::Thing| {
        t.status
            .as_ref()
            .is_some_and(|st| st.conditions.is_true("Ready"))
    };
    let reported_seq = |t: &thing_operator::api::Thing| {
        t.status.as_ref()?.reported.as_ref()?.0.get("seq")?.as_i64()
    };
    (
        things.iter().filter(|t| ready(t)).count(),
        things
            .iter()
            .filter(|t| reported_seq(t) == Some(seq))
            .count(),
    )
}

/// `BENCH_STORM_LOCK`: a lock file (on the shared test machine, its quiet lock) held shared
/// while the fleet is created and deleted, and exclusive while the storm and its lag are
/// measured: the measurement has the machine to itself, without holding everyone else's
/// benchmarks off for the whole (long) creation of the fleet.
struct QuietLock(Option<std::fs::File>);

impl QuietLock {
    fn shared_from_env() -> Self {
        let file = std::env::var_os("BENCH_STORM_LOCK").map(|path| {
            let f = std::fs::File::open(path).expect("lock file opens");
            f.lock_shared().expect("shared lock");
            f
        });
        QuietLock(file)
    }

    fn exclusive(&self) {
        if let Some(f) = &self.0 {
            f.lock().expect("exclusive lock");
        }
    }

    fn shared(&self) {
        if let Some(f) = &self.0 {
            f.lock_shared().expect("shared lock");
        }
    }
}

#[tokio::test]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_status_write_storm() {
    let n: usize = env_or("BENCH_STORM_THINGS", 10_000);
    let seconds: i64 = env_or("BENCH_STORM_SECONDS", 60);
    let connections: usize = env_or("BENCH_STORM_CONNECTIONS", 4).max(1);
    let qps: f64 = env_or("BENCH_STORM_QPS", 50.0);
    let qos = match env_or("BENCH_STORM_QOS", 1) {
        0 => rumqttc::QoS::AtMostOnce,
        _ => rumqttc::QoS::AtLeastOnce,
    };
    let interval = Duration::from_secs(2);
    let s = setup(
        "mq-storm",
        &[
            "--status-write-qps",
            &qps.to_string(),
            "--status-write-interval",
            "2s",
        ],
    )
    .await;
    let pid = s.operator.pid().expect("operator runs");
    println!(
        "storm: {n} Things x 1 report/s for {seconds} s over {connections} connections ({qos:?}), \
         budget {qps}/s, interval {interval:?}; load {}",
        load_average()
    );

    // 1. The fleet.
    let quiet = QuietLock::shared_from_env();
    let fleet = FleetWatch::start(&s.things);
    let started = Instant::now();
    stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let things = s.things.clone();
            async move {
                thing(&format!("s{i}")).create(&things).await;
            }
        })
        .await;
    let created = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(3 * 3600);
    loop {
        let (ready, _) = fleet_counts(&fleet, 0);
        if ready == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {ready}/{n} Ready after three hours"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "storm: {n} Things created in {created:.1?}, all Ready after {:.1?} ({:.0} Things/s); load {}",
        started.elapsed(),
        n as f64 / started.elapsed().as_secs_f64(),
        load_average()
    );

    // 2. The storm: every device reports `seq` = 1..=seconds, once a second.
    quiet.exclusive();
    println!("storm: quiet lock held; load {}", load_average());
    let names: Vec<String> = (0..n)
        .map(|i| {
            thing_operator::api::thing::ThingSpec::default().backend_name(&s.ns, &format!("s{i}"))
        })
        .collect();
    let admin = s.admin_credentials();
    let mut publishers = Vec::new();
    for c in 0..connections {
        let creds = Credentials {
            client_id: format!("{}-storm-{c}", admin.client_id),
            ..admin.clone()
        };
        let mut d = Device::start(&creds, Vec::new());
        d.connected().await;
        let topics: Vec<String> = names
            .iter()
            .skip(c)
            .step_by(connections)
            .map(|name| format!("$aws/things/{name}/shadow/update"))
            .collect();
        publishers.push((d, topics));
    }
    let writes = |body: &str| -> f64 {
        body.lines()
            .filter(|l| {
                l.starts_with("thing_operator_status_writes_total{") && l.contains("kind=\"Thing\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let metrics = || async {
        s.operator
            .get("/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    };
    let writes_before = writes(&metrics().await);
    let drops_before = broker_drops(&s.env);
    let storm_started = Instant::now();
    let mut tasks = Vec::new();
    for (d, topics) in &publishers {
        let client = d.client.clone();
        let topics = topics.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut late_rounds = 0;
            for seq in 1..=seconds {
                tick.tick().await;
                let round = Instant::now();
                let body = format!(r#"{{"state":{{"reported":{{"seq":{seq}}}}}}}"#);
                for topic in &topics {
                    let _ = client
                        .publish(topic.clone(), qos, false, body.clone())
                        .await;
                }
                if round.elapsed() > Duration::from_secs(1) {
                    late_rounds += 1;
                }
            }
            late_rounds
        }));
    }
    // Sample status writes per second while it runs.
    let mut samples = Vec::new();
    let mut last = (Instant::now(), writes_before);
    let mut peak_rss = 0.0f64;
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = (Instant::now(), writes(&metrics().await));
        samples.push((now.1 - last.1) / now.0.duration_since(last.0).as_secs_f64());
        last = now;
        peak_rss = peak_rss.max(proc_usage(pid).0);
    }
    let mut late_rounds = 0;
    for t in tasks {
        late_rounds += t.await.unwrap_or(0);
    }
    let published = storm_started.elapsed();
    let window_writes = writes(&metrics().await) - writes_before;
    println!(
        "storm: {} reports sent in {published:.1?} ({:.0}/s offered; {late_rounds} of {} rounds took over 1 s); load {}",
        n as i64 * seconds,
        (n as i64 * seconds) as f64 / published.as_secs_f64(),
        seconds as usize * connections,
        load_average()
    );
    let max = samples.iter().cloned().fold(0.0, f64::max);
    println!(
        "storm: status writes during the storm {window_writes:.0} = {:.1}/s (5 s samples: max {max:.1}/s), budget {qps}/s",
        window_writes / published.as_secs_f64()
    );

    // 3. The lag: until every Thing's status holds the last report. A full pass over the fleet
    //    at the budget takes n/qps seconds.
    let expected = Duration::from_secs_f64((n as f64 / qps).max(interval.as_secs_f64()));
    let deadline = Instant::now() + expected * 3 + Duration::from_secs(120);
    let (mut landed, mut after_last) = (0, Duration::ZERO);
    while Instant::now() < deadline {
        let (_, now) = fleet_counts(&fleet, seconds);
        if now > landed {
            // When the latest count was first seen (looked at every second, so up to 1 s late).
            (landed, after_last) = (now, storm_started.elapsed().saturating_sub(published));
        }
        peak_rss = peak_rss.max(proc_usage(pid).0);
        if landed == n {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "storm: the broker logged 'Outgoing messages are being dropped' {} times during the storm",
        broker_drops(&s.env) - drops_before
    );
    let (rss, cpu) = proc_usage(pid);
    let total_writes = writes(&metrics().await) - writes_before;
    println!(
        "storm: latest state of {landed}/{n} Things in status {after_last:.1?} after the last report \
         (one pass at the budget: {expected:.0?}); status writes after the storm {:.0}",
        total_writes - window_writes
    );
    println!(
        "storm: operator peak RSS {:.0} MiB, CPU {cpu:.1} s; load {}",
        peak_rss.max(rss),
        load_average()
    );

    // 4. Clean up while the operator runs: every broker client and role goes with its Thing.
    //    `BENCH_STORM_DELETE=0` skips it (deleting is as slow as creating on Mosquitto 2.0.11):
    //    the broker then keeps the fleet's clients, so restart the test environment after.
    quiet.shared();
    drop(publishers);
    if env_or("BENCH_STORM_DELETE", 1) == 1 {
        let started = Instant::now();
        s.things
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .expect("Things deleted");
        let deadline = Instant::now() + Duration::from_secs(3 * 3600);
        while fleet.things().is_none_or(|things| !things.is_empty()) {
            assert!(
                Instant::now() < deadline,
                "deletion did not finish in three hours"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        println!("storm: all {n} Things deleted in {:.1?}", started.elapsed());
    }
    assert_eq!(
        landed, n,
        "the latest report of some Things never reached status"
    );
}
