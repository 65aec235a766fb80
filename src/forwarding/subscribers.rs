//! One task per Subscriber: takes what arrives on its MQTT topic filter (through the operator's
//! events connection) or its HTTP endpoint, validates it, and writes it into the target Thing.
//!
//! Writes are coalesced: messages arriving faster than [`WRITE_INTERVAL`] are merged (JSON merge
//! patch semantics, later wins) and written together, so a telemetry storm costs at most one
//! API write per interval per Subscriber while the latest state always lands.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};
use rumqttc::{AsyncClient, QoS};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::filter::set_pointer;
use crate::{
    api::{
        JsonObject, Subscriber, Thing,
        subscriber::{SubscriberSpec, TargetField},
        thing::Broker,
        validation::check_document,
    },
    metrics::Metrics,
    mqtt::connection::Handler,
    mqtt::topic::{TopicLayout, filter_matches},
};

/// Pending messages are written to the target at most this often.
const WRITE_INTERVAL: Duration = Duration::from_millis(500);
/// Counters go to the Subscriber's status at most this often.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// Default `maxMessageBytes`.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024;
/// Messages queued per Subscriber before new ones are refused (the task merges them quickly).
const QUEUE: usize = 1024;

/// A message for a Subscriber; HTTP callers get the verdict back.
pub struct Inbound {
    pub payload: Vec<u8>,
    pub reply: Option<oneshot::Sender<Result<(), Rejection>>>,
}

/// Why a message was refused. Shown to the sender (HTTP) and in status; never echoes payloads.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("message is {0} bytes, over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("message is not JSON: {0}")]
    NotJson(String),
    #[error("message is not a JSON object")]
    NotObject,
    #[error("{0}")]
    Invalid(String),
    #[error("the Subscriber is busy; retry later")]
    Busy,
    #[error("unauthorized")]
    Unauthorized,
    #[error("no Subscriber serves this path")]
    NotFound,
    #[error("this replica is on standby; retry (the leader serves Subscribers)")]
    Standby,
}

/// Parses and checks one message. Pure.
pub fn parse_message(payload: &[u8], max_bytes: usize) -> Result<JsonObject, Rejection> {
    if payload.len() > max_bytes {
        return Err(Rejection::TooLarge(payload.len(), max_bytes));
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| Rejection::NotJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(Rejection::NotObject);
    };
    let doc = JsonObject(map);
    let problems = check_document("message", &doc, max_bytes);
    if !problems.is_empty() {
        return Err(Rejection::Invalid(problems.join("; ")));
    }
    Ok(doc)
}

/// JSON merge patch (RFC 7386) of `patch` into `target`.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

struct MqttRoute {
    filter: String,
    qos: QoS,
    tx: mpsc::Sender<Inbound>,
}

struct HttpRoute {
    token: Option<String>,
    tx: mpsc::Sender<Inbound>,
}

