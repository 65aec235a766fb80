//! One reconciler per kind, sharing a [`Context`].

mod backoff;
pub mod kube_events;
mod observer;
pub mod status;
mod subscriber;
mod task_kind;
mod thing;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, Client, Resource,
    runtime::{
        Controller,
        controller::Action,
        events::{Recorder, Reporter},
        reflector::ObjectRef,
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

pub use backoff::{RetryBackoff, jittered};

use crate::{
    api::{Observer, Subscriber, Thing},
    error::Error,
    feed::StateFeed,
    forwarding::{ObserverManager, SubscriberManager},
    http::Readiness,
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
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(300),
            poll_interval: Duration::from_secs(30),
            concurrency: 16,
            watch_namespace: None,
        }
    }
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
    pub status_memory: status::StatusMemory,
    /// Where each written Thing state goes (Observers' bus, REST broker), wired by the runner.
    pub feed: Arc<dyn StateFeed>,
    /// Observer tasks and the state bus they read.
    pub observers: ObserverManager,
    /// Subscriber tasks and their MQTT/HTTP routes.
    pub subscribers: Arc<SubscriberManager>,
    thing_trigger_rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<ObjectRef<Thing>>>>,
}

impl Context {
    pub fn new(
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        providers: ProviderRegistry,
        config: ControllerConfig,
        (feed, rx): (Arc<dyn StateFeed>, ThingTriggerReceiver),
        (observers, subscribers): (ObserverManager, Arc<SubscriberManager>),
    ) -> Self {
        Self {
            observers,
            subscribers,
            feed,
            thing_trigger_rx: std::sync::Mutex::new(Some(rx.0)),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            providers,
            config,
            status_memory: status::StatusMemory::default(),
            backoff: RetryBackoff::new(Duration::from_secs(2), Duration::from_secs(300)),
        }
    }
}

/// Asks the Thing controller to reconcile one Thing now. Backends with a push channel use it
/// when new reported state arrives; the controller de-duplicates queued requests, and the
/// caller rate-limits per Thing, so status writes stay bounded.
#[derive(Clone)]
pub struct ThingTrigger(tokio::sync::mpsc::Sender<ObjectRef<Thing>>);

/// The receiving end, handed to [`Context::new`].
pub struct ThingTriggerReceiver(tokio::sync::mpsc::Receiver<ObjectRef<Thing>>);

impl ThingTrigger {
    pub fn channel() -> (ThingTrigger, ThingTriggerReceiver) {
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        (ThingTrigger(tx), ThingTriggerReceiver(rx))
    }

    /// Never blocks: when the queue is full the request is dropped, which is safe because the
    /// periodic resync reconciles every Thing anyway.
    pub fn request(&self, namespace: &str, name: &str) {
        let _ = self.0.try_send(ObjectRef::new(name).within(namespace));
    }
}

impl Context {
    fn take_thing_triggers(&self) -> Option<tokio::sync::mpsc::Receiver<ObjectRef<Thing>>> {
        self.thing_trigger_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or(""),
        obj.meta().name.as_deref().unwrap_or("")
    )
}

/// Retries failed reconciles with per-object exponential backoff and jitter.
fn error_policy<K>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let key = object_key(obj.as_ref());
    let delay = ctx.backoff.next_delay(&key);
    tracing::warn!(object = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn api_for<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

async fn drain<K, S>(name: &'static str, stream: S)
where
    K: Resource,
    S: futures::Stream<
            Item = Result<
                (kube::runtime::reflector::ObjectRef<K>, Action),
                kube::runtime::controller::Error<Error, watcher::Error>,
            >,
        >,
{
    stream
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(controller = name, error = %e, "controller stream error");
            }
        })
        .await;
}

fn start<K, F, Fut>(
    api: Api<K>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    triggers: Option<tokio::sync::mpsc::Receiver<ObjectRef<K>>>,
    reconcile: F,
) -> (
    kube::runtime::reflector::Store<K>,
    impl std::future::Future<Output = ()>,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    let concurrency = ctx.config.concurrency;
    let mut controller = Controller::new(api, watcher::Config::default().any_semantic())
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(async move { shutdown.cancelled().await });
    if let Some(rx) = triggers {
        controller = controller.reconcile_on(tokio_stream_from(rx));
    }
    let store = controller.store();
    let name = Box::leak(K::kind(&()).into_owned().into_boxed_str());
    let fut = drain(name, controller.run(reconcile, error_policy::<K>, ctx));
    (store, fut)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Runs the three controllers until `shutdown` fires. Marks `readiness` once every cache synced.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken, readiness: Arc<Readiness>) {
    let ns = ctx.config.watch_namespace.clone();
    let (things, things_fut) = start(
        api_for::<Thing>(ctx.client.clone(), ns.as_deref()),
        ctx.clone(),
        shutdown.clone(),
        ctx.take_thing_triggers(),
        thing::reconcile,
    );
    let (observers, observers_fut) = start(
        api_for::<Observer>(ctx.client.clone(), ns.as_deref()),
        ctx.clone(),
        shutdown.clone(),
        None,
        observer::reconcile,
    );
    let (subscribers, subscribers_fut) = start(
        api_for::<Subscriber>(ctx.client.clone(), ns.as_deref()),
        ctx.clone(),
        shutdown.clone(),
        None,
        subscriber::reconcile,
    );
    let ready = async move {
        let synced = async {
            things.wait_until_ready().await.is_ok()
                && observers.wait_until_ready().await.is_ok()
                && subscribers.wait_until_ready().await.is_ok()
        };
        if synced.await {
            tracing::info!("caches synced, controllers ready");
            readiness.set_ready(true);
        }
    };
    tokio::join!(things_fut, observers_fut, subscribers_fut, ready);
}
