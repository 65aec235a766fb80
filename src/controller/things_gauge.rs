//! The `thing_operator_things{backend, reason}` gauge: how many Things each backend has, by the
//! reason of their Ready condition.
//!
//! Recomputed from the Thing controller's cache every [`INTERVAL`] rather than kept up to date
//! by increments in the reconciler: a count derived from the cache cannot drift (a missed
//! decrement, a Thing deleted while the operator was down, a reconcile that failed before
//! it counted), and a deleted Thing leaves the cache and so the gauge. Counting a cache of
//! even 100 000 Things takes milliseconds.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use kube::runtime::reflector::Store;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{Thing, conditions::types},
    metrics::{Metrics, ThingLabels},
};

/// How often the gauge is recomputed; well under a scrape interval's usual 30 s.
const INTERVAL: Duration = Duration::from_secs(10);

/// The reason of a Thing the operator has not written a Ready condition for yet.
pub const PENDING: &str = "Pending";

/// Things by backend and Ready reason.
pub fn count(things: &[Arc<Thing>]) -> BTreeMap<ThingLabels, i64> {
    let mut counts = BTreeMap::new();
    for thing in things {
        let reason = thing
            .status
            .as_ref()
            .and_then(|s| s.conditions.get(types::READY))
            .map_or(PENDING, |c| c.reason.as_str());
        let labels = ThingLabels {
            backend: thing.spec.broker.as_str().to_string(),
            reason: reason.to_string(),
        };
        *counts.entry(labels).or_insert(0) += 1;
    }
    counts
}

/// Recomputes the gauge from `store` once it has synced, then every [`INTERVAL`], until
/// `shutdown`.
pub async fn run(store: Store<Thing>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    // Before the first sync the cache is empty, which is not "no Things".
    tokio::select! {
        synced = store.wait_until_ready() => if synced.is_err() { return },
        _ = shutdown.cancelled() => return,
    }
    let mut previous = Default::default();
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        previous = metrics.set_things(count(&store.state()), previous);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        api::conditions::{Condition, ConditionStatus},
        controller::fixtures::thing,
    };

    fn with_ready(name: &str, broker: &str, ready: Option<(bool, &str)>) -> Arc<Thing> {
        let mut t = thing(name, json!({"broker": broker}));
        if let Some((ok, reason)) = ready {
            let status = if ok {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            };
            let mut st = crate::api::ThingStatus::default();
            st.conditions.set(
                Condition::new(types::READY, status, reason, "m"),
                chrono::Utc::now(),
            );
            t.status = Some(st);
        }
        Arc::new(t)
    }

    fn labels(backend: &str, reason: &str) -> ThingLabels {
        ThingLabels {
            backend: backend.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn things_are_counted_by_backend_and_ready_reason() {
        let things = [
            with_ready("a", "Mosquitto", Some((true, "Reconciled"))),
            with_ready("b", "Mosquitto", Some((true, "Reconciled"))),
            with_ready("c", "Mosquitto", Some((false, "SecretConflict"))),
            with_ready("d", "AWS", Some((true, "Reconciled"))),
            with_ready("e", "AWS", Some((false, "Throttled"))),
            with_ready("f", "Azure", None),
        ];
        let counts = count(&things);
        assert_eq!(
            counts,
            BTreeMap::from([
                (labels("AWS", "Reconciled"), 1),
                (labels("AWS", "Throttled"), 1),
                (labels("Azure", PENDING), 1),
                (labels("Mosquitto", "Reconciled"), 2),
                (labels("Mosquitto", "SecretConflict"), 1),
            ])
        );
        assert_eq!(counts.values().sum::<i64>(), things.len() as i64);
        assert!(count(&[]).is_empty());
    }

    #[test]
    fn a_reason_no_thing_has_any_more_leaves_the_gauge() {
        let metrics = Metrics::default();
        let before = [
            with_ready("a", "Mosquitto", Some((true, "Reconciled"))),
            with_ready("b", "Mosquitto", Some((false, "SecretConflict"))),
        ];
        let previous = metrics.set_things(count(&before), Default::default());
        let text = metrics.render();
        assert!(
            text.contains(
                r#"thing_operator_things{backend="Mosquitto",reason="SecretConflict"} 1"#
            ),
            "{text}"
        );
        // "b" was deleted.
        metrics.set_things(count(&before[..1]), previous);
        let text = metrics.render();
        assert!(!text.contains("SecretConflict"), "{text}");
        assert!(
            text.contains(r#"thing_operator_things{backend="Mosquitto",reason="Reconciled"} 1"#),
            "{text}"
        );
    }
}
