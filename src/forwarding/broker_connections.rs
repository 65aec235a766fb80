//! Sessions with brokers the tenants name themselves (the `BrokerConnection` kind): one MQTT
//! session per BrokerConnection, shared by every Observer sink and Subscriber source of its
//! namespace that names it.
//!
//! The BrokerConnection reconciler decides what a session connects to and with what (it reads
//! the Secrets and asks the egress policy) and hands the result here as [`SessionSettings`];
//! this registry starts the session, restarts it when the settings change (a spec or Secret
//! edit) and stops it when the object goes. A session reconnects by itself with a bounded,
//! jittered backoff and renews its Subscribers' subscriptions on every connect. Its state
//! ([`SessionState`]) is read by the reconcilers of the BrokerConnection and of everything
//! using it; every change of state asks them to reconcile again (through trigger channels the
//! controllers consume), so conditions follow the connection without polling.
//!
//! Subscribers' routes live per BrokerConnection and outlive its sessions: a restarted session
//! subscribes them again. Sessions are persistent with manual acknowledgements and a fixed
//! client id, as on the operator's broker: a Subscriber acknowledges a QoS 1/2 message only once
//! it is written, and an MQTT sink counts a delivery on the broker's PUBACK.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use kube::runtime::reflector::ObjectRef;
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    client_id_claims::ClientIdClaims, mqtt::NamespaceRouter, publish_tracker::PublishTracker,
    subscribers::routes::Routes,
};
use crate::{
    api::{BrokerConnection, Observer, Subscriber, object_key},
    metrics::Metrics,
    mqtt::connection::{self, BrokerAddress, Handler, Reconnect},
};

/// Condition reasons of a BrokerConnection (and the reason of its users' `ConnectionNotReady`
/// message).
pub mod reasons {
    pub const CONNECTED: &str = "Connected";
    pub const CONNECTING: &str = "Connecting";
    pub const CONNECT_FAILED: &str = "ConnectFailed";
    pub const AUTH_FAILED: &str = "AuthFailed";
    pub const SECRET_MISSING: &str = "SecretMissing";
    pub const SECRET_INVALID: &str = "SecretInvalid";
    pub const DESTINATION_REFUSED: &str = "DestinationRefused";
    /// An older BrokerConnection of the cluster uses the same client id on the same broker.
    pub const CLIENT_ID_IN_USE: &str = "ClientIdInUse";
    /// On an Observer or Subscriber: a BrokerConnection it names is not connected.
    pub const CONNECTION_NOT_READY: &str = "ConnectionNotReady";
}

/// Longest wait between two connection attempts to a tenant's broker.
const MAX_RECONNECT: Duration = Duration::from_secs(30);
/// Reconcile requests queued per kind before senders wait.
const TRIGGER_QUEUE: usize = 1024;

/// A running session's client, and what tells its publishers when the broker has their
/// messages. Looked up per use: the session's life follows its BrokerConnection, not its users.
#[derive(Clone)]
pub struct SessionClient {
    pub client: AsyncClient,
    pub publishes: Arc<PublishTracker>,
}

/// What a session connects to and with. Built by the BrokerConnection reconciler.
pub struct SessionSettings {
    /// `host` is what the socket connects to: the address the egress policy checked (plain
    /// MQTT), or the name (TLS: the certificate is checked against it).
    pub address: BrokerAddress,
    pub tls: Option<rustls::ClientConfig>,
    /// `None`: no login (a broker that allows anonymous clients).
    pub login: Option<(String, String)>,
    pub client_id: String,
    pub keep_alive: Duration,
    /// A digest of everything above (Secrets included): a different one restarts the session.
    pub fingerprint: String,
}

/// How a session is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Started, no CONNACK yet.
    Connecting,
    Connected,
    /// The last attempt failed; the session keeps trying. `reason` is one of [`reasons`]; the
    /// message names the problem, never a credential.
    Failed {
        reason: &'static str,
        message: String,
    },
}

