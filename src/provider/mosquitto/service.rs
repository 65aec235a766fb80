//! The shadow service: device shadow requests over MQTT, answered from the in-memory shadows
//! ([`super::registry`]), and the pacing of status writes.
//!
//! Every accepted report updates memory at once. The Thing's status only follows through a
//! reconcile, which this module requests at most once per `status_interval` per Thing, and
//! which copies a *snapshot* taken when the request fired: reconciles caused by anything else
//! (our own status write echoing back through the watch, resyncs) copy the same snapshot and so
//! write nothing. That is what keeps status writes at the bound during a telemetry storm.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use rumqttc::{AsyncClient, QoS};
use serde_json::Value;

use super::{
    dynsec::{Dynsec, RESPONSE_TOPIC},
    registry::{SharedRegistry, TrackedThing},
    shadow::Limits,
};
use crate::{
    feed::StateFeed,
    mqtt::{
        connection::Handler,
        topic::{ShadowOp, ShadowReply, ShadowRequest, TopicLayout},
    },
    provider::ThingKey,
};

pub struct Service {
    pub layout: TopicLayout,
    pub limits: Limits,
    pub status_interval: Duration,
    pub registry: SharedRegistry,
    pub feed: Arc<dyn StateFeed>,
    pub dynsec: Arc<Dynsec>,
    /// Run after every (re)connect once active, e.g. granting the operator its own ACLs.
    pub on_connect: Box<dyn Fn() + Send + Sync>,
    /// Whether this replica serves shadow requests. Off until this replica starts reconciling:
    /// with leader election only the leader reconciles, and two replicas answering the same
    /// device would keep two diverging versions of its shadow.
    pub active: AtomicBool,
    pub client: AsyncClient,
}

/// Requests a reconcile for a Thing that got a report, at most once per `interval`.
fn pace(
    registry: &SharedRegistry,
    key: &ThingKey,
    thing: &mut TrackedThing,
    interval: Duration,
    feed: &Arc<dyn StateFeed>,
) {
    if thing.pacing.scheduled {
        return;
    }
    let now = Instant::now();
    match thing.pacing.last_request {
        Some(last) if now.duration_since(last) < interval => {
            thing.pacing.scheduled = true;
            let wait = interval - now.duration_since(last);
            let (registry, key, feed) = (registry.clone(), key.clone(), feed.clone());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let mut guard = registry.lock();
                // The Thing may have been deleted meanwhile.
                if let Some(t) = guard.get_mut(&key) {
                    t.pacing.scheduled = false;
                    t.pacing.last_request = Some(Instant::now());
                    t.refresh_snapshot();
                    feed.request_reconcile(&key.namespace, &key.name);
                }
            });
        }
        _ => {
            thing.pacing.last_request = Some(now);
            thing.refresh_snapshot();
            feed.request_reconcile(&key.namespace, &key.name);
        }
    }
}

impl Service {
    /// Replies go out at QoS 0: they answer a request the device can repeat, and halving the
    /// acknowledgement traffic matters under a storm. Deltas (from spec changes) stay QoS 1.
    fn reply(client: &AsyncClient, topic: String, payload: &Value) {
        Self::reply_encoded(
            client,
            topic,
            serde_json::to_vec(payload).unwrap_or_default(),
        );
    }

    fn reply_encoded(client: &AsyncClient, topic: String, payload: Vec<u8>) {
        if let Err(e) = client.try_publish(topic, QoS::AtMostOnce, false, payload) {
            tracing::debug!(error = %e, "shadow reply dropped: publish queue full");
        }
    }

    fn handle_request(&self, client: &AsyncClient, req: ShadowRequest, payload: &[u8]) {
        let now = Utc::now();
        let mut registry = self.registry.lock();
        let Some(key) = registry.resolve(&req.target) else {
            // Not one of this operator's Things (another operator on the same broker may own it).
            tracing::debug!(root = %req.shadow_root, "shadow request for an unknown Thing ignored");
            return;
        };
        let Some(thing) = registry.get_mut(&key) else {
            return;
        };
        match req.op {
            ShadowOp::Update => match thing.shadow.update(payload, &self.limits, now) {
                Ok(acc) => {
                    Self::reply(
                        client,
                        req.reply_topic(ShadowReply::Accepted),
                        &acc.accepted,
                    );
                    Self::reply_encoded(
                        client,
                        req.reply_topic(ShadowReply::Documents),
                        acc.documents,
                    );
                    // Fresh state to the feed at once, while status writes stay paced.
                    self.feed.device_state(thing.state_update(&key, now));
                    pace(
                        &self.registry,
                        &key,
                        thing,
                        self.status_interval,
                        &self.feed,
                    );
                }
                Err(rej) => {
                    tracing::debug!(thing = %key, code = rej.code, reason = %rej.message, "shadow update rejected");
                    Self::reply(
                        client,
                        req.reply_topic(ShadowReply::Rejected),
                        &rej.document(now),
                    );
                }
            },
            ShadowOp::Get => match thing.shadow.get(payload, &self.limits, now) {
                Ok(doc) => Self::reply(client, req.reply_topic(ShadowReply::Accepted), &doc),
                Err(rej) => Self::reply(
                    client,
                    req.reply_topic(ShadowReply::Rejected),
                    &rej.document(now),
                ),
            },
        }
    }
}

impl Service {
    fn subscribe_requests(&self, client: &AsyncClient) {
        for f in self.layout.service_filters() {
            if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                tracing::warn!(filter = %f, error = %e, "cannot queue subscription");
            }
        }
        (self.on_connect)();
    }

    /// Starts serving shadow requests (idempotent). Called by every reconcile.
    pub fn activate(&self) {
        if !self.active.swap(true, Ordering::SeqCst) {
            tracing::info!("shadow service active");
            self.subscribe_requests(&self.client);
        }
    }
}

impl Handler for Service {
    fn on_connected(&self, client: &AsyncClient) {
        self.dynsec.fail_pending();
        if let Err(e) = client.try_subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce) {
            tracing::warn!(error = %e, "cannot queue the dynsec response subscription");
        }
        if self.active.load(Ordering::SeqCst) {
            self.subscribe_requests(client);
        }
    }

    fn on_message(&self, client: &AsyncClient, topic: &str, payload: &[u8]) {
        if topic == RESPONSE_TOPIC {
            self.dynsec.handle_response(payload);
            return;
        }
        match self.layout.parse_shadow_request(topic) {
            Some(req) => self.handle_request(client, req, payload),
            None => tracing::debug!(%topic, "unexpected message ignored"),
        }
    }
}
