//! The fleet-wide budget for status writes of reported state. A reconcile whose only change to
//! status is reported state (reported, delta, version, their summary and the `InSync`/`Ready`
//! conditions they drive) writes it only with a grant; without one it writes nothing and queues
//! the Thing here. Requests a backend makes because a device reported (already paced per Thing)
//! queue here too. Grants leave at most `qps` times a second, the Thing whose last grant is
//! oldest first (its status is the stalest), so API-server load stays flat however many devices
//! report, whatever triggered the reconcile. Requests for a Thing already waiting merge into
//! one: the granted reconcile reads the newest state when it runs. Observers never wait for this
//! (they read reported state from memory).
//!
//! [`Queue`] is the pure part (which Thing goes next); [`spawn`] grants from it at the rate.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Notify, mpsc};

use crate::{
    api::{Thing, ThingStatus, conditions::types},
    metrics::Metrics,
};

/// Which Thing goes next: waiting Things ordered by their last release (never released: first),
/// then by arrival.
#[derive(Default)]
pub struct Queue {
    /// (last release, arrival sequence, key) of every waiting Thing.
    order: BTreeSet<(Option<Instant>, u64, String)>,
    /// Per waiting Thing: its place in `order` and when it started waiting.
    waiting: HashMap<String, (Option<Instant>, u64, Instant)>,
    last_release: HashMap<String, Instant>,
    seq: u64,
}

impl Queue {
    /// A request for `key`; one already waiting keeps its place.
    pub fn push(&mut self, key: &str, now: Instant) {
        if self.waiting.contains_key(key) {
            return;
        }
        let last = self.last_release.get(key).copied();
        self.seq += 1;
        self.order.insert((last, self.seq, key.to_string()));
        self.waiting.insert(key.to_string(), (last, self.seq, now));
    }

    /// The stalest waiting Thing and how long it waited.
    pub fn pop(&mut self, now: Instant) -> Option<(String, Duration)> {
        let (_, _, key) = self.order.pop_first()?;
        let (_, _, since) = self.waiting.remove(&key)?;
        self.last_release.insert(key.clone(), now);
        Some((key, now.duration_since(since)))
    }

