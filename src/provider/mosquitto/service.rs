//! The shadow service: the in-memory shadows of this operator's Mosquitto Things, the MQTT
//! request handling, and the pacing of status writes.
//!
//! Every accepted report updates memory at once. The Thing's status only follows through a
//! reconcile, which this module requests at most once per `status_interval` per Thing, and
//! which copies a *snapshot* taken when the request fired: reconciles caused by anything else
//! (our own status write echoing back through the watch, resyncs) copy the same snapshot and so
//! write nothing. That is what keeps status writes at the bound during a telemetry storm.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rumqttc::{AsyncClient, QoS};
use serde_json::{Map, Value};

use super::{
    dynsec::{Dynsec, RESPONSE_TOPIC},
    shadow::{Limits, Shadow},
};
use crate::mqtt::connection::Handler;
use crate::{
    api::ThingUpdate,
    feed::StateFeed,
    mqtt::topic::{ShadowOp, ShadowReply, ShadowRequest, ShadowTarget, TopicLayout},
};

/// Hands a device's fresh state to the feed at once, while status writes stay paced.
fn publish_state(feed: &dyn StateFeed, key: &Key, entry: &Entry, now: DateTime<Utc>) {
    let shadow = &entry.shadow;
    let object = |m: Map<String, Value>| (!m.is_empty()).then_some(crate::api::JsonObject(m));
    feed.device_state(ThingUpdate {
        namespace: key.0.clone(),
        name: key.1.clone(),
        labels: entry.labels.clone(),
        desired: object(shadow.desired().clone()),
        reported: object(shadow.reported().clone()),
        delta: object(shadow.delta()),
        version: Some(shadow.version()),
        time: now,
    });
}

/// `(namespace, name)` of a Thing.
pub type Key = (String, String);

/// What the Thing's status shows of its shadow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub reported: Map<String, Value>,
    pub delta: Map<String, Value>,
    pub version: i64,
    pub last_reported: Option<DateTime<Utc>>,
}

impl Snapshot {
    fn of(shadow: &Shadow) -> Self {
        Self {
            reported: shadow.reported().clone(),
            delta: shadow.delta(),
            version: shadow.version(),
            last_reported: shadow.last_reported(),
        }
    }
}

pub struct Entry {
    pub uid: String,
    /// The Thing's labels, for the state bus (Observers select by label).
    pub labels: std::collections::BTreeMap<String, String>,
    pub thing_name: String,
    pub shadow: Shadow,
    pub snapshot: Snapshot,
    last_trigger: Option<Instant>,
    scheduled: bool,
    /// When the broker client, role and Secret were last checked, and for which
    /// (generation, secret name): skipping that work on storm-driven reconciles keeps them cheap.
    pub verified: Option<(Option<i64>, String, Instant)>,
}

impl Entry {
    pub fn new(uid: String, thing_name: String, shadow: Shadow) -> Self {
        let snapshot = Snapshot::of(&shadow);
        Self {
            uid,
            labels: Default::default(),
            thing_name,
            shadow,
            snapshot,
            last_trigger: None,
            scheduled: false,
            verified: None,
        }
    }

    /// Takes a new snapshot now (a spec change: not paced, it happens once per edit).
    pub fn refresh_snapshot(&mut self) {
        self.snapshot = Snapshot::of(&self.shadow);
    }
}

#[derive(Default)]
pub struct Things {
    pub by_key: HashMap<Key, Entry>,
    pub by_name: HashMap<String, Key>,
}

impl Things {
    pub fn remove(&mut self, key: &Key) {
        if let Some(e) = self.by_key.remove(key)
            && self.by_name.get(&e.thing_name) == Some(key)
        {
            self.by_name.remove(&e.thing_name);
        }
    }
}

/// Counters of the shadow service (for logs and the benchmark).
#[derive(Default)]
pub struct Stats {
    pub accepted: std::sync::atomic::AtomicU64,
    pub rejected: std::sync::atomic::AtomicU64,
}

