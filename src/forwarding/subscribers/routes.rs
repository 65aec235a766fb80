//! Which Subscriber a message is for: MQTT topic filters (matched on the connection's event
//! loop) and HTTP paths (`POST /subscribers/<namespace>/<path>`), each leading to the queue of
//! one Subscriber task.
//!
//! The table is shared between the manager (which adds and removes routes), each namespace's MQTT
//! connection (which renews that namespace's subscriptions on reconnect and routes its messages
//! to that namespace's Subscribers only) and the HTTP handler.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::mpsc;

use super::{
    auth::authorized,
    message::{Inbound, Rejection},
    receipt::{Receipt, SharedAck},
};
use crate::{
    forwarding::mqtt::NamespaceRouter,
    mqtt::{connection::Handler, topic::filter_matches},
};

/// Whether the Subscriber `key` (`namespace/name`) lives in `namespace`.
fn in_namespace(key: &str, namespace: &str) -> bool {
    key.split_once('/').is_some_and(|(ns, _)| ns == namespace)
}

struct MqttRoute {
    filter: String,
    qos: QoS,
    tx: mpsc::Sender<Inbound>,
}

struct HttpRoute {
    /// The Subscriber (`namespace/name`) serving the path.
    owner: String,
    /// The bearer token callers must present; `None`: open.
    token: Option<String>,
    tx: mpsc::Sender<Inbound>,
}

/// A QoS 1/2 message no route wanted when it came: after a restart, the broker redelivers a
/// persistent session's messages as soon as the connection is up, possibly before every
/// Subscriber of the namespace has its route again. It waits (unacknowledged) for a route.
struct Parked {
    since: Instant,
    publish: Publish,
    client: AsyncClient,
}

/// Parked messages wait this long for a route; then nobody wants them: acknowledged, dropped.
const PARK_TIMEOUT: Duration = Duration::from_secs(30);
/// Parked messages per namespace; more are left unacknowledged (the broker redelivers them
/// after a reconnect).
const PARK_LIMIT: usize = 256;

#[derive(Default)]
struct Table {
    /// By the Subscriber's `namespace/name`.
    mqtt: HashMap<String, MqttRoute>,
    /// By `(namespace, path)`: a path is unique within a namespace, whoever serves it.
    http: HashMap<(String, String), HttpRoute>,
    /// By namespace.
    parked: HashMap<String, VecDeque<Parked>>,
}

/// Acknowledges `publish` on `client` (from the Subscriber tasks, once it is written).
fn ack_of(client: &AsyncClient, publish: &Publish) -> Box<dyn Fn() + Send + Sync> {
    let (client, publish) = (client.clone(), publish.clone());
    Box::new(move || {
        if let Err(e) = client.try_ack(&publish) {
            tracing::warn!(topic = %publish.topic, error = %e, "acknowledgement not queued; the broker will redeliver");
        }
    })
}

/// Hands `publish` to every route of `namespace` whose filter matches; false when none does.
/// QoS 1/2 messages carry one shared acknowledgement, sent when every Subscriber settled it.
fn dispatch(table: &Table, namespace: &str, client: &AsyncClient, publish: &Publish) -> bool {
    let targets: Vec<(&String, &MqttRoute)> = table
        .mqtt
        .iter()
        .filter(|(key, route)| {
            in_namespace(key, namespace) && filter_matches(&route.filter, &publish.topic)
        })
        .collect();
    if targets.is_empty() {
        return false;
    }
    let mut acks = match publish.qos {
        QoS::AtMostOnce => Vec::new(),
        _ => SharedAck::split(targets.len(), ack_of(client, publish)),
    };
    for (name, route) in targets {
        let receipt = acks.pop().map_or(Receipt::None, Receipt::Mqtt);
        let inbound = Inbound {
            payload: publish.payload.to_vec(),
            receipt,
        };
        // A full queue drops the message with its share of the acknowledgement: unacknowledged,
        // the broker redelivers it after the next reconnect.
        if route.tx.try_send(inbound).is_err() {
            tracing::warn!(subscriber = %name, topic = %publish.topic, "subscriber queue full, message left unacknowledged");
        }
    }
    true
}

/// The routing table; clones share it.
#[derive(Clone, Default)]
pub struct Routes(Arc<Mutex<Table>>);

