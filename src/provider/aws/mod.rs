//! AWS IoT Core backend: a thing per `Thing`, a least-privilege policy, a certificate whose key
//! stays in the cluster (or a CloudIssued one), the device Secret, shadow sync, drift repair,
//! rotation and ordered teardown.
//!
//! Modules: [`client`] (SDK clients, rate limits, retries), [`error`] (what a failure is and
//! whether a retry may help), [`naming`] (names and the policy document), [`provision`] (thing,
//! policy, attachments), [`certs`] (issuance, rotation, orphan sweep), [`shadow`]
//! (desired/reported sync), [`push`] (the push channel: reported state over MQTT as it
//! changes), [`teardown`] (deletion order), `reconcile` (the steps of a reconcile and a cleanup).
//! This file holds the provider itself and when a full check runs.
//!
//! Cost model: a full check (every resource described, drift repaired) runs when the spec or the
//! rotate annotation changed, when a condition is not True, when a rotation or revocation is due,
//! and otherwise once per resync interval; between full checks a reconcile is one shadow read,
//! except that a reconcile within half a poll interval of the last read, unless the spec
//! changed or the push channel is up, copies that read's document (the ones the operator's own Secret and status writes
//! trigger cost nothing).
//! While the push channel delivers a Thing's state, its reconciles read nothing (they copy the
//! pushed document) and the idle read and full check wait for the push drift interval.

pub mod certs;
pub mod client;
pub mod error;
pub mod naming;
pub mod ownership;
pub mod provision;
pub mod push;
mod reconcile;
pub mod shadow;
pub mod teardown;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aws_smithy_runtime_api::client::interceptors::SharedInterceptor;
use chrono::{DateTime, Utc};
use tokio::sync::OnceCell;

pub use self::error::AwsError;

use self::{
    certs::{CertContext, rotation::rotation_token},
    client::{AwsClients, CallStats, ClientSettings, Family},
};
use crate::{
    api::{ThingStatus, conditions::types, thing::CredentialSource},
    credentials::codec::DeviceFacts,
    metrics::Metrics,
    provider::{DeviceRequest, ThingKey},
};

/// Everything the AWS backend is configured with.
#[derive(Clone, Debug)]
pub struct AwsSettings {
    pub client: ClientSettings,
    /// `host[:port]` devices connect to; default: DescribeEndpoint `iot:Data-ATS` on port 8883.
    pub device_endpoint: Option<String>,
    /// Shadow poll interval when the spec sets none.
    pub poll_interval: Duration,
    /// How often a full drift check runs on a Thing that is otherwise idle.
    pub resync_interval: Duration,
    /// How long an interrupted CloudIssued window must age before its orphans are deleted.
    pub orphan_grace: Duration,
    /// Validity of in-cluster certificates.
    pub key_validity_days: i64,
    /// How long a rotated-out certificate stays valid when the spec sets no overlap.
    pub default_rotation_overlap: Duration,
    /// Adopt an existing thing that carries no owner record (off: such a thing is a conflict).
    pub adopt_unowned: bool,
    /// `--cluster-id`: goes into the device topic prefix.
    pub cluster_id: Option<String>,
    /// While the push channel is up, how often an idle Thing is read and checked anyway.
    pub push_drift_interval: Duration,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            client: ClientSettings::default(),
            device_endpoint: None,
            poll_interval: Duration::from_secs(30),
            resync_interval: Duration::from_secs(300),
            orphan_grace: Duration::from_secs(60),
            key_validity_days: 3650,
            default_rotation_overlap: Duration::from_secs(3600),
            adopt_unowned: false,
            cluster_id: None,
            push_drift_interval: Duration::from_secs(3600),
        }
    }
}

/// The shadow document the last read (or first write) of a Thing found, while the push channel
/// does not cover it: a reconcile soon after, while the channel is down or off, that no spec
/// change asked for (the ones
/// the operator's own Secret and status writes trigger, a grant of the write budget) copies it
/// instead of reading the shadow again. Polled Things only: for pushed ones the channel keeps
/// the document.
struct LastRead {
    at: Instant,
    fingerprint: (Option<i64>, Option<String>),
    document: serde_json::Value,
}

/// When the last full check ran and for which spec/annotation.
struct FullCheck {
    at: Instant,
    fingerprint: (Option<i64>, Option<String>),
    /// A deadline (orphan sweep) that forces the next full check.
    due: Option<DateTime<Utc>>,
}

pub struct AwsProvider {
    clients: AwsClients,
    settings: AwsSettings,
    endpoint: OnceCell<String>,
    ca_bundle: String,
    checks: Mutex<HashMap<ThingKey, FullCheck>>,
    last_reads: Mutex<HashMap<ThingKey, LastRead>>,
    /// Reported state pushed by AWS; never up unless [`push::start`] runs.
    push: Arc<push::PushChannel>,
}

impl AwsProvider {
    /// `interceptors` are added to both SDK clients (tests inject faults with them).
    pub async fn new(
        settings: AwsSettings,
        interceptors: Vec<SharedInterceptor>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let clients = AwsClients::new(&settings.client, interceptors, metrics).await;
        // Derived names carry the cluster prefix: the operator policy can be scoped to it.
        let scope = settings
            .cluster_id
            .as_ref()
            .map(|c| format!("{c}:"))
            .unwrap_or_default();
        Self {
            push: Arc::new(push::PushChannel::new(scope, settings.push_drift_interval)),
            clients,
            settings,
            endpoint: OnceCell::new(),
            ca_bundle: crate::credentials::pki::root_ca_bundle(&[
                "Amazon Root CA 1",
                "Amazon Root CA 3",
            ]),
            checks: Mutex::new(HashMap::new()),
            last_reads: Mutex::new(HashMap::new()),
        }
    }

