//! One reconciler per kind, sharing a [`Context`].
//!
//! - `context`: what every reconcile shares, built from parts (a test builds it around a mocked
//!   API server and a fake backend: `fixtures`);
//! - `instrument`: the span, metrics and error policy around every reconcile;
//! - `thing`: the Thing reconciler; `ready`: its pure rules (Ready condition, when the Ready
//!   Event fires, what to requeue);
//! - `task_kind`: the shared reconciler of the kinds that run in-memory tasks (`observer`,
//!   `subscriber`, and `broker_connection`, whose task is a broker session);
//! - `status`, `kube_events`, `backoff`: status writes, Events, retry delays;
//! - `things_gauge`: the Things-by-Ready-reason gauge, recomputed from the Thing cache.

mod backoff;
mod broker_connection;
mod context;
mod instrument;
pub mod kube_events;
mod observer;
mod ready;
pub mod status;
mod subscriber;
mod task_kind;
mod thing;
mod things_gauge;
mod valid_specs;
pub mod write_budget;

#[cfg(test)]
mod fixtures;

use std::sync::Arc;

use futures::StreamExt;
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        Controller, WatchStreamExt, controller::Action, reflector, reflector::ObjectRef, watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

pub use backoff::{RetryBackoff, jittered};
pub use context::{Context, ContextParts, ControllerConfig, ThingTrigger, ThingTriggerReceiver};

use crate::{
    api::{BrokerConnection, Observer, Subscriber, Thing},
    error::Error,
    http::Readiness,
};

/// kubectl's client-side apply keeps a copy of the applied object in this annotation.
const KUBECTL_LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or(""),
        obj.meta().name.as_deref().unwrap_or("")
    )
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
    // The cache keeps every object of the kind for as long as it exists; `managedFields` (a
    // field set per writer, parsed) and kubectl's last-applied copy of the object are nothing
    // the operator reads and a large share of each object's memory at fleet size: dropped
    // before the object is stored. Otherwise what `Controller::new` does (reflector, applied
    // objects, the controller's trigger backoff).
    let (store, writer) = reflector::store();
    let objects = watcher::watcher(api, watcher::Config::default().any_semantic())
        .modify(|o: &mut K| {
            o.managed_fields_mut().clear();
            o.annotations_mut().remove(KUBECTL_LAST_APPLIED);
        })
        .reflect(writer)
        .applied_objects();
    let mut controller = Controller::for_stream(objects, store)
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(async move { shutdown.cancelled().await });
    if let Some(rx) = triggers {
        controller = controller.reconcile_on(tokio_stream_from(rx));
    }
    let store = controller.store();
    let name = Box::leak(K::kind(&()).into_owned().into_boxed_str());
    let fut = drain(
        name,
        controller.run(reconcile, instrument::error_policy::<K>, ctx),
    );
    (store, fut)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Runs the four controllers until `shutdown` fires. Marks `readiness` once every cache synced.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken, readiness: Arc<Readiness>) {
    let ns = ctx.config.watch_namespace.clone();
    let (things, things_fut) = start(
        api_for::<Thing>(ctx.client.clone(), ns.as_deref()),
        ctx.clone(),
        shutdown.clone(),
        ctx.take_thing_triggers(),
        thing::reconcile,
    );
    // A broker connection's state changes reconcile it and the Observers/Subscribers naming it.
    let (connection_triggers, observer_triggers, subscriber_triggers) =
        match ctx.connections.take_triggers() {
            Some(t) => (Some(t.connections), Some(t.observers), Some(t.subscribers)),
            None => (None, None, None),
        };
    let (observers, observers_fut) = start(
        api_for::<Observer>(ctx.client.clone(), ns.as_deref()),
        ctx.clone(),
        shutdown.clone(),
        observer_triggers,
        observer::reconcile,
    );
    let (subscribers, subscribers_fut) = start(
        api_for::<Subscriber>(ctx.client.clone(), ns.as_deref()),
        ctx.clone(),
        shutdown.clone(),
        subscriber_triggers,
        subscriber::reconcile,
    );
    let (connections, connections_fut) = start(
        api_for::<BrokerConnection>(ctx.client.clone(), ns.as_deref()),
        ctx.clone(),
        shutdown.clone(),
        connection_triggers,
        broker_connection::reconcile,
    );
    ctx.connections.claims().install(connections.clone());
    let gauge = things_gauge::run(things.clone(), ctx.metrics.clone(), shutdown.clone());
    let ready = async move {
        let synced = async {
            things.wait_until_ready().await.is_ok()
                && observers.wait_until_ready().await.is_ok()
                && subscribers.wait_until_ready().await.is_ok()
                && connections.wait_until_ready().await.is_ok()
        };
        if synced.await {
            tracing::info!("caches synced, controllers ready");
            readiness.set_ready(true);
        }
    };
    tokio::join!(
        things_fut,
        observers_fut,
        subscribers_fut,
        connections_fut,
        ready,
        gauge
    );
}
