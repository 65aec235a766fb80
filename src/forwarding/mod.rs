//! Forwarding: Thing state carried to and from the world outside the cluster's API, by
//! Observers (Thing state out to a sink) and Subscribers (messages in, into a Thing).
//!
//! - [`bus`]: the in-memory stream of Thing state Observers read;
//! - pure rules and codecs: [`filter`] (which updates an Observer forwards), [`json`] (placing
//!   and coalescing JSON), [`cloud_event`] (what sinks send);
//! - I/O: [`sink`] (where Observers deliver), [`desired`] (writing a Thing's `spec.desired`),
//!   [`mqtt`] (the MQTT client a namespace's tasks act with on the operator's broker),
//!   [`broker_connections`] (the sessions with brokers tenants name themselves);
//! - the tasks: [`observers`] (with [`lanes`], one per Thing, and the [`outbox`] each delivery
//!   runs through), [`subscribers`], and what both share in [`tasks`].
//!
//! Forwarding is fed by channels and trait objects the runner wires in (the state bus, the
//! MQTT client, a [`ReportedStateWriter`](crate::feed::ReportedStateWriter), the egress policy
//! of HTTP sinks); it imports no backend, controller or runner code.

pub mod broker_connections;
mod bus;
pub mod client_id_claims;
mod cloud_event;
pub mod connection_settings;
pub(crate) mod desired;
mod filter;
mod json;
mod lanes;
pub mod mqtt;
mod observers;
mod outbox;
pub mod provenance;
mod publish_tracker;
mod retry;
mod sink;
pub mod status_budget;
pub mod subscribers;
mod tasks;

/// What Observer and Subscriber tasks share across both kinds: what the operator's own writes
/// into Things caused (so graphs through both settle) and the budget of their status writes.
#[derive(Clone)]
pub struct SharedByTasks {
    pub provenance: provenance::ProvenanceBook,
    pub status_budget: status_budget::TaskStatusBudget,
}

pub use broker_connections::BrokerConnections;
pub use bus::StateBus;
pub use observers::{MqttBrokers, ObserverManager};
pub use subscribers::SubscriberManager;

/// Why a delivery (an Observer's sink) or a write (a Subscriber's target Thing) failed. The
/// message goes to the task's `status.lastError` and logs, so it never carries a payload or a
/// header value (they may be tokens).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    /// Whether trying again may succeed; a permanent failure is dropped and counted.
    pub retryable: bool,
    /// The egress policy refused the destination (permanent): the Observer's Ready condition
    /// says so with reason `DestinationRefused`.
    pub refused: bool,
    pub message: String,
}

impl DeliveryError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            refused: false,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            refused: false,
            message: message.into(),
        }
    }

    /// The destination is one sinks may not reach (known only once its name resolved).
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            refused: true,
            message: message.into(),
        }
    }
}