impl SessionState {
    /// The reason a condition shows for this state.
    pub fn reason(&self) -> &'static str {
        match self {
            SessionState::Connecting => reasons::CONNECTING,
            SessionState::Connected => reasons::CONNECTED,
            SessionState::Failed { reason, .. } => reason,
        }
    }

    pub fn message(&self) -> String {
        match self {
            SessionState::Connecting => "connecting".into(),
            SessionState::Connected => "connected".into(),
            SessionState::Failed { message, .. } => message.clone(),
        }
    }

    /// What a failed connection attempt means.
    fn of_error(error: &ConnectionError) -> SessionState {
        match error {
            ConnectionError::ConnectionRefused(
                code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
            ) => SessionState::Failed {
                reason: reasons::AUTH_FAILED,
                message: format!("the broker refused the login ({code:?})"),
            },
            ConnectionError::ConnectionRefused(code) => SessionState::Failed {
                reason: reasons::CONNECT_FAILED,
                message: format!("the broker refused the connection ({code:?})"),
            },
            // rumqttc's errors name the network or TLS problem; the login is not in them.
            other => SessionState::Failed {
                reason: reasons::CONNECT_FAILED,
                message: other.to_string(),
            },
        }
    }
}

/// Who uses a connection, to be told when its state changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum User {
    Observer(String),
    Subscriber(String),
}

struct Session {
    fingerprint: String,
    client: AsyncClient,
    publishes: Arc<PublishTracker>,
    state: Arc<Mutex<SessionState>>,
    cancel: CancellationToken,
}

/// The reconcile requests state changes cause; consumed once by the controllers.
pub struct ConnectionTriggers {
    pub connections: mpsc::Receiver<ObjectRef<BrokerConnection>>,
    pub observers: mpsc::Receiver<ObjectRef<Observer>>,
    pub subscribers: mpsc::Receiver<ObjectRef<Subscriber>>,
}

struct Senders {
    connections: mpsc::Sender<ObjectRef<BrokerConnection>>,
    observers: mpsc::Sender<ObjectRef<Observer>>,
    subscribers: mpsc::Sender<ObjectRef<Subscriber>>,
}

#[derive(Default)]
struct Tables {
    /// By the BrokerConnection's `namespace/name`.
    sessions: HashMap<String, Session>,
    /// Subscribers' routes, by the BrokerConnection's `namespace/name`.
    routes: HashMap<String, Routes>,
    /// Which connections (by key) each user (`namespace`, [`User`]) names.
    uses: HashMap<(String, User), BTreeSet<String>>,
}

struct Inner {
    claims: ClientIdClaims,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tables: Mutex<Tables>,
    senders: Senders,
    triggers: Mutex<Option<ConnectionTriggers>>,
}

/// The `connection` label of a BrokerConnection's `thing_operator_mqtt_connected` series.
fn gauge_label(namespace: &str, name: &str) -> String {
    format!("connection/{namespace}/{name}")
}

/// The sessions with tenants' brokers; clones share them.
#[derive(Clone)]
pub struct BrokerConnections(Arc<Inner>);