impl Routes {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes messages matching `filter` to the Subscriber `key` (the caller subscribes; every
    /// (re)connect subscribes every route again), and hands it the parked messages it matches.
    pub fn add_mqtt(&self, key: String, filter: &str, qos: QoS, tx: mpsc::Sender<Inbound>) {
        let mut table = self.lock();
        let namespace = key.split_once('/').map_or("", |(ns, _)| ns).to_string();
        table.mqtt.insert(
            key,
            MqttRoute {
                filter: filter.to_string(),
                qos,
                tx,
            },
        );
        // Messages that came before this route did may be for it.
        let parked = table.parked.remove(&namespace).unwrap_or_default();
        let mut still = VecDeque::new();
        for p in parked {
            if !dispatch(&table, &namespace, &p.client, &p.publish) {
                still.push_back(p);
            }
        }
        if !still.is_empty() {
            table.parked.insert(namespace, still);
        }
    }

    /// Serves `namespace`/`path` with the queue of Subscriber `owner`, unless another
    /// Subscriber's live route has it already.
    pub fn add_http(
        &self,
        owner: String,
        namespace: &str,
        path: &str,
        token: Option<String>,
        tx: mpsc::Sender<Inbound>,
    ) -> Result<(), String> {
        let mut table = self.lock();
        let key = (namespace.to_string(), path.to_string());
        if let Some(existing) = table.http.get(&key)
            && existing.owner != owner
            && !existing.tx.is_closed()
        {
            return Err(format!("another Subscriber already serves path {path:?}"));
        }
        table.http.insert(key, HttpRoute { owner, token, tx });
        Ok(())
    }

    /// Drops the routes of Subscriber `key`, unsubscribing `client` (its namespace's
    /// connection) from its MQTT filter unless another route of that namespace still uses it.
    pub fn remove(&self, key: &str, client: Option<&AsyncClient>) {
        let mut table = self.lock();
        let namespace = key.split_once('/').map_or(key, |(ns, _)| ns);
        if let Some(route) = table.mqtt.remove(key)
            && let Some(client) = client
            && !table
                .mqtt
                .iter()
                .any(|(k, r)| in_namespace(k, namespace) && r.filter == route.filter)
        {
            let _ = client.try_unsubscribe(route.filter);
        }
        // By owner, at once: the stopped task may take a moment to end, and meanwhile its path
        // must neither answer "busy" nor look taken to the Subscriber's next generation.
        table.http.retain(|_, r| r.owner != key);
    }

    /// The queue of the Subscriber serving `namespace`/`path`, if `bearer` may post to it.
    pub fn http_queue(
        &self,
        namespace: &str,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<mpsc::Sender<Inbound>, Rejection> {
        let table = self.lock();
        let route = table
            .http
            .get(&(namespace.to_string(), path.to_string()))
            .ok_or(Rejection::NotFound)?;
        if !authorized(route.token.as_deref(), bearer) {
            return Err(Rejection::Unauthorized);
        }
        Ok(route.tx.clone())
    }
}

/// Acknowledges and drops the parked messages of `namespace` no route wanted in time (a
/// Subscriber deleted while the operator was down leaves its subscription in the session).
fn expire_parked(table: &mut Table, namespace: &str) {
    let Some(parked) = table.parked.get_mut(namespace) else {
        return;
    };
    while parked
        .front()
        .is_some_and(|p| p.since.elapsed() > PARK_TIMEOUT)
    {
        if let Some(p) = parked.pop_front() {
            tracing::info!(topic = %p.publish.topic, "no Subscriber wants this message; acknowledged and dropped");
            ack_of(&p.client, &p.publish)();
        }
    }
}

impl NamespaceRouter for Routes {
    fn handler_for(&self, namespace: &str) -> Arc<dyn Handler> {
        Arc::new(MqttRouter {
            routes: self.clone(),
            namespace: namespace.to_string(),
        })
    }
}

/// Routes the MQTT messages of one namespace's connection to that namespace's Subscribers by
/// topic filter. Runs on the event loop: never blocks.
pub struct MqttRouter {
    routes: Routes,
    namespace: String,
}

impl MqttRouter {
    fn routes<'t>(&self, table: &'t Table) -> impl Iterator<Item = (&'t String, &'t MqttRoute)> {
        let namespace = self.namespace.clone();
        table
            .mqtt
            .iter()
            .filter(move |(key, _)| in_namespace(key, &namespace))
    }
}

impl Handler for MqttRouter {
    fn on_connected(&self, client: &AsyncClient) {
        let table = self.routes.lock();
        for (_, route) in self.routes(&table) {
            if let Err(e) = client.try_subscribe(route.filter.clone(), route.qos) {
                tracing::warn!(filter = %route.filter, error = %e, "cannot queue subscription");
            }
        }
    }

    fn on_message(&self, client: &AsyncClient, topic: &str, payload: &[u8]) {
        // Only reached through `on_publish`'s default elsewhere; kept for QoS 0 callers.
        let publish = Publish::new(topic, QoS::AtMostOnce, payload.to_vec());
        self.on_publish(client, &publish);
    }

