//! What the benchmarks share (`tests/mosquitto_bench.rs`, `examples/aws_bench.rs`, which
//! includes this file by path): the fleet of Things as a watch sees it, a process's peak memory
//! and CPU time, the load average.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt};
use kube::{
    Api,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use thing_operator::api::Thing;

/// The Things of an `Api`, kept by kube's reflector from a watch (one LIST, then changes).
/// Polling with LISTs of the whole fleet instead (30 MB at 10,000 Things) loads the API server
/// and etcd on the cores the operator is measured on. The watch stops when this is dropped.
pub struct FleetWatch {
    store: Store<Thing>,
    task: tokio::task::JoinHandle<()>,
}

/// How often [`FleetWatch::until`] looks at the cache (memory only): the timing error it adds
/// to a benchmark's wait.
const LOOK_EVERY: Duration = Duration::from_millis(100);

impl FleetWatch {
    pub fn start(things: &Api<Thing>) -> Self {
        let (store, writer) = reflector::store();
        let events = reflector::reflector(
            writer,
            watcher::watcher(things.clone(), watcher::Config::default()),
        )
        .default_backoff();
        let task = tokio::spawn(events.for_each(|_| futures::future::ready(())));
        Self { store, task }
    }

    /// Every Thing, once the first listing is complete (`None` before).
    pub fn things(&self) -> Option<Vec<Arc<Thing>>> {
        self.store
            .wait_until_ready()
            .now_or_never()
            .map(|_| self.store.state())
    }

    /// Waits until `done` holds for the complete set of Things, for at most `limit`.
    pub async fn until(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&[Arc<Thing>]) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if self.things().is_some_and(|things| done(&things)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("not {what} within {limit:?}"));
            }
            tokio::time::sleep(LOOK_EVERY).await;
        }
    }
}

impl Drop for FleetWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Peak RSS (MiB) and CPU seconds (user + system) of a process, from /proc.
pub fn proc_usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    (hwm_kb / 1024.0, ticks / 100.0)
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
