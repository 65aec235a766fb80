//! Subscribers: messages that arrive on an MQTT topic filter (through the connection that acts
//! for the Subscriber's namespace) or at an HTTP endpoint the operator serves, checked and written into a Thing.
//!
//! By job: [`message`] judges a message (pure); [`routes`] finds the Subscriber a message is for;
//! [`auth`] guards HTTP endpoints with a bearer token; [`task`] is the per-Subscriber loop that
//! coalesces and paces writes; [`write`] puts them into the target Thing. The
//! [`SubscriberManager`] here starts and stops tasks and keeps the routes in step with them.

mod auth;
pub mod message;
mod receipt;
pub(crate) mod routes;
mod task;
mod write;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use kube::{Api, Client, ResourceExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use message::Rejection;

use message::Inbound;
use receipt::Receipt;

use self::{auth::read_token, routes::Routes, task::SubscriberTask, write::TargetWriter};
use super::{
    SharedByTasks,
    broker_connections::BrokerConnections,
    mqtt::{MqttAccess, qos},
    tasks::TaskRegistry,
};
use crate::{
    api::{Subscriber, object_key},
    feed::ReportedStateWriter,
    forwarding::provenance::ProvenanceBook,
    forwarding::status_budget::TaskStatusBudget,
    metrics::Metrics,
};

/// Messages queued per Subscriber before new ones are refused (the task merges them quickly).
const QUEUE: usize = 1024;
/// How long an HTTP caller waits for its message to be written before it gets 503.
const HTTP_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Starts and stops Subscriber tasks and routes MQTT messages and HTTP requests to them.
pub struct SubscriberManager {
    client: Client,
    mqtt: MqttAccess,
    /// Sessions with the brokers BrokerConnections name; each has its own routes.
    connections: BrokerConnections,
    /// Shared with the Observers: what the operator's own writes into Things caused.
    provenance: ProvenanceBook,
    /// Where `target.field: Reported` writes go (wired by the runner: forwarding does not know
    /// which backend takes reported state, or how).
    reported: Arc<dyn ReportedStateWriter>,
    metrics: Arc<Metrics>,
    /// Turns for status writes, shared with the Observers.
    status_budget: TaskStatusBudget,
    shutdown: CancellationToken,
    routes: Routes,
    tasks: TaskRegistry,
    /// False on a standby replica (leader election): it has no routes and says so.
    active: AtomicBool,
}

impl SubscriberManager {
    pub fn new(
        client: Client,
        mqtt: MqttAccess,
        connections: BrokerConnections,
        reported: Arc<dyn ReportedStateWriter>,
        SharedByTasks {
            provenance,
            status_budget,
        }: SharedByTasks,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        let routes = Routes::default();
        mqtt.install_router(Arc::new(routes.clone()));
        Self {
            client,
            mqtt,
            connections,
            reported,
            provenance,
            metrics,
            status_budget,
            shutdown,
            routes,
            tasks: TaskRegistry::default(),
            active: AtomicBool::new(false),
        }
    }

    /// Called when this replica starts its controllers (it is the leader, or there is no election).
    pub fn activate(&self) {
        self.active.store(true, Ordering::SeqCst);
    }

    /// Whether an MQTT source can be served.
    pub fn has_mqtt(&self) -> bool {
        self.mqtt.is_configured()
    }

