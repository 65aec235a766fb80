//! Prometheus metrics, served as text on /metrics.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub commit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendCallLabels {
    pub backend: String,
    pub operation: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
}

/// Things by backend and the reason of their Ready condition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ThingLabels {
    pub backend: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub connection: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub reconciles: Family<OutcomeLabels, Counter>,
    pub reconcile_seconds: Family<KindLabels, Histogram>,
    pub reconcile_failures: Family<FailureLabels, Counter>,
    pub status_writes: Family<KindLabels, Counter>,
    pub events: Family<OutcomeLabels, Counter>,
    pub backend_calls: Family<BackendCallLabels, Counter>,
    pub mqtt_subscriptions_refused: Family<NamespaceLabels, Counter>,
    pub observer_overflow: Family<NamespaceLabels, Counter>,
    pub leader: Gauge,
    pub things: Family<ThingLabels, Gauge>,
    pub observer_dead_letters: Family<NamespaceLabels, Counter>,
    pub mqtt_connected: Family<ConnectionLabels, Gauge>,
    pub status_write_lag: Histogram,
    pub status_writes_waiting: Gauge,
}

fn reconcile_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("thing_operator");
        let reconciles = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by kind and outcome",
            reconciles.clone(),
        );
        let reconcile_seconds = Family::<KindLabels, Histogram>::new_with_constructor(
            reconcile_histogram as fn() -> Histogram,
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            reconcile_seconds.clone(),
        );
        let reconcile_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Failed reconciles by kind and reason (a condition reason or the failing step)",
            reconcile_failures.clone(),
        );
        let status_writes = Family::<KindLabels, Counter>::default();
        registry.register(
            "status_writes",
            "Status subresource writes",
            status_writes.clone(),
        );
        let events = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "events",
            "Kubernetes Events published, by reason",
            events.clone(),
        );
        let backend_calls = Family::<BackendCallLabels, Counter>::default();
        registry.register(
            "backend_calls",
            "Calls to IoT backends",
            backend_calls.clone(),
        );
        let mqtt_subscriptions_refused = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "mqtt_subscriptions_refused",
            "Subscriptions the broker refused to a namespace's account (its ACL), by namespace",
            mqtt_subscriptions_refused.clone(),
        );
        let observer_overflow = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "observer_overflow",
            "Updates an Observer with delivery Every missed because its sink fell more than the state bus's capacity behind, by namespace",
            observer_overflow.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        // Constant 1, labelled with what runs: dashboards tell versions apart during an upgrade.
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: crate::build_info::VERSION.into(),
                commit: crate::build_info::COMMIT.into(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The operator's version and commit (always 1)",
            build_info,
        );
        let things = Family::<ThingLabels, Gauge>::default();
        registry.register(
            "things",
            "Things by backend and Ready reason, recomputed from the controller's cache",
            things.clone(),
        );
        let observer_dead_letters = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "observer_dead_letters",
            "Updates an Observer gave up delivering (dropped after its retries), by namespace",
            observer_dead_letters.clone(),
        );
        let mqtt_connected = Family::<ConnectionLabels, Gauge>::default();
        registry.register(
            "mqtt_connected",
            "1 while an MQTT connection of the operator is up, by connection",
            mqtt_connected.clone(),
        );
        let status_write_lag = Histogram::new([0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]);
        registry.register(
            "status_write_lag_seconds",
            "How long a Thing's reported state waited for the fleet-wide status write budget",
            status_write_lag.clone(),
        );
        let status_writes_waiting = Gauge::default();
        registry.register(
            "status_writes_waiting",
            "Things whose reported state waits for the fleet-wide status write budget",
            status_writes_waiting.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            reconciles,
            reconcile_seconds,
            reconcile_failures,
            status_writes,
            events,
            backend_calls,
            mqtt_subscriptions_refused,
            observer_overflow,
            leader,
            things,
            observer_dead_letters,
            mqtt_connected,
            status_write_lag,
            status_writes_waiting,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }

    pub fn count_reconcile(&self, kind: &str, outcome: &str) {
        self.reconciles
            .get_or_create(&OutcomeLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn observe_reconcile(&self, kind: &str, seconds: f64) {
        self.reconcile_seconds
            .get_or_create(&KindLabels { kind: kind.into() })
            .observe(seconds);
    }

    pub fn count_failure(&self, kind: &str, reason: &str) {
        self.reconcile_failures
            .get_or_create(&FailureLabels {
                kind: kind.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn count_status_write(&self, kind: &str) {
        self.status_writes
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn count_event(&self, kind: &str, reason: &str) {
        self.events
            .get_or_create(&OutcomeLabels {
                kind: kind.into(),
                outcome: reason.into(),
            })
            .inc();
    }

    pub fn observe_status_write_lag(&self, seconds: f64) {
        self.status_write_lag.observe(seconds);
    }

    pub fn set_status_writes_waiting(&self, n: i64) {
        self.status_writes_waiting.set(n);
    }

    pub fn count_backend_call(&self, backend: &str, operation: &str, outcome: &str) {
        self.backend_calls
            .get_or_create(&BackendCallLabels {
                backend: backend.into(),
                operation: operation.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Replaces the Things gauge with `counts`: label sets missing from `counts` but in
    /// `previous` (what the last call set) are removed, so a reason no Thing has any more
    /// leaves the gauge instead of staying at a stale count. Returns what to pass next time.
    pub fn set_things(
        &self,
        counts: BTreeMap<ThingLabels, i64>,
        previous: BTreeSet<ThingLabels>,
    ) -> BTreeSet<ThingLabels> {
        for gone in previous.iter().filter(|l| !counts.contains_key(l)) {
            self.things.remove(gone);
        }
        for (labels, n) in &counts {
            self.things.get_or_create(labels).set(*n);
        }
        counts.into_keys().collect()
    }

    pub fn count_observer_overflow(&self, namespace: &str, missed: u64) {
        self.observer_overflow
            .get_or_create(&NamespaceLabels {
                namespace: namespace.into(),
            })
            .inc_by(missed);
    }

    pub fn count_dead_letter(&self, namespace: &str) {
        self.observer_dead_letters
            .get_or_create(&NamespaceLabels {
                namespace: namespace.into(),
            })
            .inc();
    }

    /// The state gauge of the MQTT connection `name` (starts at 0: not connected yet).
    pub fn mqtt_connection(&self, name: &str) -> Gauge {
        self.mqtt_connected
            .get_or_create(&ConnectionLabels {
                connection: name.into(),
            })
            .clone()
    }

    /// Drops the series of a connection that is gone for good (a deleted BrokerConnection), so
    /// it does not stay at 0 forever.
    pub fn forget_mqtt_connection(&self, name: &str) {
        self.mqtt_connected.remove(&ConnectionLabels {
            connection: name.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_is_exposed_with_version_and_commit() {
        let text = Metrics::default().render();
        let line = format!(
            "thing_operator_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            crate::build_info::VERSION,
            crate::build_info::COMMIT
        );
        assert!(text.contains(&line), "{text}");
    }
}
