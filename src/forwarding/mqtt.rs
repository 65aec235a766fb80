//! The MQTT access of Observer and Subscriber tasks: which connection acts for a namespace, and
//! the QoS a spec's level means.
//!
//! Each namespace gets its own connection, logged in with a broker account whose ACL covers
//! only that namespace's topic roots (its subtree plus any `--mqtt-topic-grant`). Validation
//! already refuses topics outside them; the broker refusing them too means a bug in validation
//! cannot become a cross-tenant read or write. Connections are made on first use and held by
//! their users (an Observer's MQTT sink, a Subscriber's MQTT source); one nobody held at two
//! idle sweeps in a row (`--mqtt-idle-sweep` apart) is closed, so a namespace that stopped using
//! MQTT (or was deleted) costs no connection. Its broker account stays, for the next use.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use rumqttc::{AsyncClient, QoS};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::publish_tracker::PublishTracker;
use crate::{
    api::validation::TopicScope,
    metrics::{Metrics, NamespaceLabels},
    mqtt::{
        connection::{self, BrokerAddress, Handler},
        identity::{IdentityError, NamespaceIdentities},
    },
};

/// Routes the messages arriving on one namespace's connection.
pub trait NamespaceRouter: Send + Sync {
    /// The handler of `namespace`'s connection: it renews that namespace's subscriptions on
    /// every connect and hands its messages to that namespace's Subscribers only.
    fn handler_for(&self, namespace: &str) -> Arc<dyn Handler>;
}

/// Where the broker is and how to reach it; the login comes per namespace.
#[derive(Clone)]
pub struct BrokerEndpoint {
    pub address: BrokerAddress,
    pub tls: Option<rustls::ClientConfig>,
}

/// Why a namespace has no MQTT connection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AccessError {
    #[error("no MQTT broker is configured (--mqtt-url)")]
    NotConfigured,
    #[error("the broker's account administration is not running yet")]
    NotReady,
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

struct Shared {
    endpoint: BrokerEndpoint,
    scope: TopicScope,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Installed once the backend that administers the broker runs (after winning the lease).
    identities: OnceLock<Arc<dyn NamespaceIdentities>>,
    /// Installed by the Subscriber manager.
    router: OnceLock<Arc<dyn NamespaceRouter>>,
    connections: Mutex<HashMap<String, Slot>>,
}

/// A namespace's connection in the making or made, and how many sweeps found it unused.
#[derive(Default)]
struct Slot {
    cell: Arc<OnceCell<NamespaceConnection>>,
    idle_sweeps: u8,
}

impl Slot {
    /// Whether anyone besides the map holds the connection or is still making it.
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.cell) > 1
            || self
                .cell
                .get()
                .is_some_and(|c| Arc::strong_count(&c.lease) > 1)
    }
}

/// One namespace's connection: the client, and what tells its publishers when the broker has
/// their messages. Holding a clone keeps the connection open.
#[derive(Clone)]
pub struct NamespaceConnection {
    pub client: AsyncClient,
    pub publishes: Arc<PublishTracker>,
    /// Stops the connection's driver when the idle sweep closes it; its clones count users.
    lease: Arc<CancellationToken>,
}

/// The MQTT connections the forwarding tasks may use; clones share them. Empty without a
/// configured broker.
#[derive(Clone, Default)]
pub struct MqttAccess {
    shared: Option<Arc<Shared>>,
}

