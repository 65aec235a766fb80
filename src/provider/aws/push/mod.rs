//! The AWS push channel: one MQTT connection from the operator to the account's AWS IoT data
//! endpoint, under the operator's own certificate and policy ([`identity`]), subscribed to the
//! shadow documents topics of every thing ([`documents::FILTERS`]). Each documents message for
//! a Thing this operator manages goes to the Observers at once (the [`StateFeed`]) and asks for a
//! reconcile, paced per Thing by the status interval and fleet-wide by the write budget; that
//! reconcile copies the pushed document into status without reading the shadow.
//!
//! Polling is the fallback: while the channel is down (or before a Thing was read once since it
//! came up) a Thing is read every poll interval as before; while it is up, only every drift
//! interval. When the channel goes down every managed Thing is asked to reconcile, so the poll
//! takes over at once instead of after a drift interval. The connection state is the gauge
//! `thing_operator_mqtt_connected{connection="aws-push"}` and a log line on each change;
//! reconnects back off (1 s doubling to 60 s, with jitter).

pub mod documents;
pub mod identity;
mod session;

pub use self::session::start;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::Utc;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::Value;

use self::{
    documents::{Offer, Store},
    identity::IdentitySettings,
};
use super::AwsError;
use crate::{
    api::{
        JsonObject, ThingUpdate,
        update::{Documents, Subject},
    },
    feed::StateFeed,
    mqtt::connection::BrokerAddress,
    provider::ThingKey,
};

/// Why the channel is down. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("push identity Secret {name}: {message}")]
    Secret { name: String, message: String },
    #[error("push identity Secret is incomplete")]
    Incomplete,
    #[error("generating the push channel key: {0}")]
    Key(String),
    #[error("not an AWS ARN: {0}")]
    Arn(String),
    #[error("push channel endpoint: {0}")]
    Endpoint(String),
    #[error("push channel TLS settings: {0}")]
    Tls(String),
    #[error("MQTT connection: {0}")]
    Connection(String),
    #[error("the endpoint refused the documents subscriptions")]
    SubscriptionRefused,
    #[error("reconnecting with a new certificate")]
    Rotated,
}

/// How the channel is started (the runner builds it from flags).
pub struct PushSettings {
    /// `--aws-push-url`; default: the device endpoint (`--aws-device-endpoint`, else
    /// DescribeEndpoint `iot:Data-ATS`).
    pub address: Option<BrokerAddress>,
    /// CA bundle (PEM) for the endpoint; default: Amazon Root CA 1 and 3.
    pub ca_pem: Option<Vec<u8>>,
    pub identity: IdentitySettings,
    /// Reconciles a push asks for, at most one per Thing per this interval.
    pub status_interval: Duration,
    /// How often the identity is checked for rotation (and drift) while connected.
    pub identity_check: Duration,
}

/// Per-Thing pacing of reconcile requests.
#[derive(Default)]
struct Pacing {
    last: Option<Instant>,
    scheduled: bool,
}

/// The channel's shared state: what the reconciles ask and what the connection feeds.
pub struct PushChannel {
    store: Mutex<Store>,
    pacing: Mutex<HashMap<ThingKey, Pacing>>,
    /// Thing names the operator policy lets the channel receive (a prefix; empty: all).
    name_scope: String,
    drift_interval: Duration,
}