struct Running {
    generation: Option<i64>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Routes {
    mqtt: HashMap<String, MqttRoute>,
    http: HashMap<(String, String), HttpRoute>,
}

/// Starts and stops Subscriber tasks and routes MQTT messages and HTTP requests to them.
pub struct SubscriberManager {
    client: Client,
    mqtt: Option<AsyncClient>,
    layout: Option<TopicLayout>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    routes: Arc<Mutex<Routes>>,
    tasks: Mutex<HashMap<String, Running>>,
    /// False on a standby replica (leader election): it has no routes and says so.
    active: std::sync::atomic::AtomicBool,
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl SubscriberManager {
    pub fn new(
        client: Client,
        mqtt: Option<AsyncClient>,
        layout: Option<TopicLayout>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            client,
            mqtt,
            layout,
            metrics,
            shutdown,
            routes: Arc::default(),
            tasks: Mutex::default(),
            active: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Called when this replica starts its controllers (it is the leader, or there is no election).
    pub fn activate(&self) {
        self.active.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn has_mqtt(&self) -> bool {
        self.mqtt.is_some()
    }

    /// The MQTT handler that feeds Subscribers (install it on the events connection).
    pub fn mqtt_handler(&self) -> Arc<dyn Handler> {
        Arc::new(MqttRouter {
            routes: self.routes.clone(),
        })
    }

    /// Makes sure a task runs for this generation of the Subscriber.
    pub async fn ensure(&self, subscriber: &Subscriber) -> Result<(), String> {
        let ns = subscriber.namespace().unwrap_or_default();
        let name = subscriber.name_any();
        let generation = subscriber.metadata.generation;
        if self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key(&ns, &name))
            .is_some_and(|r| r.generation == generation && !r.cancel.is_cancelled())
        {
            return Ok(());
        }
        self.stop(&ns, &name);
        let spec = subscriber.spec.clone();
        let token = match spec
            .source
            .http
            .as_ref()
            .and_then(|h| h.token_secret.clone())
        {
            Some(secret) => Some(read_token(&self.client, &ns, &secret).await?),
            None => None,
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) = &spec.source.mqtt {
                let qos = match m.qos {
                    0 => QoS::AtMostOnce,
                    2 => QoS::ExactlyOnce,
                    _ => QoS::AtLeastOnce,
                };
                routes.mqtt.insert(
                    key(&ns, &name),
                    MqttRoute {
                        filter: m.topic_filter.clone(),
                        qos,
                        tx: tx.clone(),
                    },
                );
                if let Some(client) = &self.mqtt
                    && let Err(e) = client.try_subscribe(m.topic_filter.clone(), qos)
                {
                    // The next (re)connect subscribes every route again.
                    tracing::warn!(subscriber = %key(&ns, &name), error = %e, "subscription queued for reconnect");
                }
            }
            if let Some(h) = &spec.source.http {
                if let Some(existing) = routes.http.get(&(ns.clone(), h.path.clone()))
                    && !existing.tx.is_closed()
                {
                    return Err(format!(
                        "another Subscriber already serves path {:?}",
                        h.path
                    ));
                }
                routes
                    .http
                    .insert((ns.clone(), h.path.clone()), HttpRoute { token, tx });
            }
        }
        let cancel = self.shutdown.child_token();
        let status = subscriber.status.clone().unwrap_or_default();
        let task = SubscriberTask {
            namespace: ns.clone(),
            name: name.clone(),
            spec,
            api: Api::namespaced(self.client.clone(), &ns),
            things: Api::namespaced(self.client.clone(), &ns),
            mqtt: self.mqtt.clone(),
            layout: self.layout.clone(),
            metrics: self.metrics.clone(),
            received: status.received.unwrap_or(0),
            rejected: status.rejected.unwrap_or(0),
            last_received_time: status.last_received_time,
            last_error: None,
            pending: None,
            dirty: false,
            cancel: cancel.clone(),
            retry_at: None,
            retry_delay: WRITE_INTERVAL,
        };
        tokio::spawn(task.run(rx));
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key(&ns, &name), Running { generation, cancel });
        Ok(())
    }

    pub fn stop(&self, namespace: &str, name: &str) {
        if let Some(r) = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key(namespace, name))
        {
            r.cancel.cancel();
        }
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(route) = routes.mqtt.remove(&key(namespace, name))
            && let Some(client) = &self.mqtt
            && !routes.mqtt.values().any(|r| r.filter == route.filter)
        {
            let _ = client.try_unsubscribe(route.filter);
        }
        routes
            .http
            .retain(|(ns, _), r| !(ns == namespace && r.tx.is_closed()));
    }