impl BrokerConnections {
    pub fn new(metrics: Arc<Metrics>, shutdown: CancellationToken) -> Self {
        let (connections, connections_rx) = mpsc::channel(TRIGGER_QUEUE);
        let (observers, observers_rx) = mpsc::channel(TRIGGER_QUEUE);
        let (subscribers, subscribers_rx) = mpsc::channel(TRIGGER_QUEUE);
        Self(Arc::new(Inner {
            claims: ClientIdClaims::default(),
            metrics,
            shutdown,
            tables: Mutex::default(),
            senders: Senders {
                connections,
                observers,
                subscribers,
            },
            triggers: Mutex::new(Some(ConnectionTriggers {
                connections: connections_rx,
                observers: observers_rx,
                subscribers: subscribers_rx,
            })),
        }))
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.0.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which BrokerConnection may use a client id on a broker.
    pub fn claims(&self) -> &ClientIdClaims {
        &self.0.claims
    }

    /// Asks the BrokerConnection `reference` names to reconcile again.
    pub fn request_reconcile(&self, reference: ObjectRef<BrokerConnection>) {
        request(&self.0.senders.connections, reference);
    }

    /// The reconcile requests, once (the controllers consume them).
    pub fn take_triggers(&self) -> Option<ConnectionTriggers> {
        self.0
            .triggers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Runs a session with `settings` for the BrokerConnection `namespace/name`: keeps the one
    /// running when its settings are the same, replaces it otherwise. Returns its state.
    pub fn ensure(&self, namespace: &str, name: &str, settings: SessionSettings) -> SessionState {
        let key = object_key(namespace, name);
        let mut tables = self.tables();
        if let Some(session) = tables.sessions.get(&key)
            && session.fingerprint == settings.fingerprint
            && !session.cancel.is_cancelled()
        {
            return lock_state(&session.state).clone();
        }
        if let Some(old) = tables.sessions.remove(&key) {
            tracing::info!(connection = %key, "broker connection settings changed; reconnecting");
            old.cancel.cancel();
        }
        let routes = tables.routes.entry(key.clone()).or_default().clone();
        let state = Arc::new(Mutex::new(SessionState::Connecting));
        let publishes = Arc::new(PublishTracker::default());
        let cancel = self.0.shutdown.child_token();
        let (host, port) = (settings.address.host.clone(), settings.address.port);
        let (username, password) = settings.login.unwrap_or_default();
        let (client, eventloop) = connection::build(connection::ConnectionSettings {
            address: settings.address,
            tls: settings.tls,
            username,
            password,
            client_id: settings.client_id,
            last_will: None,
            // Acknowledged once written, as on the operator's broker: the broker keeps what was
            // not acknowledged for the next session under the same client id.
            session: connection::Session::PersistentManualAcks,
            keep_alive: Some(settings.keep_alive),
        });
        let handler = Arc::new(SessionHandler {
            registry: self.clone(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            inner: routes.handler_for(namespace),
            publishes: publishes.clone(),
            state: state.clone(),
        });
        connection::spawn_driver_with(
            eventloop,
            client.clone(),
            handler,
            self.0
                .metrics
                .mqtt_connection(&gauge_label(namespace, name)),
            cancel.clone(),
            Reconnect {
                max: MAX_RECONNECT,
                jitter: true,
            },
        );
        tracing::info!(connection = %key, %host, port, "broker connection session started");
        tables.sessions.insert(
            key,
            Session {
                fingerprint: settings.fingerprint,
                client,
                publishes,
                state,
                cancel,
            },
        );
        SessionState::Connecting
    }

    /// Ends the session of `namespace/name` (the object went, or its spec cannot be served) and
    /// tells its users.
    pub fn stop(&self, namespace: &str, name: &str) {
        let key = object_key(namespace, name);
        let removed = self.tables().sessions.remove(&key);
        if let Some(session) = removed {
            session.cancel.cancel();
            self.0
                .metrics
                .forget_mqtt_connection(&gauge_label(namespace, name));
            tracing::info!(connection = %key, "broker connection session stopped");
            self.notify_users(namespace, &key);
        }
    }

    /// The state of the session of `namespace/name`; `None` when none runs.
    pub fn state(&self, namespace: &str, name: &str) -> Option<SessionState> {
        let tables = self.tables();
        let session = tables.sessions.get(&object_key(namespace, name))?;
        Some(lock_state(&session.state).clone())
    }

    /// The client and publish tracker of the session of `namespace/name`, if one runs.
    pub fn connection(&self, namespace: &str, name: &str) -> Option<SessionClient> {
        let tables = self.tables();
        let session = tables.sessions.get(&object_key(namespace, name))?;
        Some(SessionClient {
            client: session.client.clone(),
            publishes: session.publishes.clone(),
        })
    }

    /// The Subscriber routes of the BrokerConnection `namespace/name` (made on first use; they
    /// outlive its sessions).
    pub fn routes(&self, namespace: &str, name: &str) -> Routes {
        self.tables()
            .routes
            .entry(object_key(namespace, name))
            .or_default()
            .clone()
    }

    /// Drops the Subscriber `subscriber`'s (a `namespace/name` key) routes on every connection
    /// of its namespace, unsubscribing where no other route needs the filter.
    pub fn remove_routes(&self, namespace: &str, subscriber: &str) {
        let prefix = format!("{namespace}/");
        let tables = self.tables();
        for (key, routes) in tables.routes.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let client = tables.sessions.get(key).map(|s| s.client.clone());
            routes.remove(subscriber, client.as_ref());
        }
    }

    /// Records which connections (by name, in `namespace`) `user` names now, replacing what it
    /// named before; an empty list forgets it.
    pub fn set_uses(&self, namespace: &str, user: User, connections: &[&str]) {
        let keys: BTreeSet<String> = connections
            .iter()
            .map(|c| object_key(namespace, c))
            .collect();
        let mut tables = self.tables();
        let entry = (namespace.to_string(), user);
        if keys.is_empty() {
            tables.uses.remove(&entry);
        } else {
            tables.uses.insert(entry, keys);
        }
    }

    /// Asks the reconcilers of everything using the connection `key` (in `namespace`) to look
    /// again.
    fn notify_users(&self, namespace: &str, key: &str) {
        let users: Vec<User> = self
            .tables()
            .uses
            .iter()
            .filter(|((ns, _), keys)| ns == namespace && keys.contains(key))
            .map(|((_, user), _)| user.clone())
            .collect();
        for user in users {
            match user {
                User::Observer(name) => request(
                    &self.0.senders.observers,
                    ObjectRef::new(&name).within(namespace),
                ),
                User::Subscriber(name) => request(
                    &self.0.senders.subscribers,
                    ObjectRef::new(&name).within(namespace),
                ),
            }
        }
    }

    /// A session's state changed: its BrokerConnection and its users reconcile again.
    fn state_changed(&self, namespace: &str, name: &str) {
        request(
            &self.0.senders.connections,
            ObjectRef::new(name).within(namespace),
        );
        self.notify_users(namespace, &object_key(namespace, name));
    }
}

/// Queues a reconcile request. Never dropped: a user whose connection went away must not stay
/// Ready. A full queue (the controller is behind) is waited on in a task of its own, since this
/// runs on a session's event loop.
fn request<T: Send + 'static>(sender: &mpsc::Sender<T>, item: T) {
    if let Err(mpsc::error::TrySendError::Full(item)) = sender.try_send(item) {
        let sender = sender.clone();
        tokio::spawn(async move {
            let _ = sender.send(item).await;
        });
    }
}

fn lock_state(state: &Mutex<SessionState>) -> MutexGuard<'_, SessionState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a session's event loop calls: records the state, routes messages to the Subscribers of
/// the connection, tells publishers what the broker acknowledged.
struct SessionHandler {
    registry: BrokerConnections,
    namespace: String,
    name: String,
    /// The connection's Subscriber routes.
    inner: Arc<dyn Handler>,
    publishes: Arc<PublishTracker>,
    state: Arc<Mutex<SessionState>>,
}

impl SessionHandler {
    /// Records `next`; a change of reason asks the reconcilers to look again (a repeated
    /// failure with the same reason does not: no reconcile per reconnect attempt).
    fn set_state(&self, next: SessionState) {
        let changed = {
            let mut state = lock_state(&self.state);
            let changed = state.reason() != next.reason();
            *state = next;
            changed
        };
        if changed {
            self.registry.state_changed(&self.namespace, &self.name);
        }
    }
}

impl Handler for SessionHandler {
    fn on_connected(&self, client: &AsyncClient) {
        self.set_state(SessionState::Connected);
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
        tracing::warn!(connection = %object_key(&self.namespace, &self.name), count, "the broker refused subscriptions");
    }