impl PushChannel {
    pub fn new(name_scope: String, drift_interval: Duration) -> Self {
        Self {
            store: Mutex::default(),
            pacing: Mutex::default(),
            name_scope,
            drift_interval,
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The prefix thing names need for the channel to receive their documents.
    pub fn name_scope(&self) -> &str {
        &self.name_scope
    }

    /// Remembers a Thing this operator manages (each reconcile calls it). Names outside the
    /// policy's scope (an explicit `spec.thingName` without the cluster prefix) are not
    /// tracked: their documents never arrive, so they are always polled.
    pub fn track(
        &self,
        thing_name: &str,
        key: &ThingKey,
        labels: &BTreeMap<String, String>,
        shadow: Option<&str>,
    ) {
        if thing_name.starts_with(&self.name_scope) {
            self.store().track(thing_name, key, labels, shadow);
        }
    }

    pub fn forget(&self, thing_name: &str, key: &ThingKey) {
        self.store().forget(thing_name);
        self.pacing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// The pushed document that stands in for a shadow read now, if any.
    pub fn document(&self, thing_name: &str, shadow: Option<&str>) -> Option<Value> {
        self.store()
            .document(thing_name, shadow, self.drift_interval, Instant::now())
    }

    /// Whether the channel delivers this Thing's state now (its reads may wait the drift
    /// interval).
    pub fn covers(&self, thing_name: &str, shadow: Option<&str>) -> bool {
        self.store()
            .covers(thing_name, shadow, self.drift_interval, Instant::now())
    }

    /// Whether the connection is up (documents arrive; a Thing it does not cover yet needs a
    /// read to be covered).
    pub fn is_up(&self) -> bool {
        self.store().is_up()
    }

    pub fn drift_interval(&self) -> Duration {
        self.drift_interval
    }

    /// A shadow read (`document`: what it returned) happened just now.
    pub fn record_read(&self, thing_name: &str, document: Option<&Value>) {
        self.store()
            .record_read(thing_name, document, Instant::now());
    }

    fn set_up(&self, up: bool, gauge: &Gauge, feed: &Arc<dyn StateFeed>) {
        let (was_up, keys) = {
            let mut store = self.store();
            let was_up = store.is_up();
            store.set_up(up);
            (was_up, store.keys())
        };
        gauge.set(i64::from(up));
        if up && !was_up {
            tracing::info!("AWS push channel up: reported state arrives as it changes");
        }
        if !up && was_up {
            tracing::warn!(
                things = keys.len(),
                "AWS push channel down: polling every managed Thing until it is back"
            );
            // Each requeued itself for the drift interval: make the poll take over now.
            for key in keys {
                feed.request_reconcile(&key.namespace, &key.name);
            }
        }
    }

    /// A documents message arrived.
    fn handle(
        self: &Arc<Self>,
        topic: &str,
        payload: &[u8],
        feed: &Arc<dyn StateFeed>,
        interval: Duration,
    ) {
        let Some(parsed) = documents::parse_topic(topic) else {
            tracing::debug!(%topic, "unexpected message ignored");
            return;
        };
        // Without a cluster id the policy lets every thing's documents in: drop the ones of
        // other things before their payload costs a parse.
        if !self.store().manages(&parsed) {
            return;
        }
        let document = match documents::shadow_document(payload) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(thing = parsed.thing_name, error = %e, "documents message ignored");
                return;
            }
        };
        let offer = self.store().offer(&parsed, document);
        let Offer::Accepted {
            key,
            labels,
            document,
        } = offer
        else {
            return;
        };
        let section = |name: &str| {
            document
                .get("state")
                .and_then(|s| s.get(name))
                .and_then(Value::as_object)
                .map(|m| JsonObject(m.clone()))
        };
        feed.device_state(ThingUpdate::new(
            Subject {
                namespace: &key.namespace,
                name: &key.name,
                labels: &labels,
            },
            Documents {
                desired: section("desired"),
                reported: section("reported"),
                delta: section("delta"),
            },
            document.get("version").and_then(Value::as_i64),
            Utc::now(),
        ));
        self.pace(key, feed, interval);
    }

    /// Requests a reconcile of `key` at most once per `interval`: a report within the interval
    /// schedules one request at its end, and the reconcile then takes the newest document.
    fn pace(self: &Arc<Self>, key: ThingKey, feed: &Arc<dyn StateFeed>, interval: Duration) {
        let now = Instant::now();
        let mut pacing = self.pacing.lock().unwrap_or_else(|p| p.into_inner());
        let p = pacing.entry(key.clone()).or_default();
        if p.scheduled {
            return;
        }
        match p.last {
            Some(last) if now.duration_since(last) < interval => {
                p.scheduled = true;
                let wait = interval - now.duration_since(last);
                let feed = feed.clone();
                let this = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let mut pacing = this.pacing.lock().unwrap_or_else(|p| p.into_inner());
                    // Forgotten meanwhile: the Thing is gone.
                    if let Some(p) = pacing.get_mut(&key) {
                        p.scheduled = false;
                        p.last = Some(Instant::now());
                        feed.request_reconcile(&key.namespace, &key.name);
                    }
                });
            }
            _ => {
                p.last = Some(now);
                feed.request_reconcile(&key.namespace, &key.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_the_policy_scope_are_never_covered() {
        let channel = PushChannel::new("c1:".into(), Duration::from_secs(3600));
        let key = ThingKey::new("ns", "lamp");
        let labels = BTreeMap::new();
        channel.store().set_up(true);
        // An explicit thingName without the cluster prefix: AWS would never deliver its
        // documents to the channel, so it must keep being polled.
        channel.track("shared-lamp-7", &key, &labels, None);
        channel.record_read("shared-lamp-7", None);
        assert!(!channel.covers("shared-lamp-7", None));
        channel.track("c1:ns_lamp", &key, &labels, None);
        channel.record_read("c1:ns_lamp", None);
        assert!(channel.covers("c1:ns_lamp", None));
        channel.forget("c1:ns_lamp", &key);
        assert!(!channel.covers("c1:ns_lamp", None));
    }
}
