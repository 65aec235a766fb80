//! Azure IoT Hub backend: a device identity per `Thing` (X.509 self-signed, the key generated in
//! the operator and kept in the device Secret, its thumbprint registered; or a symmetric key),
//! twin sync (spec
//! desired and attributes to the twin, reported properties to status), ownership in twin tags,
//! drift repair and etag-aware teardown.
//!
//! Modules: [`client`] (the service REST client on azure_core's pipeline: retries, rate
//! limits), [`model`] (its documents), `pipeline` (its SAS policy, call counter and transport),
//! `entra` (the other way in: Entra workload identity, a bearer token for the hub),
//! [`sas`] (connection strings and tokens, pure), [`error`] (what a failure is and whether a
//! retry may help), [`twin`] (twin rules, patches, status; pure), [`ownership`] (who owns a
//! device; pure), [`credentials`] (the device certificate and Secret), [`symmetric`]
//! (symmetric-key devices, `CloudIssued`, and their key rotation), [`key_state`] (their Secret
//! layout and rotation journal; pure), `reconcile` (the steps of a reconcile and a cleanup).
//! This file holds the provider and when a full check runs.
//!
//! Cost model: a full check (device read, ownership, thumbprint drift, rotation) runs when the
//! spec or the rotate annotation changed, when a condition is not True, when a rotation or the
//! end of an overlap is due, and otherwise once per resync interval; between full
//! checks a reconcile is one twin read (plus a twin PATCH when the spec and the twin differ).

pub mod client;
pub mod credentials;
mod entra;
pub mod error;
pub mod key_state;
pub mod model;
pub mod ownership;
mod pipeline;
mod reconcile;
pub mod sas;
pub mod symmetric;
pub mod twin;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub use self::error::AzureError;

use self::client::{CallStats, ClientSettings, HubClient};
use crate::provider::aws::certs::rotation::rotation_token;
use crate::{
    api::{ThingStatus, conditions::types},
    provider::{DeviceRequest, ThingKey},
};

/// Everything the Azure backend is configured with.
#[derive(Clone, Debug)]
pub struct AzureSettings {
    pub client: ClientSettings,
    /// Twin poll interval when the spec sets none.
    pub poll_interval: Duration,
    /// How often a full check runs on a Thing that is otherwise idle.
    pub resync_interval: Duration,
    /// Validity of the device certificates.
    pub key_validity_days: i64,
    /// Adopt an existing device that carries no owner record (off: such a device is a conflict).
    pub adopt_unowned: bool,
    /// How long a rotated-out certificate stays registered when the spec sets no overlap.
    pub default_rotation_overlap: Duration,
}

/// When the last full check ran, for which generation and rotate annotation.
type FullCheck = (Instant, Option<i64>, Option<String>);

pub struct AzureProvider {
    client: HubClient,
    settings: AzureSettings,
    ca_bundle: String,
    checks: Mutex<HashMap<ThingKey, FullCheck>>,
}

impl AzureProvider {
    pub fn new(
        settings: AzureSettings,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Self, String> {
        Ok(Self {
            client: HubClient::new(&settings.client, metrics)?,
            settings,
            // IoT Hub's server certificates chain to DigiCert Global Root G2 (and Microsoft's
            // RSA root 2017 after the migration); a device needs both to be safe either way.
            ca_bundle: crate::credentials::pki::root_ca_bundle(&[
                "DigiCert Global Root G2",
                "Microsoft RSA Root Certificate Authority 2017",
            ]),
            checks: Mutex::new(HashMap::new()),
        })
    }

    /// Call counters (attempts, throttled answers) since start.
    pub fn stats(&self) -> Arc<CallStats> {
        self.client.stats.clone()
    }

    pub(crate) fn host_name(&self) -> &str {
        &self.client.host_name
    }

    fn poll_interval(&self, req: &DeviceRequest<'_>) -> Duration {
        req.thing
            .spec
            .shadow
            .as_ref()
            .and_then(|s| s.poll_interval_duration())
            .unwrap_or(self.settings.poll_interval)
    }

    fn needs_full_check(&self, req: &DeviceRequest<'_>, status: &ThingStatus) -> bool {
        let all_true = [types::PROVISIONED, types::CREDENTIALS_READY, types::IN_SYNC]
            .iter()
            .all(|t| status.conditions.is_true(t));
        if !all_true {
            return true;
        }
        // A rotation or the end of an overlap is due.
        let now = chrono::Utc::now();
        if let Some(creds) = &status.credentials {
            if creds.previous_revoke_at.is_some_and(|t| t <= now) {
                return true;
            }
            let due = creds
                .issued_at
                .and_then(|at| req.thing.spec.credentials.rotation_due_at(at));
            if due.is_some_and(|d| d <= now) {
                return true;
            }
        }
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        match checks.get(&req.key()) {
            None => true,
            Some((at, generation, token)) => {
                *generation != req.thing.metadata.generation
                    || *token != rotation_token(req.thing)
                    || at.elapsed() >= self.settings.resync_interval
            }
        }
    }

    fn checked(&self, req: &DeviceRequest<'_>) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                req.key(),
                (
                    Instant::now(),
                    req.thing.metadata.generation,
                    rotation_token(req.thing),
                ),
            );
    }

    fn forget(&self, req: &DeviceRequest<'_>) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.key());
    }
}
