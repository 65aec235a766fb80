//! How news about a Thing's state travels between the parts of the operator without any of them
//! importing another: the Thing controller and the backends with a push channel (the Mosquitto
//! shadow service) write into a [`StateFeed`]; `runner.rs` wires it to the Observers' state bus,
//! the REST message broker's retained state topics and the Thing controller's trigger queue.
//!
//! The other direction has a seam here too: a Subscriber that writes reported state hands it to
//! a [`ReportedStateWriter`], so forwarding never learns which backend takes reported state
//! from the operator, or on which topic.

use serde_json::Value;

use crate::api::{Thing, ThingStatus, ThingUpdate};

pub trait StateFeed: Send + Sync {
    /// A Thing's status was written: the state Observers see and the REST broker publishes.
    fn thing_state(&self, thing: &Thing, status: &ThingStatus);

    /// Fresh state straight from a device, ahead of the paced status write (Observers read it
    /// from memory at once).
    fn device_state(&self, update: ThingUpdate);

    /// The Thing's status is behind its backend: reconcile it soon. Never blocks; callers pace
    /// their requests per Thing.
    fn request_reconcile(&self, namespace: &str, name: &str);

    /// The operator's MQTT connection lost its publish rights (`false`) or has them again.
    fn broker_online(&self, online: bool);

    /// The Thing is gone from its backend: forget (and clear) its retained state.
    fn thing_removed(&self, namespace: &str, name: &str);
}

/// A feed that goes nowhere, for tests and for processes without Observers or an MQTT broker.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFeed;

impl StateFeed for NoFeed {
    fn thing_state(&self, _: &Thing, _: &ThingStatus) {}
    fn device_state(&self, _: ThingUpdate) {}
    fn request_reconcile(&self, _: &str, _: &str) {}
    fn broker_online(&self, _: bool) {}
    fn thing_removed(&self, _: &str, _: &str) {}
}

/// Writes reported state into a Thing the way a device report arrives, so the backend's shadow
/// stays the one source of reported state (a Subscriber with `target.field: Reported`).
/// Implemented where backend topics are known (the REST message broker); the runner hands it to
/// the Subscriber tasks.
#[async_trait::async_trait]
pub trait ReportedStateWriter: Send + Sync {
    /// Merges `reported` (a JSON merge patch) into the reported state of `thing`.
    async fn write_reported(&self, thing: &Thing, reported: &Value) -> Result<(), ReportError>;
}

/// Why reported state was not written. The message is shown in the writer's status, so it
/// never carries the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// It never can be (the Thing's backend takes no reported state from the operator, or no
    /// broker is configured): the caller drops the message instead of retrying forever.
    #[error("{0}")]
    Unsupported(String),
    /// It did not go through this time (connection, queue): trying again may help.
    #[error("{0}")]
    Failed(String),
}

/// Without a writer nothing takes reported state: every write is refused for good, so a
/// Subscriber says why instead of retrying.
#[async_trait::async_trait]
impl ReportedStateWriter for NoFeed {
    async fn write_reported(&self, _: &Thing, _: &Value) -> Result<(), ReportError> {
        Err(ReportError::Unsupported(
            "no backend takes reported state in this process".into(),
        ))
    }
}
