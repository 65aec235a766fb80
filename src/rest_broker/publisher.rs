//! Publishes every Thing's state, retained, on `{thing topic}/state`, whatever its backend: an
//! MQTT client that subscribes there gets the current state at once and every change after.
//!
//! Created by the runner when an MQTT broker is configured and fed through the runner's
//! `StateFeed` after each status write. Publishing never blocks a reconcile: it queues on the
//! MQTT client, and drops (with a log line) when the queue is full; the next change or
//! resync publishes the latest state again, which is all a retained state topic needs.

use std::{collections::HashMap, sync::Mutex};

use kube::ResourceExt;
use rumqttc::{AsyncClient, QoS};
use serde_json::{Value, json};

use crate::api::{Thing, ThingStatus, conditions::types};
use crate::mqtt::topic::TopicLayout;

pub struct StatePublisher {
    client: AsyncClient,
    layout: TopicLayout,
    inner: Mutex<Docs>,
}

#[derive(Default)]
struct Docs {
    /// Latest document per Thing topic and whether it went out: an unchanged state is not sent
    /// again, and everything is sent again when the connection comes back (a broker without
    /// persistence forgets retained messages on restart).
    latest: HashMap<String, (Vec<u8>, bool)>,
    /// False until the broker confirmed the operator may publish; documents wait meanwhile.
    online: bool,
}

/// The state document of a Thing (no secrets: spec.desired and status fields only).
pub fn state_document(thing: &Thing, status: &ThingStatus) -> Value {
    let ns = thing.namespace().unwrap_or_default();
    let name = thing.name_any();
    json!({
        "apiVersion": format!("{}/{}", crate::api::GROUP, crate::api::VERSION),
        "kind": "Thing",
        "namespace": ns,
        "name": name,
        "url": crate::api::thing_url(&ns, &name),
        "broker": thing.spec.broker,
        "ready": status.conditions.is_true(types::READY),
        "desired": thing.spec.desired,
        "reported": status.reported,
        "delta": status.delta,
        "version": status.version,
        "lastReportedTime": status.last_reported_time,
    })
}

impl StatePublisher {
    pub fn new(client: AsyncClient, layout: TopicLayout) -> Self {
        Self {
            client,
            layout,
            inner: Mutex::new(Docs::default()),
        }
    }

    /// Publishes the Thing's state unless this exact document already went out.
    pub fn publish(&self, thing: &Thing, status: &ThingStatus) {
        let ns = thing.namespace().unwrap_or_default();
        let Ok(topic) = self.layout.thing(&ns, &thing.name_any()) else {
            return;
        };
        let topic = topic.state();
        let Ok(payload) = serde_json::to_vec(&state_document(thing, status)) else {
            return;
        };
        let mut docs = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if docs
            .latest
            .get(&topic)
            .is_some_and(|(p, sent)| *sent && *p == payload)
        {
            return;
        }
        let sent = docs.online && self.send(&topic, &payload);
        docs.latest.insert(topic, (payload, sent));
    }

    fn send(&self, topic: &str, payload: &[u8]) -> bool {
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
        {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(%topic, error = %e, "state not published (queue full); the next change retries");
                false
            }
        }
    }

    /// Whether the publisher may publish (the connection is up and authorized); going online
    /// sends every Thing's latest state again.
    pub fn set_online(&self, online: bool) {
        let mut docs = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        docs.online = online;
        if online {
            let pending: Vec<(String, Vec<u8>)> = docs
                .latest
                .iter()
                .map(|(t, (p, _))| (t.clone(), p.clone()))
                .collect();
            for (topic, payload) in pending {
                let sent = self.send(&topic, &payload);
                docs.latest.insert(topic, (payload, sent));
            }
        }
    }

    /// Removes a deleted Thing's retained state.
    pub fn clear(&self, namespace: &str, name: &str) {
        let Ok(topic) = self.layout.thing(namespace, name) else {
            return;
        };
        let topic = topic.state();
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .latest
            .remove(&topic);
        // An empty retained message deletes the retained state.
        let _ = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, Vec::new());
    }
}