    /// Hands an HTTP request body to the Subscriber serving `namespace`/`path`.
    pub async fn http_message(
        &self,
        namespace: &str,
        path: &str,
        bearer: Option<&str>,
        payload: Vec<u8>,
    ) -> Result<(), Rejection> {
        if !self.active.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Rejection::Standby);
        }
        let tx = {
            let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            let route = routes
                .http
                .get(&(namespace.to_string(), path.to_string()))
                .ok_or(Rejection::NotFound)?;
            if let Some(token) = &route.token
                && !bearer.is_some_and(|b| constant_time_eq(b.as_bytes(), token.as_bytes()))
            {
                return Err(Rejection::Unauthorized);
            }
            route.tx.clone()
        };
        let (reply, verdict) = oneshot::channel();
        tx.try_send(Inbound {
            payload,
            reply: Some(reply),
        })
        .map_err(|_| Rejection::Busy)?;
        verdict.await.unwrap_or(Err(Rejection::Busy))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_token(client: &Client, namespace: &str, secret: &str) -> Result<String, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let s = api
        .get(secret)
        .await
        .map_err(|e| format!("reading token Secret {secret}: {e}"))?;
    let token = s
        .data
        .and_then(|d| d.get("token").cloned())
        .ok_or_else(|| format!("token Secret {secret} has no key \"token\""))?;
    String::from_utf8(token.0)
        .map(|t| t.trim().to_string())
        .map_err(|_| format!("token in Secret {secret} is not UTF-8"))
}

/// Routes MQTT messages to Subscribers by topic filter. Runs on the event loop: never blocks.
struct MqttRouter {
    routes: Arc<Mutex<Routes>>,
}

impl Handler for MqttRouter {
    fn on_connected(&self, client: &AsyncClient) {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        for route in routes.mqtt.values() {
            if let Err(e) = client.try_subscribe(route.filter.clone(), route.qos) {
                tracing::warn!(filter = %route.filter, error = %e, "cannot queue subscription");
            }
        }
    }