    fn on_connection_lost(&self, error: &ConnectionError) {
        self.set_state(SessionState::of_error(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_logins_are_auth_failures_and_other_errors_connect_failures() {
        let auth = SessionState::of_error(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword,
        ));
        assert_eq!(auth.reason(), reasons::AUTH_FAILED);
        let refused = SessionState::of_error(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::ServiceUnavailable,
        ));
        assert_eq!(refused.reason(), reasons::CONNECT_FAILED);
        let io = SessionState::of_error(&ConnectionError::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(io.reason(), reasons::CONNECT_FAILED);
    }

    #[tokio::test]
    async fn users_are_told_when_their_connection_changes_and_only_then() {
        let registry =
            BrokerConnections::new(Arc::new(Metrics::default()), CancellationToken::new());
        let mut triggers = registry.take_triggers().expect("triggers once");
        assert!(registry.take_triggers().is_none());
        registry.set_uses("ns", User::Observer("o".into()), &["plant"]);
        registry.set_uses("ns", User::Subscriber("s".into()), &["plant", "other"]);
        registry.set_uses("other-ns", User::Observer("o".into()), &["plant"]);
        registry.state_changed("ns", "plant");
        assert_eq!(
            triggers.connections.try_recv().ok(),
            Some(ObjectRef::new("plant").within("ns"))
        );
        assert_eq!(
            triggers.observers.try_recv().ok(),
            Some(ObjectRef::new("o").within("ns"))
        );
        assert!(
            triggers.observers.try_recv().is_err(),
            "another namespace's user of a same-named connection is not told"
        );
        assert_eq!(
            triggers.subscribers.try_recv().ok(),
            Some(ObjectRef::new("s").within("ns"))
        );
        registry.set_uses("ns", User::Subscriber("s".into()), &[]);
        registry.state_changed("ns", "plant");
        assert!(triggers.subscribers.try_recv().is_err(), "forgotten");
    }
}
