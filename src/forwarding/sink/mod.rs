//! Where an Observer sends what passes its filter: an MQTT topic or an HTTP endpoint (as a
//! CloudEvent), or another Thing's desired state. Built once per task from the spec (reading
//! what the spec refers to, such as a header Secret), then used for every delivery.

mod http;

use std::sync::Arc;

use kube::{Api, Client};
use rumqttc::{AsyncClient, QoS};
use serde_json::Value;

use super::{
    DeliveryError,
    broker_connections::BrokerConnections,
    cloud_event::cloud_event,
    desired::{merge_into_desired, refused},
    json::set_pointer,
    mqtt::{AccessError, MqttAccess, NamespaceConnection, qos},
    provenance::{LoopStop, Provenance, ProvenanceBook},
    publish_tracker::PublishTracker,
};
use crate::{
    api::{Thing, ThingUpdate, observer::SinkSpec, observer::StateSection},
    egress::EgressPolicy,
};

pub use http::HttpEndpoint;

/// How long a publish may wait for the broker's acknowledgement before it is tried again.
const BROKER_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub enum Sink {
    Mqtt {
        /// The namespace's connection, held for as long as the sink exists (it stays open);
        /// its tracker says when the broker has a publish (the delivery counts only then).
        connection: NamespaceConnection,
        topic: String,
        qos: QoS,
        retain: bool,
    },
    /// A topic on a broker a BrokerConnection names: its session is looked up at each
    /// delivery, so a reconnect with new settings (a new session) is used at once.
    Connection {
        connections: BrokerConnections,
        namespace: String,
        connection: String,
        topic: String,
        qos: QoS,
        retain: bool,
    },
    Http(HttpEndpoint),
    Thing(Box<ThingTarget>),
}

/// Another Thing's desired state, as a sink.
pub struct ThingTarget {
    api: Api<Thing>,
    namespace: String,
    name: String,
    path: Option<String>,
    /// Where the write's provenance is recorded, so the target's next update continues the
    /// chain.
    book: ProvenanceBook,
}

impl Sink {
    /// Builds the sink of `spec` for an Observer in `namespace`; an MQTT sink publishes with the
    /// connection that acts for that namespace; `egress` says where an HTTP sink may connect.
    pub async fn build(
        spec: &SinkSpec,
        namespace: &str,
        client: &Client,
        mqtt: &MqttAccess,
        connections: &BrokerConnections,
        egress: &Arc<EgressPolicy>,
        book: &ProvenanceBook,
    ) -> Result<Sink, DeliveryError> {
        if let Some(m) = &spec.mqtt
            && let Some(connection) = &m.connection
        {
            return Ok(Sink::Connection {
                connections: connections.clone(),
                namespace: namespace.to_string(),
                connection: connection.clone(),
                topic: m.topic.clone(),
                qos: qos(m.qos),
                retain: m.retain,
            });
        }
        if let Some(m) = &spec.mqtt {
            let connection = match mqtt.connection_for(namespace).await {
                Ok(connection) => connection,
                Err(e @ AccessError::NotConfigured) => {
                    return Err(DeliveryError::permanent(format!("sink.mqtt: {e}")));
                }
                // The account may be made later (the backend is still starting, the broker is
                // unreachable): retried with backoff.
                Err(e) => return Err(DeliveryError::retryable(format!("sink.mqtt: {e}"))),
            };
            return Ok(Sink::Mqtt {
                connection,
                topic: m.topic.clone(),
                qos: qos(m.qos),
                retain: m.retain,
            });
        }
        if let Some(h) = &spec.http {
            return Ok(Sink::Http(
                HttpEndpoint::build(h, namespace, client, egress).await?,
            ));
        }
        if let Some(t) = &spec.thing {
            return Ok(Sink::Thing(Box::new(ThingTarget {
                api: Api::namespaced(client.clone(), namespace),
                namespace: namespace.to_string(),
                name: t.name.clone(),
                path: t.path.clone(),
                book: book.clone(),
            })));
        }
        Err(DeliveryError::permanent("no sink set"))
    }

