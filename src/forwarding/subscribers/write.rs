//! Where a Subscriber's coalesced messages land: `spec.desired` of the target Thing (a merge
//! patch through the Kubernetes API), or its reported state (handed to the
//! [`ReportedStateWriter`] the runner wired in, which knows which backends take reported state
//! and how). Each failure says whether trying again can help.

use std::sync::Arc;

use kube::Api;
use serde_json::Value;

use crate::{
    api::{JsonObject, Thing, subscriber::TargetField},
    feed::{ReportError, ReportedStateWriter},
    forwarding::{
        DeliveryError,
        desired::{merge_into_desired, refused},
    },
};

/// Writes into one target Thing.
pub struct TargetWriter {
    pub things: Api<Thing>,
    pub thing_name: String,
    pub field: TargetField,
    pub reported: Arc<dyn ReportedStateWriter>,
}

impl TargetWriter {
    /// Writes `doc` (a merge patch, already placed at the target's path). Returns the desired
    /// document the write left, for `field: Desired`.
    pub async fn write(&self, doc: &Value) -> Result<Option<JsonObject>, DeliveryError> {
        let target = &self.thing_name;
        match self.field {
            TargetField::Desired => merge_into_desired(&self.things, target, doc.clone())
                .await
                .map(Some)
                .map_err(|e| {
                    let message = format!("writing desired state of Thing {target}: {e}");
                    match refused(&e) {
                        true => DeliveryError::permanent(message),
                        false => DeliveryError::retryable(message),
                    }
                }),
            TargetField::Reported => {
                // The writer decides by the Thing (its backend, its namespace), so read it first.
                let thing = self.things.get(target).await.map_err(|e| {
                    DeliveryError::retryable(format!("reading Thing {target}: {e}"))
                })?;
                self.reported
                    .write_reported(&thing, doc)
                    .await
                    .map(|()| None)
                    .map_err(|e| match e {
                        ReportError::Unsupported(m) => DeliveryError::permanent(m),
                        ReportError::Failed(m) => DeliveryError::retryable(m),
                    })
            }
        }
    }
}