impl MqttAccess {
    /// Connections to `endpoint`, one per namespace, confined to `scope`.
    pub fn new(
        endpoint: BrokerEndpoint,
        scope: TopicScope,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            shared: Some(Arc::new(Shared {
                endpoint,
                scope,
                metrics,
                shutdown,
                identities: OnceLock::new(),
                router: OnceLock::new(),
                connections: Mutex::new(HashMap::new()),
            })),
        }
    }

    /// Whether MQTT sources and sinks can be served at all.
    pub fn is_configured(&self) -> bool {
        self.shared.is_some()
    }

    /// Closes the connections nobody used at this sweep and the previous one (two sweeps: a
    /// task restarting for a spec change does not reconnect its namespace); returns how many
    /// were closed.
    pub fn close_idle(&self) -> usize {
        let Some(shared) = &self.shared else {
            return 0;
        };
        let mut connections = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = Vec::new();
        connections.retain(|namespace, slot| {
            if slot.in_use() {
                slot.idle_sweeps = 0;
                return true;
            }
            slot.idle_sweeps = slot.idle_sweeps.saturating_add(1);
            // A cell nobody is making or holding and never made (its connect failed) goes at
            // once; a made connection after its second idle sweep.
            let made = slot.cell.get();
            if made.is_some() && slot.idle_sweeps < 2 {
                return true;
            }
            if let Some(connection) = made {
                connection.lease.cancel();
                closed.push(namespace.clone());
            }
            false
        });
        drop(connections);
        for namespace in &closed {
            shared
                .metrics
                .forget_mqtt_connection(&connection_label(namespace));
            tracing::info!(%namespace, "namespace broker connection closed: no Observer or Subscriber uses it");
        }
        closed.len()
    }

    /// Runs [`MqttAccess::close_idle`] every `period` until shutdown.
    pub fn spawn_idle_sweep(&self, period: Duration) {
        let Some(shared) = &self.shared else {
            return;
        };
        let shutdown = shared.shutdown.clone();
        let access = self.clone();
        tokio::spawn(async move {
            // A zero period would make `interval` panic; a flag of 0s means "as often as sane".
            let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        access.close_idle();
                    }
                }
            }
        });
    }

    /// Lets connections be made: `identities` issues each namespace's account.
    pub fn install_identities(&self, identities: Arc<dyn NamespaceIdentities>) {
        if let Some(shared) = &self.shared {
            let _ = shared.identities.set(identities);
        }
    }

    /// Where the messages of each namespace's connection go.
    pub fn install_router(&self, router: Arc<dyn NamespaceRouter>) {
        if let Some(shared) = &self.shared {
            let _ = shared.router.set(router);
        }
    }

    fn cell(shared: &Shared, namespace: &str) -> Arc<OnceCell<NamespaceConnection>> {
        let mut connections = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections
            .entry(namespace.to_string())
            .or_default()
            .cell
            .clone()
    }

    /// The connection that acts for `namespace`, made (account and all) on first use. It
    /// stays open while the returned value (or a clone) is held.
    pub async fn connection_for(
        &self,
        namespace: &str,
    ) -> Result<NamespaceConnection, AccessError> {
        let shared = self.shared.as_ref().ok_or(AccessError::NotConfigured)?;
        let cell = Self::cell(shared, namespace);
        cell.get_or_try_init(|| connect(shared, namespace))
            .await
            .cloned()
    }

    /// The connection of `namespace` if one was made (for unsubscribing: never makes one).
    pub fn existing_client(&self, namespace: &str) -> Option<AsyncClient> {
        let shared = self.shared.as_ref()?;
        let connections = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections
            .get(namespace)?
            .cell
            .get()
            .map(|c| c.client.clone())
    }
}

/// Makes `namespace`'s account and starts its connection.
async fn connect(shared: &Shared, namespace: &str) -> Result<NamespaceConnection, AccessError> {
    let identities = shared.identities.get().ok_or(AccessError::NotReady)?;
    let mut roots = vec![shared.scope.subtree(namespace)];
    roots.extend(
        shared
            .scope
            .grants
            .get(namespace)
            .into_iter()
            .flatten()
            .cloned(),
    );
    let roots: Vec<String> = roots
        .into_iter()
        .map(|r| r.trim_end_matches('/').to_string())
        .collect();
    let login = identities.ensure(namespace, &roots).await?;
    let (client, eventloop) = connection::build(connection::ConnectionSettings {
        address: shared.endpoint.address.clone(),
        tls: shared.endpoint.tls.clone(),
        username: login.username,
        password: login.password,
        client_id: login.client_id,
        last_will: None,
        // Subscribers acknowledge a message once it is written: the broker keeps what was not
        // acknowledged for the next session of this namespace (same client id).
        session: connection::Session::PersistentManualAcks,
        keep_alive: None,
    });
    let inner = match shared.router.get() {
        Some(router) => router.handler_for(namespace),
        None => Arc::new(connection::IgnoreMessages),
    };
    let publishes = Arc::new(PublishTracker::default());
    let handler = Arc::new(CountRefusals {
        inner,
        metrics: shared.metrics.clone(),
        namespace: namespace.to_string(),
        publishes: publishes.clone(),
    });
    let lease = Arc::new(shared.shutdown.child_token());
    connection::spawn_driver(
        eventloop,
        client.clone(),
        handler,
        shared.metrics.mqtt_connection(&connection_label(namespace)),
        lease.as_ref().clone(),
    );
    tracing::info!(%namespace, "namespace broker connection started");
    Ok(NamespaceConnection {
        client,
        publishes,
        lease,
    })
}