    /// The Thing is gone: no memory of it is kept.
    pub fn forget(&mut self, key: &str) {
        if let Some((last, seq, _)) = self.waiting.remove(key) {
            self.order.remove(&(last, seq, key.to_string()));
        }
        self.last_release.remove(key);
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// The sending side: never blocks.
#[derive(Clone)]
pub struct WriteBudget {
    queue: Arc<Mutex<Queue>>,
    /// Things granted a write of reported state that their reconcile has not used yet.
    granted: Arc<Mutex<HashSet<String>>>,
    wake: Arc<Notify>,
}

impl WriteBudget {
    pub fn request(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        self.lock().push(&key, Instant::now());
        self.wake.notify_one();
    }

    /// Uses the Thing's grant, if it has one.
    pub fn take_grant(&self, namespace: &str, name: &str) -> bool {
        self.grants().remove(&format!("{namespace}/{name}"))
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        self.lock().forget(&key);
        self.grants().remove(&key);
    }

    fn grants(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.granted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts the task that grants at `qps` (at least one a second whatever the setting), sends each
/// granted Thing to the controller through `out`, and records each one's wait in the lag metric.
pub fn spawn(
    qps: f64,
    out: mpsc::Sender<ObjectRef<Thing>>,
    metrics: Option<Arc<Metrics>>,
) -> WriteBudget {
    let budget = WriteBudget {
        queue: Arc::default(),
        granted: Arc::default(),
        wake: Arc::new(Notify::new()),
    };
    let every = Duration::from_secs_f64(1.0 / qps.max(1.0));
    let task = budget.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = task.lock().pop(Instant::now());
            let Some((key, waited)) = next else {
                task.wake.notified().await;
                continue;
            };
            if let Some(m) = &metrics {
                m.observe_status_write_lag(waited.as_secs_f64());
                m.set_status_writes_waiting(task.lock().len() as i64);
            }
            let Some((namespace, name)) = key.split_once('/') else {
                continue;
            };
            task.grants().insert(key.clone());
            // Full queue: dropped, the periodic resync reconciles every Thing anyway.
            if out.is_closed() {
                return;
            }
            let _ = out.try_send(ObjectRef::new(name).within(namespace));
            tick.tick().await;
        }
    });
    budget
}

/// `new` with its reported state (and the conditions it drives) as in `old`: equal to `old` when
/// reported state is all that changed.
pub fn hold_back_reported(old: &ThingStatus, new: &ThingStatus) -> ThingStatus {
    let mut held = new.clone();
    held.reported = old.reported.clone();
    held.delta = old.delta.clone();
    held.version = old.version;
    held.last_reported_time = old.last_reported_time;
    held.reported_summary = old.reported_summary.clone();
    held.conditions = new.conditions.clone();
    for type_ in [types::IN_SYNC, types::READY] {
        held.conditions.0.retain(|c| c.type_ != type_);
        if let Some(c) = old.conditions.get(type_) {
            held.conditions.0.push(c.clone());
        }
    }
    // Compared as a set: the order of conditions is not a change.
    held.conditions.0.sort_by(|a, b| a.type_.cmp(&b.type_));
    held
}

/// Whether `new` differs from `old` in reported state only.
pub fn only_reported_changed(old: &ThingStatus, new: &ThingStatus) -> bool {
    if old == new {
        return false;
    }
    let mut old_sorted = old.clone();
    old_sorted
        .conditions
        .0
        .sort_by(|a, b| a.type_.cmp(&b.type_));
    hold_back_reported(old, new) == old_sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stalest_thing_goes_first_and_requests_merge() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut q = Queue::default();
        q.push("a", at(0));
        q.push("b", at(1));
        q.push("a", at(2));
        assert_eq!(q.len(), 2, "a second request for a waiting Thing merges");
        // Never released: in arrival order.
        assert_eq!(q.pop(at(10)), Some(("a".into(), Duration::from_millis(10))));
        assert_eq!(q.pop(at(20)), Some(("b".into(), Duration::from_millis(19))));
        // a was released before b: a is staler and goes first, even though it asked later.
        q.push("b", at(30));
        q.push("a", at(31));
        q.push("c", at(32));
        assert_eq!(q.pop(at(40)).map(|p| p.0).as_deref(), Some("c"));
        assert_eq!(q.pop(at(41)).map(|p| p.0).as_deref(), Some("a"));
        assert_eq!(q.pop(at(42)).map(|p| p.0).as_deref(), Some("b"));
        assert!(q.is_empty());
        q.push("a", at(50));
        q.forget("a");
        assert_eq!(q.pop(at(60)), None);
    }

    #[test]
    fn reported_state_alone_is_told_apart_from_other_changes() {
        use crate::api::{Condition, ConditionStatus, JsonObject};
        let now = chrono::Utc::now();
        let mut old = ThingStatus::default();
        old.conditions.set(
            Condition::new(types::PROVISIONED, ConditionStatus::True, "Ok", "ok"),
            now,
        );
        old.conditions.set(
            Condition::new(types::IN_SYNC, ConditionStatus::True, "InSync", "in sync"),
            now,
        );
        assert!(!only_reported_changed(&old, &old));
        let mut reported = old.clone();
        reported.reported = Some(JsonObject(serde_json::Map::from_iter([(
            "t".to_string(),
            serde_json::json!(1),
        )])));
        reported.version = Some(2);
        reported.conditions.set(
            Condition::new(
                types::IN_SYNC,
                ConditionStatus::False,
                "Pending",
                "t pending",
            ),
            now,
        );
        assert!(only_reported_changed(&old, &reported));
        let mut other = reported.clone();
        other.conditions.set(
            Condition::new(types::PROVISIONED, ConditionStatus::False, "Gone", "gone"),
            now,
        );
        assert!(!only_reported_changed(&old, &other));
        let mut identity = old.clone();
        identity.observed_generation = Some(7);
        assert!(!only_reported_changed(&old, &identity));
    }
}