    /// The sink's kind, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Mqtt { .. } | Sink::Connection { .. } => "mqtt",
            Sink::Http(_) => "http",
            Sink::Thing(_) => "thing",
        }
    }

    /// The provenance of an event with `provenance` after it passed this sink: one hop
    /// further; `Err` when that closes a loop (back into its origin Thing) or makes the chain
    /// too long. The event is then dropped, not delivered.
    pub fn hop(&self, provenance: &Provenance) -> Result<Provenance, LoopStop> {
        match self {
            Sink::Thing(target) => {
                provenance.into_thing(&target.book.place().key(&target.namespace, &target.name))
            }
            Sink::Mqtt { .. } | Sink::Connection { .. } | Sink::Http(_) => provenance.next(),
        }
    }

    /// Publishes or POSTs one CloudEvent (MQTT and HTTP sinks; a `thing` sink takes no events).
    pub async fn deliver_event(&self, event: &Value) -> Result<(), DeliveryError> {
        match self {
            Sink::Mqtt {
                connection,
                topic,
                qos,
                retain,
            } => {
                publish_acknowledged(
                    &connection.client,
                    &connection.publishes,
                    topic,
                    *qos,
                    *retain,
                    event,
                )
                .await
            }
            Sink::Connection {
                connections,
                namespace,
                connection,
                topic,
                qos,
                retain,
            } => {
                let Some(session) = connections.connection(namespace, connection) else {
                    // It may come (the BrokerConnection is created later, or its Secret).
                    return Err(DeliveryError::retryable(format!(
                        "BrokerConnection {connection} has no session (missing, invalid or refused)"
                    )));
                };
                publish_acknowledged(
                    &session.client,
                    &session.publishes,
                    topic,
                    *qos,
                    *retain,
                    event,
                )
                .await
            }
            Sink::Http(endpoint) => endpoint.post(event).await,
            Sink::Thing(_) => Err(DeliveryError::permanent(
                "a thing sink takes state, not events",
            )),
        }
    }

    /// Delivers one update, as `provenance` (from [`Sink::hop`]). At-least-once: the caller
    /// retries retryable errors.
    pub async fn deliver(
        &self,
        update: &ThingUpdate,
        section: StateSection,
        data: &Value,
        provenance: &Provenance,
    ) -> Result<(), DeliveryError> {
        match self {
            Sink::Mqtt { .. } | Sink::Connection { .. } | Sink::Http(_) => {
                self.deliver_event(&cloud_event(update, section, data, provenance))
                    .await
            }
            Sink::Thing(target) => {
                let ThingTarget {
                    api,
                    namespace,
                    name,
                    path,
                    book,
                } = target.as_ref();
                let mut desired = Value::Object(Default::default());
                set_pointer(&mut desired, path.as_deref().unwrap_or(""), data.clone());
                if !desired.is_object() {
                    return Err(DeliveryError::permanent(
                        "sink.thing without path needs an object to merge",
                    ));
                }
                let written =
                    merge_into_desired(api, name, desired)
                        .await
                        .map_err(|e| match &e {
                            kube::Error::Api(s) if s.code == 404 => {
                                // The target may be created later: keep trying within the attempts.
                                DeliveryError::retryable(format!("target Thing {name} not found"))
                            }
                            kube::Error::Api(s) if refused(&e) => DeliveryError::permanent(
                                format!("target Thing {name} refused the update: {}", s.message),
                            ),
                            _ => DeliveryError::retryable(format!("patching Thing {name}: {e}")),
                        })?;
                book.record(namespace, name, provenance.clone(), written);
                Ok(())
            }
        }
    }
}

/// Publishes `event` and waits for the broker's acknowledgement (QoS 1/2): the delivery counts
/// only then. A broker that does not answer in time gets the update again (at-least-once).
async fn publish_acknowledged(
    client: &AsyncClient,
    publishes: &PublishTracker,
    topic: &str,
    qos: QoS,
    retain: bool,
    event: &Value,
) -> Result<(), DeliveryError> {
    let payload = serde_json::to_vec(event)
        .map_err(|e| DeliveryError::permanent(format!("encoding: {e}")))?;
    let acknowledged = publishes
        .publish(client, topic.to_string(), qos, retain, payload)
        .await
        .map_err(|e| DeliveryError::retryable(format!("MQTT publish to {topic}: {e}")))?;
    match tokio::time::timeout(BROKER_ACK_WAIT, acknowledged).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(DeliveryError::retryable(format!(
            "MQTT publish to {topic}: not acknowledged by the broker within {BROKER_ACK_WAIT:?}"
        ))),
    }
}