pub struct Service {
    pub layout: TopicLayout,
    pub limits: Limits,
    pub status_interval: Duration,
    pub things: Arc<Mutex<Things>>,
    pub feed: Arc<dyn StateFeed>,
    pub dynsec: Arc<Dynsec>,
    pub stats: Stats,
    /// Run after every (re)connect once active, e.g. granting the operator its own ACLs.
    pub on_connect: Box<dyn Fn() + Send + Sync>,
    /// Whether this replica serves shadow requests. Off until the first reconcile: with leader
    /// election only the leader reconciles, and two replicas answering the same device would
    /// keep two diverging versions of its shadow.
    pub active: std::sync::atomic::AtomicBool,
    pub client: AsyncClient,
}

fn lock(things: &Mutex<Things>) -> MutexGuard<'_, Things> {
    things.lock().unwrap_or_else(|p| p.into_inner())
}

/// Requests a reconcile for a Thing that got a report, at most once per `interval`.
fn pace(
    things: &Arc<Mutex<Things>>,
    key: &Key,
    entry: &mut Entry,
    interval: Duration,
    feed: &Arc<dyn StateFeed>,
) {
    if entry.scheduled {
        return;
    }
    let now = Instant::now();
    match entry.last_trigger {
        Some(last) if now.duration_since(last) < interval => {
            entry.scheduled = true;
            let wait = interval - now.duration_since(last);
            let (things, key, feed) = (things.clone(), key.clone(), feed.clone());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let mut guard = lock(&things);
                // The Thing may have been deleted meanwhile.
                if let Some(e) = guard.by_key.get_mut(&key) {
                    e.scheduled = false;
                    e.last_trigger = Some(Instant::now());
                    e.refresh_snapshot();
                    feed.request_reconcile(&key.0, &key.1);
                }
            });
        }
        _ => {
            entry.last_trigger = Some(now);
            entry.refresh_snapshot();
            feed.request_reconcile(&key.0, &key.1);
        }
    }
}

impl Service {
    fn resolve(&self, things: &Things, req: &ShadowRequest) -> Option<Key> {
        match &req.target {
            ShadowTarget::Path { namespace, name } => {
                let key = (namespace.clone(), name.clone());
                things.by_key.contains_key(&key).then_some(key)
            }
            ShadowTarget::AwsName(n) => things.by_name.get(n).cloned(),
        }
    }

    /// Replies go out at QoS 0: they answer a request the device can repeat, and halving the
    /// acknowledgement traffic matters under a storm. Deltas (from spec changes) stay QoS 1.
    fn reply(client: &AsyncClient, topic: String, payload: &Value) {
        if let Err(e) = client.try_publish(
            topic,
            QoS::AtMostOnce,
            false,
            payload.to_string().into_bytes(),
        ) {
            tracing::debug!(error = %e, "shadow reply dropped: publish queue full");
        }
    }

    fn handle_request(&self, client: &AsyncClient, req: ShadowRequest, payload: &[u8]) {
        let now = Utc::now();
        let mut guard = lock(&self.things);
        let Some(key) = self.resolve(&guard, &req) else {
            // Not one of this operator's Things (another operator on the same broker may own it).
            tracing::debug!(root = %req.shadow_root, "shadow request for an unknown Thing ignored");
            return;
        };
        let Some(entry) = guard.by_key.get_mut(&key) else {
            return;
        };
        match req.op {
            ShadowOp::Update => match entry.shadow.update(payload, &self.limits, now) {
                Ok(acc) => {
                    self.stats
                        .accepted
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Self::reply(
                        client,
                        req.reply_topic(ShadowReply::Accepted),
                        &acc.accepted,
                    );
                    Self::reply(
                        client,
                        req.reply_topic(ShadowReply::Documents),
                        &acc.documents,
                    );
                    publish_state(self.feed.as_ref(), &key, entry, now);
                    pace(&self.things, &key, entry, self.status_interval, &self.feed);
                }
                Err(rej) => {
                    self.stats
                        .rejected
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(thing = %format!("{}/{}", key.0, key.1), code = rej.code, reason = %rej.message, "shadow update rejected");
                    Self::reply(
                        client,
                        req.reply_topic(ShadowReply::Rejected),
                        &rej.document(now),
                    );
                }
            },
            ShadowOp::Get => match entry.shadow.get(payload, &self.limits, now) {
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
        if !self.active.swap(true, std::sync::atomic::Ordering::SeqCst) {
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
        if self.active.load(std::sync::atomic::Ordering::SeqCst) {
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
