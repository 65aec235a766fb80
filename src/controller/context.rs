//! What every reconcile shares. Built by `runner.rs` from its parts, so a test can build one
//! around a mocked API server and a fake backend (see `fixtures`) and run reconcilers without a
//! cluster.

use std::{sync::Arc, time::Duration};

use kube::{
    Client,
    runtime::{events::Recorder, reflector::ObjectRef},
};
use tokio::sync::mpsc;

use super::{backoff::RetryBackoff, status::StatusMemory};
use crate::{
    api::{
        Thing,
        validation::{SpecLimits, TopicScope},
    },
    egress::EgressPolicy,
    feed::StateFeed,
    forwarding::{ObserverManager, SubscriberManager},
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
    pub feed: Arc<dyn StateFeed>,
    /// Observer tasks and the state bus they read.
    pub observers: ObserverManager,
    /// Subscriber tasks and their MQTT/HTTP routes.
    pub subscribers: Arc<SubscriberManager>,
    thing_triggers: std::sync::Mutex<Option<mpsc::Receiver<ObjectRef<Thing>>>>,
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
            feed: parts.feed,
            observers: parts.observers,
            subscribers: parts.subscribers,
            thing_triggers: std::sync::Mutex::new(Some(parts.thing_triggers.0)),
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
/// (through the runner's `StateFeed`) when new reported state arrives; the controller
/// de-duplicates queued requests, and the caller rate-limits per Thing, so status writes stay
/// bounded.
#[derive(Clone)]
pub struct ThingTrigger(mpsc::Sender<ObjectRef<Thing>>);

/// The receiving end, handed to [`Context::new`].
pub struct ThingTriggerReceiver(mpsc::Receiver<ObjectRef<Thing>>);

impl ThingTrigger {
    pub fn channel() -> (ThingTrigger, ThingTriggerReceiver) {
        let (tx, rx) = mpsc::channel(4096);
        (ThingTrigger(tx), ThingTriggerReceiver(rx))
    }

    /// Never blocks: when the queue is full the request is dropped, which is safe because the
    /// periodic resync reconciles every Thing anyway.
    pub fn request(&self, namespace: &str, name: &str) {
        let _ = self.0.try_send(ObjectRef::new(name).within(namespace));
    }
}