/// The `connection` label of a namespace's connection in `thing_operator_mqtt_connected`.
fn connection_label(namespace: &str) -> String {
    format!("namespace/{namespace}")
}

/// Counts what the broker's ACL refused a namespace: a refusal means validation let a topic
/// through that the broker did not (or a grant changed), which an operator wants to see.
struct CountRefusals {
    inner: Arc<dyn Handler>,
    metrics: Arc<Metrics>,
    namespace: String,
    /// Told which publish went out as which packet and which the broker acknowledged.
    publishes: Arc<PublishTracker>,
}

impl Handler for CountRefusals {
    fn on_connected(&self, client: &AsyncClient) {
        self.inner.on_connected(client)
    }

    fn on_message(&self, client: &AsyncClient, topic: &str, payload: &[u8]) {
        self.inner.on_message(client, topic, payload)
    }

    fn on_publish(&self, client: &AsyncClient, publish: &rumqttc::Publish) {
        self.inner.on_publish(client, publish)
    }

    fn on_outgoing_publish(&self, pkid: u16) {
        self.publishes.sent(pkid)
    }

    fn on_publish_acknowledged(&self, pkid: u16) {
        self.publishes.acknowledged(pkid)
    }

    fn on_subscriptions_refused(&self, count: usize) {
        tracing::warn!(namespace = %self.namespace, count, "the broker refused subscriptions of this namespace");
        self.metrics
            .mqtt_subscriptions_refused
            .get_or_create(&NamespaceLabels {
                namespace: self.namespace.clone(),
            })
            .inc_by(count as u64);
    }
}

/// The QoS of a spec's `qos` level; the CRD schema admits only 0 to 2, anything else is taken
/// as the default, 1.
pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::identity::BrokerLogin;

    struct AnyLogin;

    #[async_trait::async_trait]
    impl NamespaceIdentities for AnyLogin {
        async fn ensure(
            &self,
            namespace: &str,
            _roots: &[String],
        ) -> Result<BrokerLogin, IdentityError> {
            Ok(BrokerLogin {
                username: namespace.into(),
                password: "p".into(),
                client_id: namespace.into(),
            })
        }
    }

    fn access() -> MqttAccess {
        let access = MqttAccess::new(
            BrokerEndpoint {
                // Nothing listens there: the driver keeps retrying, which is all this needs.
                address: BrokerAddress::parse("mqtt://127.0.0.1:9").expect("url"),
                tls: None,
            },
            TopicScope::default(),
            Arc::new(Metrics::default()),
            CancellationToken::new(),
        );
        access.install_identities(Arc::new(AnyLogin));
        access
    }

    #[tokio::test]
    async fn a_connection_is_closed_after_two_sweeps_without_a_holder() {
        let access = access();
        let held = access.connection_for("team-a").await.expect("connection");
        let stop = held.lease.as_ref().clone();
        for _ in 0..3 {
            assert_eq!(access.close_idle(), 0, "held: never closed");
        }
        assert!(access.existing_client("team-a").is_some());

        drop(held);
        assert_eq!(access.close_idle(), 0, "one idle sweep is not enough");
        // Taken again before the second sweep: the count starts over.
        let again = access.connection_for("team-a").await.expect("connection");
        assert_eq!(access.close_idle(), 0);
        drop(again);
        assert_eq!(access.close_idle(), 0);
        assert!(!stop.is_cancelled());
        assert_eq!(access.close_idle(), 1, "unused at two sweeps in a row");
        assert!(stop.is_cancelled(), "the driver is told to stop");
        assert!(access.existing_client("team-a").is_none());

        // The next use makes a new connection.
        let fresh = access.connection_for("team-a").await.expect("connection");
        assert!(!fresh.lease.is_cancelled());
    }
}
