//! IoT backends behind one trait. Each backend is a module of its own; the controller picks one
//! by `spec.broker` from the [`ProviderRegistry`]. Nothing outside this module talks to a backend.
//!
//! - [`error`]: how a backend's failure reaches the controller ([`BackendError`], [`ProviderError`]);
//! - `status`: what every backend writes into a Thing's status the same way;
//! - [`aws`], [`azure`], [`mosquitto`]: one folder per backend, split by job;
//! - `debug` (tests only): a backend that records calls, for the reconciler tests.
//!
//! A backend may use `api`, `credentials`, `feed`, `failpoints`, `metrics`, `mqtt` and `config`,
//! never the controller or the event tasks: they reach it through this module's types only.

pub mod aws;
pub mod azure;
#[cfg(test)]
pub mod debug;
pub mod error;
pub mod mosquitto;
pub mod ownership;
mod status;

pub use error::{BackendError, NotConfigured, ProviderError};

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::{
    api::{Thing, ThingStatus, thing::Broker},
    credentials::DeviceSecret,
};

/// Something worth an Event: drift repaired, certificate rotated, ...
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

impl Notice {
    pub fn normal(reason: &str, message: impl Into<String>) -> Self {
        Self {
            warning: false,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// The Event that announces a `Ready` condition: Normal when True, Warning otherwise.
    pub fn for_ready(ready: &crate::api::Condition) -> Self {
        let warning = ready.status != crate::api::ConditionStatus::True;
        Self {
            warning,
            reason: ready.reason.clone(),
            message: ready.message.clone(),
        }
    }

    pub fn warning(reason: &str, message: impl Into<String>) -> Self {
        Self {
            warning: true,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// A Thing within this operator (`namespace/name`): the key a backend's per-Thing memory uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThingKey {
    pub namespace: String,
    pub name: String,
}

impl ThingKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl std::fmt::Display for ThingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything a backend needs to know about one Thing.
pub struct DeviceRequest<'a> {
    pub thing: &'a Thing,
    pub namespace: &'a str,
    pub name: &'a str,
    /// The device's name in the backend (`spec.thingName` or derived).
    pub backend_name: String,
    /// The Secret that holds (or will hold) the device credentials.
    pub secret: DeviceSecret,
}

impl DeviceRequest<'_> {
    pub fn key(&self) -> ThingKey {
        ThingKey::new(self.namespace, self.name)
    }

    /// The device's name in the backend as `status` recorded it, else the one the spec derives
    /// now (nothing recorded yet: a crash before the first status write).
    pub fn recorded_name(&self, status: &ThingStatus) -> String {
        status
            .device
            .as_ref()
            .and_then(|d| d.thing_name.clone())
            .unwrap_or_else(|| self.backend_name.clone())
    }
}

/// What a backend did during one reconcile.
#[derive(Debug, Default)]
pub struct DeviceOutcome {
    /// Events to publish.
    pub notices: Vec<Notice>,
    /// When to look again (shadow polling, pending rotation); `None`: the resync default.
    pub requeue_after: Option<Duration>,
}

#[async_trait]
pub trait IotProvider: Send + Sync {
    fn broker(&self) -> Broker;

    /// Called once this replica starts reconciling (it is the leader, or there is no
    /// election): a backend with work of its own, beyond reconciling Things, starts it here.
    fn activate(&self) {}

    /// Makes the backend match the spec: creates or repairs the device, its credentials and
    /// policy, pushes desired state and reads reported state back. Idempotent and crash-safe:
    /// it records identifiers in `status` as soon as they exist, and the caller writes `status`
    /// even when an error is returned. Sets the `Provisioned`, `CredentialsReady` and `InSync`
    /// conditions.
    async fn reconcile(
        &self,
        req: &DeviceRequest<'_>,
        status: &mut ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError>;

    /// Removes every backend resource of the device, in the order the backend demands,
    /// tolerating what is already gone. `Ok` means nothing is left.
    async fn cleanup(
        &self,
        req: &DeviceRequest<'_>,
        status: &ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError>;

    /// The Thing leaves the operator's care with its backend resources kept (`deletionPolicy:
    /// Orphan`): whatever the backend keeps in memory for it (check deadlines, cached reads,
    /// push subscriptions, shadow routing) goes, so deleted Things cost nothing.
    fn release(&self, _req: &DeviceRequest<'_>, _status: &ThingStatus) {}
}

/// The configured backends, by broker.
#[derive(Default, Clone)]
pub struct ProviderRegistry {
    providers: HashMap<Broker, Arc<dyn IotProvider>>,
}

impl ProviderRegistry {
    pub fn register(&mut self, provider: Arc<dyn IotProvider>) {
        self.providers.insert(provider.broker(), provider);
    }

    pub fn get(&self, broker: Broker) -> Result<Arc<dyn IotProvider>, ProviderError> {
        self.providers
            .get(&broker)
            .cloned()
            .ok_or_else(|| NotConfigured(broker).into())
    }

    /// Activates every backend (see [`IotProvider::activate`]).
    pub fn activate_all(&self) {
        for provider in self.providers.values() {
            provider.activate();
        }
    }

    pub fn brokers(&self) -> Vec<Broker> {
        self.providers.keys().copied().collect()
    }
}