    fn on_message(&self, _client: &AsyncClient, topic: &str, payload: &[u8]) {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        for (name, route) in &routes.mqtt {
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

struct WriteError {
    retryable: bool,
    message: String,
}

struct SubscriberTask {
    namespace: String,
    name: String,
    spec: SubscriberSpec,
    api: Api<Subscriber>,
    things: Api<Thing>,
    mqtt: Option<AsyncClient>,
    layout: Option<TopicLayout>,
    metrics: Arc<Metrics>,
    received: i64,
    rejected: i64,
    last_received_time: Option<chrono::DateTime<Utc>>,
    last_error: Option<String>,
    /// Merged, not yet written messages.
    pending: Option<Value>,
    dirty: bool,
    cancel: CancellationToken,
    retry_at: Option<tokio::time::Instant>,
    retry_delay: Duration,
}

impl SubscriberTask {
    fn max_bytes(&self) -> usize {
        self.spec
            .max_message_bytes
            .map(|b| b as usize)
            .unwrap_or(DEFAULT_MAX_MESSAGE)
    }

    fn accept(&mut self, msg: Inbound) {
        self.last_received_time = Some(Utc::now());
        let verdict = parse_message(&msg.payload, self.max_bytes()).map(|doc| {
            let mut placed = Value::Object(Default::default());
            set_pointer(
                &mut placed,
                self.spec.target.path.as_deref().unwrap_or(""),
                doc.into_value(),
            );
            merge(self.pending.get_or_insert_with(|| json!({})), &placed);
        });
        match &verdict {
            Ok(()) => {
                self.received += 1;
                self.metrics.count_event("Subscriber", "received");
            }
            Err(e) => {
                self.rejected += 1;
                self.last_error = Some(e.to_string());
                self.metrics.count_event("Subscriber", "rejected");
            }
        }
        self.dirty = true;
        if let Some(reply) = msg.reply {
            let _ = reply.send(verdict);
        }
    }

    /// Writes the merged pending messages into the target Thing. A retryable failure keeps
    /// them (merged under anything newer) and backs off; a permanent one drops them as
    /// rejected, so a misconfigured target never becomes a retry loop.
    async fn write(&mut self) {
        if self
            .retry_at
            .is_some_and(|at| tokio::time::Instant::now() < at)
        {
            return;
        }
        let Some(doc) = self.pending.take() else {
            return;
        };
        let target = self.spec.target.thing_name.clone();
        let result = match self.spec.target.field {
            TargetField::Desired => self
                .things
                .patch(
                    &target,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"desired": doc}})),
                )
                .await
                .map(|_| ())
                .map_err(|e| WriteError {
                    retryable: !matches!(&e, kube::Error::Api(s) if s.code == 400 || s.code == 422),
                    message: format!("writing desired state of Thing {target}: {e}"),
                }),
            TargetField::Reported => self.report(&target, &doc).await,
        };
        match result {
            Ok(()) => {
                self.retry_at = None;
                self.retry_delay = WRITE_INTERVAL;
            }
            Err(e) => {
                tracing::warn!(subscriber = %key(&self.namespace, &self.name), error = %e.message, retryable = e.retryable, "write failed");
                self.last_error = Some(e.message);
                self.dirty = true;
                if e.retryable {
                    let mut retry = doc;
                    if let Some(newer) = self.pending.take() {
                        merge(&mut retry, &newer);
                    }
                    self.pending = Some(retry);
                    self.retry_at = Some(tokio::time::Instant::now() + self.retry_delay);
                    self.retry_delay = (self.retry_delay * 2).min(Duration::from_secs(60));
                } else {
                    self.rejected += 1;
                }
            }
        }
    }

    /// Reported state goes through the device shadow, as a device's own report would, so the
    /// shadow stays the one source of reported state. Mosquitto Things only.
    async fn report(&self, target: &str, doc: &Value) -> Result<(), WriteError> {
        let thing = self.things.get(target).await.map_err(|e| WriteError {
            retryable: true,
            message: format!("reading Thing {target}: {e}"),
        })?;
        let permanent = |message: String| WriteError {
            retryable: false,
            message,
        };
        if thing.spec.broker != Broker::Mosquitto {
            return Err(permanent(format!(
                "target.field Reported needs a Mosquitto Thing; {target} is on {}",
                thing.spec.broker
            )));
        }
        let (Some(client), Some(layout)) = (&self.mqtt, &self.layout) else {
            return Err(permanent(
                "target.field Reported needs the operator's MQTT broker (--mqtt-url)".into(),
            ));
        };
        let topic = layout
            .thing(&self.namespace, target)
            .map_err(|e| permanent(e.to_string()))?;
        let payload = serde_json::to_vec(&json!({"state": {"reported": doc}}))
            .map_err(|e| permanent(e.to_string()))?;
        client
            .publish(
                format!("{}/update", topic.shadow_root()),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .map_err(|e| WriteError {
                retryable: true,
                message: format!("publishing to the shadow of {target}: {e}"),
            })
    }

    async fn flush_status(&mut self) {
        if !self.dirty {
            return;
        }
        let status = json!({
            "received": self.received,
            "rejected": self.rejected,
            "lastReceivedTime": self.last_received_time,
            "lastError": self.last_error,
        });
        if super::write_task_status(&self.api, &self.name, status, &self.metrics).await {
            self.dirty = false;
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Inbound>) {
        let mut write = tokio::time::interval(WRITE_INTERVAL);
        write.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status = tokio::time::interval(STATUS_INTERVAL);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(m) => self.accept(m),
                    None => break,
                },
                _ = write.tick() => self.write().await,
                _ = status.tick() => self.flush_status().await,
            }
        }
        // Deliver what is pending before going away (spec change or shutdown).
        while let Ok(m) = rx.try_recv() {
            self.accept(m);
        }
        self.write().await;
        self.flush_status().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_checked_before_anything_is_written() {
        assert!(parse_message(br#"{"temp": 21}"#, 100).is_ok());
        assert_eq!(parse_message(b"[1,2]", 100), Err(Rejection::NotObject));
        assert!(matches!(
            parse_message(b"{nope", 100),
            Err(Rejection::NotJson(_))
        ));
        assert_eq!(
            parse_message(&[b' '; 101], 100),
            Err(Rejection::TooLarge(101, 100))
        );
        let deep = br#"{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}"#;
        assert!(matches!(
            parse_message(deep, 1000),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn merge_follows_rfc7386() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge(&mut t, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
        assert_eq!(t, json!({"b": {"c": 5, "d": 3}, "e": [1]}));
    }

    #[test]
    fn token_comparison_needs_exact_match() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
