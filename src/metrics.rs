//! Prometheus metrics, served as text on /metrics.

use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

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

pub struct Metrics {
    registry: Mutex<Registry>,
    pub reconciles: Family<OutcomeLabels, Counter>,
    pub reconcile_seconds: Family<KindLabels, Histogram>,
    pub reconcile_failures: Family<FailureLabels, Counter>,
    pub status_writes: Family<KindLabels, Counter>,
    pub events: Family<OutcomeLabels, Counter>,
    pub backend_calls: Family<BackendCallLabels, Counter>,
    pub leader: Gauge,
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
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
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
            leader,
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
}
