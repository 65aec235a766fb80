//! AWS IoT Core backend: a thing per `Thing`, a least-privilege policy, a certificate whose key
//! stays in the cluster (or a CloudIssued one), the device Secret, shadow sync, drift repair,
//! rotation and ordered teardown.
//!
//! Modules: `client` (SDK clients, rate limits, retries, error mapping), `naming` (names and the
//! policy document), `provision` (thing, policy, attachments), `certs` (issuance, rotation,
//! orphan sweep), `shadow` (desired/reported sync), `teardown` (deletion order).
//!
//! Cost model: a full check (every resource described, drift repaired) runs when the spec or the
//! rotate annotation changed, when a condition is not True, when a rotation or revocation is due,
//! and otherwise once per resync interval; between full checks a reconcile is one shadow read.

pub mod certs;
pub mod client;
pub mod naming;
pub mod provision;
pub mod shadow;
pub mod teardown;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use aws_smithy_runtime_api::client::interceptors::SharedInterceptor;
use chrono::{DateTime, Utc};
use kube::ResourceExt;
use tokio::sync::OnceCell;

use self::{
    certs::{CredCtx, ROTATE_ANNOTATION, SecretCommon},
    client::{AwsClients, CallStats, ClientSettings, Family},
    naming::{ArnParts, PolicyVars},
};
use crate::{
    api::{
        Condition, ConditionStatus, ThingStatus,
        conditions::types,
        thing::{Broker, CredentialSource},
        validation::parse_duration,
    },
    metrics::Metrics,
    provider::{
        BackendError, BackendFailure, DeviceOutcome, DeviceRequest, IotProvider, ProviderError,
    },
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
        }
    }
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
    checks: Mutex<HashMap<String, FullCheck>>,
}

fn set(status: &mut ThingStatus, type_: &str, ok: bool, reason: &str, message: impl Into<String>) {
    status.conditions.set(
        Condition::new(type_, ConditionStatus::from_bool(ok), reason, message),
        Utc::now(),
    );
}

/// Records a failed step in its condition and passes the error on.
fn failed(status: &mut ThingStatus, type_: &str, e: BackendFailure) -> BackendFailure {
    set(status, type_, false, e.reason(), e.to_string());
    e
}

impl AwsProvider {
    /// `interceptors` are added to both SDK clients (tests inject faults with them).
    pub async fn new(
        settings: AwsSettings,
        interceptors: Vec<SharedInterceptor>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let clients = AwsClients::new(&settings.client, interceptors, metrics).await;
        Self {
            clients,
            settings,
            endpoint: OnceCell::new(),
            ca_bundle: crate::credentials::pki::root_ca_bundle(&[
                "Amazon Root CA 1",
                "Amazon Root CA 3",
            ]),
            checks: Mutex::new(HashMap::new()),
        }
    }

    /// Call counters (attempts, retries, throttled answers) since start.
    pub fn stats(&self) -> Arc<CallStats> {
        self.clients.stats.clone()
    }

    async fn device_endpoint(&self) -> Result<String, BackendFailure> {
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
                    .map_err(|e| e.into_provider("DescribeEndpoint"))?;
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
            .and_then(|s| s.poll_interval.as_deref())
            .and_then(|p| parse_duration(p).ok())
            .unwrap_or(self.settings.poll_interval)
    }

    fn check_key(req: &DeviceRequest<'_>) -> String {
        format!("{}/{}", req.namespace, req.name)
    }