    /// Makes sure a task runs for this generation of the Subscriber.
    pub async fn ensure(&self, subscriber: &Subscriber) -> Result<(), String> {
        let ns = subscriber.namespace().unwrap_or_default();
        let name = subscriber.name_any();
        let generation = subscriber.metadata.generation;
        if self.tasks.is_current(&ns, &name, generation) {
            return Ok(());
        }
        self.stop(&ns, &name);
        let spec = &subscriber.spec;
        let token = match spec
            .source
            .http
            .as_ref()
            .and_then(|h| h.token_secret.as_deref())
        {
            Some(secret) => Some(read_token(&self.client, &ns, secret).await?),
            None => None,
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        // The namespace connection the source uses, held by the task: while it runs the
        // connection stays open.
        let mut namespace_connection = None;
        if let Some(m) = &spec.source.mqtt
            && let Some(connection) = &m.connection
        {
            // The route first: the session subscribes every route of its connection on each
            // connect, and a persistent session hands over what it kept at once.
            self.connections.routes(&ns, connection).add_mqtt(
                object_key(&ns, &name),
                &m.topic_filter,
                qos(m.qos),
                tx.clone(),
            );
            // Not connected (or no session yet): the next connect subscribes it.
            if let Some(session) = self.connections.connection(&ns, connection)
                && let Err(e) = session
                    .client
                    .try_subscribe(m.topic_filter.clone(), qos(m.qos))
            {
                tracing::warn!(error = %e, "subscription queued for reconnect");
            }
        } else if let Some(m) = &spec.source.mqtt {
            // The route first: the broker hands over what the namespace's persistent session
            // kept the moment the connection is up.
            let key = object_key(&ns, &name);
            self.routes
                .add_mqtt(key.clone(), &m.topic_filter, qos(m.qos), tx.clone());
            let connection = match self.mqtt.connection_for(&ns).await {
                Ok(connection) => connection,
                Err(e) => {
                    self.routes.remove(&key, None);
                    return Err(e.to_string());
                }
            };
            if let Err(e) = connection
                .client
                .try_subscribe(m.topic_filter.clone(), qos(m.qos))
            {
                tracing::warn!(error = %e, "subscription queued for reconnect");
            }
            namespace_connection = Some(connection);
        }
        if let Some(h) = &spec.source.http {
            self.routes
                .add_http(object_key(&ns, &name), &ns, &h.path, token, tx)?;
        }
        let cancel = self.shutdown.child_token();
        let target = TargetWriter {
            things: Api::namespaced(self.client.clone(), &ns),
            thing_name: spec.target.thing_name.clone(),
            field: spec.target.field,
            reported: self.reported.clone(),
        };
        let task = SubscriberTask::new(
            subscriber,
            target,
            self.client.clone(),
            self.provenance.clone(),
            self.metrics.clone(),
            self.status_budget.clone(),
            cancel.clone(),
        );
        // Every log line of the task names its Subscriber through this span.
        let span = tracing::info_span!("subscriber", namespace = %ns, name = %name);
        let run = async move {
            let _held = namespace_connection;
            task.run(rx).await
        };
        tokio::spawn(tracing::Instrument::instrument(run, span));
        self.tasks.insert(&ns, &name, generation, cancel);
        Ok(())
    }

    pub fn stop(&self, namespace: &str, name: &str) {
        self.tasks.stop(namespace, name);
        let key = object_key(namespace, name);
        self.routes
            .remove(&key, self.mqtt.existing_client(namespace).as_ref());
        self.connections.remove_routes(namespace, &key);
    }

    /// Hands an HTTP request body to the Subscriber serving `namespace`/`path`.
    pub async fn http_message(
        &self,
        namespace: &str,
        path: &str,
        bearer: Option<&str>,
        payload: Vec<u8>,
    ) -> Result<(), Rejection> {
        if !self.active.load(Ordering::SeqCst) {
            return Err(Rejection::Standby);
        }
        let queue = self.routes.http_queue(namespace, path, bearer)?;
        let (reply, verdict) = oneshot::channel();
        queue
            .try_send(Inbound {
                payload,
                receipt: Receipt::Http(reply),
            })
            .map_err(|_| Rejection::Busy)?;
        // The answer comes once the message is written into the Thing; a caller does not wait
        // for a write that keeps failing (it stays pending, and a retry merges the same keys).
        match tokio::time::timeout(HTTP_WAIT, verdict).await {
            Ok(Ok(verdict)) => verdict,
            // The task ended before writing it (spec change, shutdown).
            Ok(Err(_)) => Err(Rejection::Busy),
            Err(_) => Err(Rejection::NotWrittenYet),
        }
    }
}
