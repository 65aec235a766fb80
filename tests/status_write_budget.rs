//! The fleet-wide status write budget against the real API server and Mosquitto: many devices
//! report far faster than the budget allows; the reported-state status writes the API server sees
//! stay within the budget, and every Thing's latest report still reaches its status.

mod common;
mod mosquitto_support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use common::thing;
use mosquitto_support::{Device, setup};
use thing_operator::api::Thing;

const THINGS: usize = 8;
const ROUNDS: i64 = 20;
const QPS: f64 = 2.0;

#[tokio::test]
async fn reported_state_writes_stay_within_the_fleet_budget() {
    let s = setup(
        "status-budget",
        &[
            "--status-write-interval",
            "250ms",
            "--status-write-qps",
            "2",
        ],
    )
    .await;
    let names: Vec<String> = (0..THINGS).map(|i| format!("d{i}")).collect();
    for n in &names {
        thing(n).create(&s.things).await;
    }
    let mut devices = Vec::new();
    for n in &names {
        s.wait_ready(&s.things, n).await;
        let creds = s.credentials(n).await;
        let mut dev = Device::start(&creds, vec![]);
        dev.connected().await;
        devices.push((creds.aws_root(), dev));
    }

    // Every change of a Thing's shadow version in status, as the API server publishes it.
    let writes: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let listed: Arc<Mutex<usize>> = Arc::default();
    let (seen, listing) = (writes.clone(), listed.clone());
    let watch = tokio::spawn({
        let api = s.things.clone();
        async move {
            let mut last: HashMap<String, Option<i64>> = HashMap::new();
            let mut stream = watcher(api, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(t)) = stream.next().await {
                let t: Thing = t;
                let version = t.status.as_ref().and_then(|s| s.version);
                let name = t.metadata.name.clone().unwrap_or_default();
                let before = last.insert(name, version);
                *listing.lock().unwrap() = last.len();
                if before.is_some_and(|b| b != version) {
                    seen.lock().unwrap().push(Instant::now());
                }
            }
        }
    });
    s.wait_for("the watch to list every Thing", || async {
        (*listed.lock().unwrap() >= THINGS).then_some(())
    })
    .await;

    // The storm: every device reports every 100 ms (eight Things at a 250 ms interval could ask
    // for 32 writes a second; the budget is 2).
    let start = Instant::now();
    for round in 1..=ROUNDS {
        for (root, dev) in &devices {
            dev.publish(
                &format!("{root}/update"),
                json!({"state": {"reported": {"n": round}}}).to_string(),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every Thing's latest report arrives (bounded wait).
    for n in &names {
        s.wait_until(&s.things, n, "the last report in status", |t: &Thing| {
            t.status
                .as_ref()
                .and_then(|st| st.reported.as_ref())
                .and_then(|r| r.0.get("n"))
                == Some(&json!(ROUNDS))
        })
        .await;
    }
    let elapsed = start.elapsed();
    watch.abort();
    let count = writes
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t >= start)
        .count();
    // One grant at once, then QPS a second; the watch may see a write made just before `start`
    // (hence the slack of one more).
    let allowed = (QPS * elapsed.as_secs_f64()).ceil() as usize + 2;
    assert!(
        count <= allowed,
        "{count} reported-state writes in {elapsed:?}: more than the budget allows ({allowed})"
    );
    // Sanity: the storm did produce writes (every Thing at least its last report).
    assert!(count >= THINGS, "only {count} writes seen");
}