    fn needs_full_check(&self, req: &DeviceRequest<'_>, status: &ThingStatus) -> bool {
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
            let rotate_after = req
                .thing
                .spec
                .credentials
                .rotate_after
                .as_deref()
                .and_then(|d| parse_duration(d).ok());
            if let (Some(issued), Some(after)) = (
                creds.issued_at,
                rotate_after.and_then(|d| chrono::Duration::from_std(d).ok()),
            ) && issued + after <= now
            {
                return true;
            }
        }
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        match checks.get(&Self::check_key(req)) {
            None => true,
            Some(c) => {
                c.fingerprint != fingerprint(req)
                    || c.at.elapsed() >= self.settings.resync_interval
                    || c.due.is_some_and(|d| d <= now)
            }
        }
    }

    fn cred_ctx<'a>(
        &'a self,
        req: &'a DeviceRequest<'_>,
        thing_name: &'a str,
        policy_name: &'a str,
        endpoint: String,
    ) -> CredCtx<'a> {
        CredCtx {
            c: &self.clients,
            secret: &req.secret,
            common: SecretCommon {
                ca_bundle: self.ca_bundle.clone(),
                endpoint,
                thing_name: thing_name.to_string(),
                client_id: thing_name.to_string(),
            },
            cloud_issued: req.thing.spec.credentials.source == CredentialSource::CloudIssued,
            thing_name,
            policy_name,
            key_validity_days: self.settings.key_validity_days,
            orphan_grace: chrono::Duration::from_std(self.settings.orphan_grace)
                .unwrap_or_default(),
            rotation_token: req.thing.annotations().get(ROTATE_ANNOTATION).cloned(),
        }
    }

    /// The full check: thing, policy, credentials, attachments, rotation, orphan sweep.
    /// Returns the earliest deadline that needs another full check.
    async fn converge(
        &self,
        req: &DeviceRequest<'_>,
        thing_name: &str,
        policy_name: &str,
        endpoint: String,
        status: &mut ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<Option<DateTime<Utc>>, BackendFailure> {
        let c = &self.clients;
        let spec = &req.thing.spec;
        // "Was complete once": a recorded certificate ARN means thing, policy and certificate all
        // existed; the conditions alone would forget that after one failed step (a repair that
        // fails half-way must still be reported as drift when it succeeds).
        let completed_once = status
            .device
            .as_ref()
            .is_some_and(|d| d.certificate_arn.is_some());
        let was_provisioned = completed_once || status.conditions.is_true(types::PROVISIONED);
        let was_ready = completed_once || status.conditions.is_true(types::CREDENTIALS_READY);
        let notices = &mut outcome.notices;

        let thing_arn =
            provision::ensure_thing(c, thing_name, &spec.attributes, was_provisioned, notices)
                .await
                .map_err(|e| failed(status, types::PROVISIONED, e))?;
        if let Some(d) = status.device.as_mut()
            && d.thing_arn.as_deref() != Some(thing_arn.as_str())
        {
            d.thing_arn = Some(thing_arn.clone());
        }
        let arn = naming::parse_arn(&thing_arn).unwrap_or_else(|| ArnParts {
            partition: "aws".into(),
            region: self.settings.client.region.clone().unwrap_or_default(),
            account: "*".into(),
        });
        let topic = naming::topic_prefix(req.namespace, req.name);
        let vars = PolicyVars {
            thing_name,
            client_id: thing_name,
            topic_prefix: &topic,
            arn: &arn,
        };
        let document =
            naming::render_policy(spec.policy.as_ref().map(|p| p.template.as_str()), &vars)
                .map_err(|m| failed(status, types::PROVISIONED, BackendFailure::Rejected(m)))?;
        provision::ensure_policy(c, policy_name, &document, was_provisioned, notices)
            .await
            .map_err(|e| failed(status, types::PROVISIONED, e))?;

        let x = self.cred_ctx(req, thing_name, policy_name, endpoint);
        let mut state = x
            .load()
            .await
            .map_err(|e| failed(status, types::CREDENTIALS_READY, e))?;
        let mut active = certs::ensure_credentials(&x, &mut state, status, was_ready, notices)
            .await
            .map_err(|e| failed(status, types::CREDENTIALS_READY, e))?;
        provision::ensure_attachments(
            c,
            thing_name,
            policy_name,
            &active.arn,
            was_provisioned,
            notices,
        )
        .await
        .map_err(|e| failed(status, types::PROVISIONED, e))?;
        set(
            status,
            types::PROVISIONED,
            true,
            "Provisioned",
            format!("thing {thing_name} and policy {policy_name} in place"),
        );

        let rotate_after = spec
            .credentials
            .rotate_after
            .as_deref()
            .and_then(|d| parse_duration(d).ok());
        let overlap = spec
            .credentials
            .rotation_overlap
            .as_deref()
            .and_then(|d| parse_duration(d).ok())
            .unwrap_or(self.settings.default_rotation_overlap);
        let token = req.thing.annotations().get(ROTATE_ANNOTATION).cloned();
        if let Some(reason) = certs::rotation_due(&state, rotate_after, token.as_deref()) {
            active = certs::rotate(&x, &mut state, status, overlap, &reason, notices)
                .await
                .map_err(|e| failed(status, types::CREDENTIALS_READY, e))?;
            provision::ensure_attachments(c, thing_name, policy_name, &active.arn, false, notices)
                .await
                .map_err(|e| failed(status, types::PROVISIONED, e))?;
        }
        certs::finish_overlap(&x, &mut state, status, notices)
            .await
            .map_err(|e| failed(status, types::CREDENTIALS_READY, e))?;
        let sweep_pending = certs::sweep_orphans(&x, &mut state)
            .await
            .map_err(|e| failed(status, types::CREDENTIALS_READY, e))?;
        certs::mirror(status, &state, Some(&active));
        set(
            status,
            types::CREDENTIALS_READY,
            true,
            "CertificateActive",
            format!(
                "certificate {} is active; Secret {} holds its key",
                active.id,
                req.secret.name()
            ),
        );

        let deadlines = [
            state.previous_revoke_at,
            certs::next_rotation(&state, rotate_after),
            sweep_pending
                .then(|| state.orphan_window.map(|(_, end)| end + x.orphan_grace))
                .flatten(),
        ];
        Ok(deadlines.into_iter().flatten().min())
    }
}

