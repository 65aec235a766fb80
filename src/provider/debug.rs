//! A backend that talks to nothing and records every call, for the reconciler tests (the role
//! Akri's debug-echo discovery handler plays there). A test scripts what the next reconcile
//! returns and then asserts on the calls the controller made.

use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    BackendError, DeviceOutcome, DeviceRequest, IotProvider, Notice, ProviderError,
    status::{record_failure, set_condition},
};
use crate::api::{
    JsonObject, ThingStatus,
    conditions::types,
    thing::{Broker, DeviceStatus},
};

/// One call the controller made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Reconcile {
        thing: String,
        backend_name: String,
    },
    Cleanup {
        thing: String,
        backend_name: String,
    },
    /// The Thing left with its device kept (`deletionPolicy: Orphan`).
    Release {
        thing: String,
    },
}

/// A scripted failure, classified like a real backend's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("debug backend: {reason}")]
pub struct DebugError {
    pub reason: &'static str,
    pub retryable: bool,
}

impl BackendError for DebugError {
    fn is_retryable(&self) -> bool {
        self.retryable
    }

    fn reason(&self) -> &'static str {
        self.reason
    }
}

/// What the next reconciles do.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// `Some`: reconcile and cleanup fail with this error.
    pub fail: Option<DebugError>,
    /// Reported state copied into status on success.
    pub reported: Option<JsonObject>,
    /// Events the backend asks for on success.
    pub notices: Vec<Notice>,
}

pub struct DebugProvider {
    broker: Broker,
    calls: Mutex<Vec<Call>>,
    script: Mutex<Script>,
    /// The status the last reconcile was handed.
    last_status: Mutex<Option<ThingStatus>>,
}

impl DebugProvider {
    /// A debug backend answering for `broker`.
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            calls: Mutex::default(),
            script: Mutex::default(),
            last_status: Mutex::default(),
        }
    }

    /// The status the last reconcile started from (what the controller took to be current).
    pub fn last_status(&self) -> Option<ThingStatus> {
        self.last_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn script(&self, script: Script) {
        *self.script.lock().unwrap_or_else(|p| p.into_inner()) = script;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, call: Call) -> Script {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
        self.script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl IotProvider for DebugProvider {
    fn broker(&self) -> Broker {
        self.broker
    }

    async fn reconcile(
        &self,
        req: &DeviceRequest<'_>,
        status: &mut ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        let script = self.record(Call::Reconcile {
            thing: req.key().to_string(),
            backend_name: req.backend_name.clone(),
        });
        *self.last_status.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.clone());
        status.device = Some(DeviceStatus {
            broker: Some(self.broker),
            thing_name: Some(req.backend_name.clone()),
            ..DeviceStatus::default()
        });
        if let Some(e) = script.fail {
            return Err(record_failure(status, types::PROVISIONED, e).into());
        }
        for t in [types::PROVISIONED, types::CREDENTIALS_READY, types::IN_SYNC] {
            set_condition(status, t, true, "Debug", "debug backend");
        }
        status.reported = script.reported;
        outcome.notices = script.notices;
        Ok(())
    }

    async fn cleanup(
        &self,
        req: &DeviceRequest<'_>,
        _status: &ThingStatus,
        _outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        let script = self.record(Call::Cleanup {
            thing: req.key().to_string(),
            backend_name: req.backend_name.clone(),
        });
        match script.fail {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn release(&self, req: &DeviceRequest<'_>, _status: &ThingStatus) {
        self.record(Call::Release {
            thing: req.key().to_string(),
        });
    }
}
