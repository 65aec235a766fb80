//! What every reconcile shares. Built by `runner.rs` from its parts, so a test can build one
//! around a mocked API server and a fake backend (see `fixtures`) and run reconcilers without a
//! cluster.

use std::{sync::Arc, time::Duration};

use kube::{
    Client,
    runtime::{events::Recorder, reflector::ObjectRef},
};
use tokio::sync::mpsc;

use super::{
    backoff::RetryBackoff,
    status::StatusMemory,
    valid_specs::ValidSpecs,
    write_budget::{self, WriteBudget},
};
use crate::{
    api::{
        Thing,
        validation::{SpecLimits, TopicScope},
    },
    egress::EgressPolicy,
    feed::StateFeed,
    forwarding::{BrokerConnections, ObserverManager, SubscriberManager},
    metrics::Metrics,
    provider::ProviderRegistry,
};

/// Settings the reconcilers read.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub resync_interval: Duration,
    pub poll_interval: Duration,
    pub concurrency: u16,
    pub watch_namespace: Option<String>,
    /// What a spec may ask for beyond the schema (interval floors, policy scope).
    pub limits: SpecLimits,
    /// Where Observers and Subscribers may publish and subscribe.
    pub topics: TopicScope,
    /// Where HTTP sinks may connect.
    pub egress: Arc<EgressPolicy>,
    /// Goes into every derived device name (`--cluster-id`).
    pub cluster_id: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(300),
            poll_interval: Duration::from_secs(30),
            concurrency: 16,
            watch_namespace: None,
            limits: SpecLimits::default(),
            topics: TopicScope::default(),
            egress: Arc::default(),
            cluster_id: None,
        }
    }
}

/// The parts a [`Context`] is made of; the rest (backoff, status memory) it makes itself.
pub struct ContextParts {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub providers: ProviderRegistry,
    pub config: ControllerConfig,
    /// Where each written Thing state goes (Observers' bus, REST broker).
    pub feed: Arc<dyn StateFeed>,
    /// Reconcile requests for Things from outside the watch (backends with a push channel).
    pub thing_triggers: ThingTriggerReceiver,
    pub observers: ObserverManager,
    pub subscribers: Arc<SubscriberManager>,
    /// Sessions with the brokers tenants name (BrokerConnection).
    pub connections: BrokerConnections,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub providers: ProviderRegistry,
    pub config: ControllerConfig,
    pub backoff: RetryBackoff,
    /// Our own last status writes, to skip repeats read from a stale cache.
    pub status_memory: StatusMemory,
    /// Spec generations that passed validation, not validated again.
    pub valid_specs: ValidSpecs,
    pub feed: Arc<dyn StateFeed>,
    /// Observer tasks and the state bus they read.
    pub observers: ObserverManager,
    /// Subscriber tasks and their MQTT/HTTP routes.
    pub subscribers: Arc<SubscriberManager>,
    /// Sessions with the brokers BrokerConnections name.
    pub connections: BrokerConnections,
    thing_triggers: std::sync::Mutex<Option<mpsc::Receiver<ObjectRef<Thing>>>>,
    /// The fleet-wide budget for status writes of reported state, when there is one.
    pub write_budget: Option<WriteBudget>,
}

impl Context {
    pub fn new(parts: ContextParts) -> Self {
        Self {
            client: parts.client,
            recorder: parts.recorder,
            metrics: parts.metrics,
            providers: parts.providers,
            config: parts.config,
            backoff: RetryBackoff::new(Duration::from_secs(2), Duration::from_secs(300)),
            status_memory: StatusMemory::default(),
            valid_specs: ValidSpecs::default(),
            feed: parts.feed,
            observers: parts.observers,
            subscribers: parts.subscribers,
            connections: parts.connections,
            thing_triggers: std::sync::Mutex::new(Some(parts.thing_triggers.0)),
            write_budget: parts.thing_triggers.1,
        }
    }

    /// The trigger queue, once: the Thing controller consumes it.
    pub(super) fn take_thing_triggers(&self) -> Option<mpsc::Receiver<ObjectRef<Thing>>> {
        self.thing_triggers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Asks the Thing controller to reconcile one Thing now. Backends with a push channel use it
/// (through the runner's `StateFeed`) when new reported state arrives; the caller rate-limits
/// per Thing, the fleet-wide [`WriteBudget`] (when set) bounds the rate across all Things, and
/// the controller de-duplicates queued requests, so status writes stay bounded.
#[derive(Clone)]
pub struct ThingTrigger(Route);

#[derive(Clone)]
enum Route {
    Direct(mpsc::Sender<ObjectRef<Thing>>),
    Budgeted(WriteBudget),
}

/// The receiving end, handed to [`Context::new`].
pub struct ThingTriggerReceiver(mpsc::Receiver<ObjectRef<Thing>>, Option<WriteBudget>);

impl ThingTrigger {
    /// Requests go straight to the controller (tests, and processes without a budget).
    pub fn channel() -> (ThingTrigger, ThingTriggerReceiver) {
        let (tx, rx) = mpsc::channel(4096);
        (
            ThingTrigger(Route::Direct(tx)),
            ThingTriggerReceiver(rx, None),
        )
    }

    /// Requests reach the controller at most `qps` times a second, stalest Thing first.
    pub fn budgeted(
        qps: f64,
        metrics: Option<Arc<Metrics>>,
    ) -> (ThingTrigger, ThingTriggerReceiver) {
        let (tx, rx) = mpsc::channel(4096);
        let budget = write_budget::spawn(qps, tx, metrics);
        (
            ThingTrigger(Route::Budgeted(budget.clone())),
            ThingTriggerReceiver(rx, Some(budget)),
        )
    }

    /// Never blocks: when the queue is full the request is dropped, which is safe because the
    /// periodic resync reconciles every Thing anyway.
    pub fn request(&self, namespace: &str, name: &str) {
        match &self.0 {
            Route::Direct(tx) => {
                let _ = tx.try_send(ObjectRef::new(name).within(namespace));
            }
            Route::Budgeted(b) => b.request(namespace, name),
        }
    }

    /// The Thing is gone: its place in the budget is dropped.
    pub fn forget(&self, namespace: &str, name: &str) {
        if let Route::Budgeted(b) = &self.0 {
            b.forget(namespace, name);
        }
    }
}