fn fingerprint(req: &DeviceRequest<'_>) -> (Option<i64>, Option<String>) {
    (
        req.thing.metadata.generation,
        req.thing.annotations().get(ROTATE_ANNOTATION).cloned(),
    )
}

#[async_trait]
impl IotProvider for AwsProvider {
    fn broker(&self) -> Broker {
        Broker::Aws
    }

    async fn reconcile(
        &self,
        req: &DeviceRequest<'_>,
        status: &mut ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        let thing_name = req.backend_name.clone();
        if let Some(recorded) = status.device.as_ref().and_then(|d| d.thing_name.as_ref())
            && *recorded != thing_name
        {
            // A new name would create a second thing and orphan the first.
            let e = BackendFailure::Rejected(format!(
                "thingName cannot change after provisioning: provisioned as {recorded}, the spec now gives {thing_name}"
            ));
            return Err(failed(status, types::PROVISIONED, e).into());
        }
        let policy_name = naming::policy_name(&thing_name);
        let poll = self.poll_interval(req);
        let endpoint = self
            .device_endpoint()
            .await
            .map_err(|e| failed(status, types::PROVISIONED, e))?;
        {
            let d = status.device.get_or_insert_with(Default::default);
            let want = (
                Some(Broker::Aws),
                Some(thing_name.clone()),
                Some(policy_name.clone()),
                Some(endpoint.clone()),
                Some(naming::topic_prefix(req.namespace, req.name)),
                Some(req.secret.name().to_string()),
            );
            if (
                d.broker,
                d.thing_name.clone(),
                d.policy_name.clone(),
                d.endpoint.clone(),
                d.topic.clone(),
                d.secret_name.clone(),
            ) != want
            {
                d.broker = want.0;
                d.thing_name = want.1.clone();
                d.client_id = want.1;
                d.policy_name = want.2;
                d.endpoint = want.3;
                d.topic = want.4;
                d.secret_name = want.5;
            }
        }

        let mut next = Utc::now() + chrono::Duration::from_std(poll).unwrap_or_default();
        if self.needs_full_check(req, status) {
            let due = self
                .converge(req, &thing_name, &policy_name, endpoint, status, outcome)
                .await?;
            if let Some(d) = due {
                next = next.min(d);
            }
            self.checks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    Self::check_key(req),
                    FullCheck {
                        at: Instant::now(),
                        fingerprint: fingerprint(req),
                        due,
                    },
                );
        }

        let shadow_name = req
            .thing
            .spec
            .shadow
            .as_ref()
            .and_then(|s| s.name.as_deref());
        match shadow::sync(
            &self.clients,
            &thing_name,
            shadow_name,
            req.thing.spec.desired.as_ref(),
            status,
        )
        .await
        {
            Ok(_) => set(
                status,
                types::IN_SYNC,
                true,
                "ShadowInSync",
                "shadow desired state matches the spec",
            ),
            Err(e) => return Err(failed(status, types::IN_SYNC, e).into()),
        }
        // A deadline slightly in the past still waits a moment: no hot loop on a skewed clock.
        let wait = (next - Utc::now())
            .to_std()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(500));
        outcome.requeue_after = Some(wait.min(poll));
        Ok(())
    }

    async fn cleanup(
        &self,
        req: &DeviceRequest<'_>,
        status: &ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        let device = status.device.clone().unwrap_or_default();
        let thing_name = device
            .thing_name
            .clone()
            .unwrap_or_else(|| req.backend_name.clone());
        let policy_name = device
            .policy_name
            .clone()
            .unwrap_or_else(|| naming::policy_name(&thing_name));
        let endpoint = device.endpoint.clone().unwrap_or_default();
        let x = self.cred_ctx(req, &thing_name, &policy_name, endpoint);
        let recorded: Vec<String> = device
            .certificate_id
            .iter()
            .chain(
                status
                    .credentials
                    .as_ref()
                    .and_then(|c| c.previous_certificate_id.as_ref()),
            )
            .cloned()
            .collect();
        let shadow_name = req
            .thing
            .spec
            .shadow
            .as_ref()
            .and_then(|s| s.name.as_deref());
        teardown::teardown(&x, &recorded, shadow_name, &mut outcome.notices).await?;
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&Self::check_key(req));
        Ok(())
    }
}