    /// The prefix of the thing names whose documents the push channel receives.
    pub fn push_name_scope(&self) -> &str {
        self.push.name_scope()
    }

    /// Call counters (attempts, retries, throttled answers) since start.
    pub fn stats(&self) -> Arc<CallStats> {
        self.clients.stats.clone()
    }

    async fn device_endpoint(&self) -> Result<String, AwsError> {
        if let Some(e) = &self.settings.device_endpoint {
            return Ok(e.clone());
        }
        self.endpoint
            .get_or_try_init(|| async {
                let c = &self.clients;
                let out = c
                    .call(Family::Endpoint, "DescribeEndpoint", || {
                        c.iot
                            .describe_endpoint()
                            .endpoint_type("iot:Data-ATS")
                            .send()
                    })
                    .await
                    .map_err(|e| e.into_error("DescribeEndpoint"))?;
                Ok(format!(
                    "{}:8883",
                    out.endpoint_address().unwrap_or_default()
                ))
            })
            .await
            .cloned()
    }

    fn poll_interval(&self, req: &DeviceRequest<'_>) -> Duration {
        req.thing
            .spec
            .shadow
            .as_ref()
            .and_then(|s| s.poll_interval_duration())
            .unwrap_or(self.settings.poll_interval)
    }

    /// `pushed`: the push channel delivers this Thing's state, so the idle check waits the
    /// longer of the resync and the push drift interval.
    fn needs_full_check(
        &self,
        req: &DeviceRequest<'_>,
        status: &ThingStatus,
        pushed: bool,
    ) -> bool {
        let all_true = [types::PROVISIONED, types::CREDENTIALS_READY, types::IN_SYNC]
            .iter()
            .all(|t| status.conditions.is_true(t));
        if !all_true {
            return true;
        }
        let now = Utc::now();
        if let Some(creds) = &status.credentials {
            if creds.previous_revoke_at.is_some_and(|t| t <= now) {
                return true;
            }
            let rotation_due = creds
                .issued_at
                .and_then(|at| req.thing.spec.credentials.rotation_due_at(at));
            if rotation_due.is_some_and(|due| due <= now) {
                return true;
            }
        }
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        match checks.get(&req.key()) {
            None => true,
            Some(c) => {
                let resync = match pushed {
                    true => self
                        .settings
                        .resync_interval
                        .max(self.settings.push_drift_interval),
                    false => self.settings.resync_interval,
                };
                c.fingerprint != fingerprint(req)
                    || c.at.elapsed() >= resync
                    || c.due.is_some_and(|d| d <= now)
            }
        }
    }

    /// The document of a read less than half a poll interval ago under the same spec, and its
    /// age. Half: the requeue for the next poll is jittered by ±10%, and must read, not copy.
    fn recent_read(
        &self,
        req: &DeviceRequest<'_>,
        poll: Duration,
    ) -> Option<(serde_json::Value, Duration)> {
        let reads = self.last_reads.lock().unwrap_or_else(|p| p.into_inner());
        let last = reads.get(&req.key())?;
        let age = last.at.elapsed();
        (age < poll / 2 && last.fingerprint == fingerprint(req))
            .then(|| (last.document.clone(), age))
    }

    /// Remembers what a read found for [`Self::recent_read`]; `None` (no shadow, or the
    /// push channel covers the Thing) forgets.
    fn remember_read(&self, req: &DeviceRequest<'_>, document: Option<&serde_json::Value>) {
        let mut reads = self.last_reads.lock().unwrap_or_else(|p| p.into_inner());
        match document {
            Some(doc) => {
                reads.insert(
                    req.key(),
                    LastRead {
                        at: Instant::now(),
                        fingerprint: fingerprint(req),
                        document: doc.clone(),
                    },
                );
            }
            None => {
                reads.remove(&req.key());
            }
        }
    }

    /// The deadline the last full check of this Thing recorded, if any.
    fn pending_deadline(&self, req: &DeviceRequest<'_>) -> Option<DateTime<Utc>> {
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks.get(&req.key()).and_then(|c| c.due)
    }

    fn cert_context<'a>(
        &'a self,
        req: &'a DeviceRequest<'_>,
        thing_name: &'a str,
        policy_name: &'a str,
        endpoint: String,
    ) -> CertContext<'a> {
        CertContext {
            clients: &self.clients,
            secret: &req.secret,
            facts: DeviceFacts {
                endpoint,
                thing_name: thing_name.to_string(),
                client_id: thing_name.to_string(),
                ca: Some(self.ca_bundle.clone().into_bytes()),
            },
            cloud_issued: req.thing.spec.credentials.source == CredentialSource::CloudIssued,
            thing_name,
            policy_name,
            key_validity_days: self.settings.key_validity_days,
            orphan_grace: chrono::Duration::from_std(self.settings.orphan_grace)
                .unwrap_or_default(),
            call_bound: chrono::Duration::from_std(
                certs::orphans::CALL_START_BUDGET + self.clients.attempt_timeout(),
            )
            .unwrap_or_default(),
            rotation_token: rotation_token(req.thing),
        }
    }
}

fn fingerprint(req: &DeviceRequest<'_>) -> (Option<i64>, Option<String>) {
    (req.thing.metadata.generation, rotation_token(req.thing))
}
