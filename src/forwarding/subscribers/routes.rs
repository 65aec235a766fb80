//! Which Subscriber a message is for: MQTT topic filters (matched on the connection's event
//! loop) and HTTP paths (`POST /subscribers/<namespace>/<path>`), each leading to the queue of
//! one Subscriber task.
//!
//! The table is shared between the manager (which adds and removes routes), each namespace's MQTT
//! connection (which renews that namespace's subscriptions on reconnect and routes its messages
//! to that namespace's Subscribers only) and the HTTP handler.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;

use super::{
    auth::authorized,
    message::{Inbound, Rejection},
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

#[derive(Default)]
struct Table {
    /// By the Subscriber's `namespace/name`.
    mqtt: HashMap<String, MqttRoute>,
    /// By `(namespace, path)`: a path is unique within a namespace, whoever serves it.
    http: HashMap<(String, String), HttpRoute>,
}

/// The routing table; clones share it.
#[derive(Clone, Default)]
pub struct Routes(Arc<Mutex<Table>>);

impl Routes {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes messages matching `filter` to the Subscriber `key`, and subscribes `client` to it
    /// if there is a connection (otherwise, or if the request queue is full, the next
    /// (re)connect subscribes every route).
    pub fn add_mqtt(
        &self,
        key: String,
        filter: &str,
        qos: QoS,
        tx: mpsc::Sender<Inbound>,
        client: Option<&AsyncClient>,
    ) {
        let mut table = self.lock();
        if let Some(client) = client
            && let Err(e) = client.try_subscribe(filter, qos)
        {
            tracing::warn!(subscriber = %key, error = %e, "subscription queued for reconnect");
        }
        table.mqtt.insert(
            key,
            MqttRoute {
                filter: filter.to_string(),
                qos,
                tx,
            },
        );
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

    fn on_message(&self, _client: &AsyncClient, topic: &str, payload: &[u8]) {
        let table = self.routes.lock();
        for (name, route) in self.routes(&table) {
            if filter_matches(&route.filter, topic)
                && route
                    .tx
                    .try_send(Inbound {
                        payload: payload.to_vec(),
                        reply: None,
                    })
                    .is_err()
            {
                tracing::warn!(subscriber = %name, %topic, "subscriber queue full, message dropped");
            }
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
        routes.add_mqtt("ns/a".into(), "meters/+/kwh", QoS::AtLeastOnce, a, None);
        routes.add_mqtt("ns/b".into(), "meters/#", QoS::AtLeastOnce, b, None);
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
        routes.add_mqtt("team-a/s".into(), "feeds/#", QoS::AtLeastOnce, a, None);
        routes.add_mqtt("team-b/s".into(), "feeds/#", QoS::AtLeastOnce, b, None);
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