    fn on_publish(&self, client: &AsyncClient, publish: &Publish) {
        let mut table = self.routes.lock();
        expire_parked(&mut table, &self.namespace);
        if dispatch(&table, &self.namespace, client, publish) || publish.qos == QoS::AtMostOnce {
            return;
        }
        let parked = table.parked.entry(self.namespace.clone()).or_default();
        if parked.len() < PARK_LIMIT {
            parked.push_back(Parked {
                since: Instant::now(),
                publish: publish.clone(),
                client: client.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_served_once_per_namespace_and_freed_when_its_subscriber_stops() {
        let routes = Routes::default();
        let (tx, _rx) = mpsc::channel(1);
        routes
            .add_http("ns/a".into(), "ns", "door", None, tx.clone())
            .unwrap();
        let (other, _other_rx) = mpsc::channel(1);
        assert!(
            routes
                .add_http("ns/b".into(), "ns", "door", None, other.clone())
                .is_err()
        );
        routes
            .add_http("ns2/b".into(), "ns2", "door", None, other.clone())
            .unwrap();
        assert!(routes.http_queue("ns", "door", None).is_ok());
        assert_eq!(
            routes.http_queue("ns", "window", None).err(),
            Some(Rejection::NotFound)
        );
        // The next generation of the same Subscriber takes its path over while the old task
        // is still running.
        routes
            .add_http("ns/a".into(), "ns", "door", None, tx)
            .unwrap();
        routes.remove("ns/a", None);
        assert_eq!(
            routes.http_queue("ns", "door", None).err(),
            Some(Rejection::NotFound),
            "a stopped Subscriber's path is gone at once, not busy"
        );
        assert!(routes.http_queue("ns2", "door", None).is_ok());
        routes
            .add_http("ns/b".into(), "ns", "door", None, other)
            .unwrap();
    }

    #[test]
    fn a_path_whose_task_ended_is_free() {
        let routes = Routes::default();
        let (tx, rx) = mpsc::channel(1);
        routes
            .add_http("ns/a".into(), "ns", "door", None, tx)
            .unwrap();
        drop(rx);
        let (other, _other_rx) = mpsc::channel(1);
        routes
            .add_http("ns/b".into(), "ns", "door", None, other)
            .unwrap();
    }

    #[test]
    fn a_path_with_a_token_needs_it() {
        let routes = Routes::default();
        let (tx, _rx) = mpsc::channel(1);
        routes
            .add_http("ns/a".into(), "ns", "door", Some("s3cret".into()), tx)
            .unwrap();
        assert_eq!(
            routes.http_queue("ns", "door", None).err(),
            Some(Rejection::Unauthorized)
        );
        assert_eq!(
            routes.http_queue("ns", "door", Some("guess")).err(),
            Some(Rejection::Unauthorized)
        );
        assert!(routes.http_queue("ns", "door", Some("s3cret")).is_ok());
    }

    #[test]
    fn mqtt_messages_reach_every_matching_subscriber() {
        let routes = Routes::default();
        let (a, mut a_rx) = mpsc::channel(4);
        let (b, mut b_rx) = mpsc::channel(4);
        routes.add_mqtt("ns/a".into(), "meters/+/kwh", QoS::AtLeastOnce, a);
        routes.add_mqtt("ns/b".into(), "meters/#", QoS::AtLeastOnce, b);
        let (client, _eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("test", "localhost", 1883), 4);
        let router = routes.handler_for("ns");
        router.on_message(&client, "meters/m1/kwh", b"{}");
        router.on_message(&client, "meters/m1/volts", b"{}");
        assert!(a_rx.try_recv().is_ok());
        assert!(a_rx.try_recv().is_err());
        assert!(b_rx.try_recv().is_ok());
        assert!(b_rx.try_recv().is_ok());
        routes.remove("ns/a", None);
        router.on_message(&client, "meters/m1/kwh", b"{}");
        assert!(a_rx.try_recv().is_err());
        assert!(b_rx.try_recv().is_ok());
    }

    #[test]
    fn a_namespace_connection_feeds_only_that_namespaces_subscribers() {
        let routes = Routes::default();
        let (a, mut a_rx) = mpsc::channel(4);
        let (b, mut b_rx) = mpsc::channel(4);
        // Both namespaces were granted the same shared feed.
        routes.add_mqtt("team-a/s".into(), "feeds/#", QoS::AtLeastOnce, a);
        routes.add_mqtt("team-b/s".into(), "feeds/#", QoS::AtLeastOnce, b);
        let (client, _eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("test", "localhost", 1883), 4);
        routes
            .handler_for("team-a")
            .on_message(&client, "feeds/weather", b"{}");
        assert!(a_rx.try_recv().is_ok());
        assert!(
            b_rx.try_recv().is_err(),
            "team-b gets its copy on its own connection, not team-a's"
        );
    }
}
