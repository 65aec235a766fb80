//! Reconcile and cleanup of one Mosquitto Thing (the [`IotProvider`] implementation).
//!
//! A reconcile makes the in-memory shadow follow the spec (a desired change is published to the
//! device at once), verifies the broker client, role and Secret when the spec or the Secret name
//! changed or [`VERIFY_EVERY`] has passed, and copies the shadow's snapshot into status. Between
//! verifications a reconcile touches neither the broker's dynamic security nor the Secret, which
//! keeps the reconciles a telemetry storm causes cheap.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use kube::ResourceExt;
use rumqttc::QoS;

use super::{
    MosquittoProvider,
    dynsec::DynsecError,
    error::MosquittoError,
    naming::{ThingMarks, role_name},
    registry::Snapshot,
    seed::seed_shadow,
};
use crate::{
    api::{JsonObject, ThingStatus, conditions::types, thing::Broker},
    mqtt::topic::{ShadowReply, aws_shadow_root, check_thing_name},
    provider::{
        DeviceOutcome, DeviceRequest, IotProvider, ProviderError,
        status::{DeviceIdentity, record_device, set_condition},
    },
};

/// How long a successful check of client, role and Secret is trusted before the next
/// reconcile checks again (drift repair); reconciles in between only copy shadow state.
const VERIFY_EVERY: Duration = Duration::from_secs(60);

#[async_trait]
impl IotProvider for MosquittoProvider {
    fn broker(&self) -> Broker {
        Broker::Mosquitto
    }

    /// Serves shadow requests and grants the operator its publish ACLs as soon as this replica
    /// leads, not only at its first Mosquitto Thing: Observer sinks and the REST broker's state
    /// topics publish on this broker for every backend.
    fn activate(&self) {
        self.service.activate();
    }

    async fn reconcile(
        &self,
        req: &DeviceRequest<'_>,
        status: &mut ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        self.service.activate();
        self.reconcile_device(req, status).await?;
        outcome.requeue_after = None;
        Ok(())
    }

    async fn cleanup(
        &self,
        req: &DeviceRequest<'_>,
        status: &ThingStatus,
        _outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        self.service.activate();
        Ok(self.remove_device(req, status).await?)
    }

    /// The device stays in the broker, no longer served: its shadow requests go unanswered
    /// like those of any client the operator does not manage.
    fn release(&self, req: &DeviceRequest<'_>, _status: &ThingStatus) {
        self.registry.lock().remove(&req.key());
    }
}

impl MosquittoProvider {
    async fn reconcile_device(
        &self,
        req: &DeviceRequest<'_>,
        status: &mut ThingStatus,
    ) -> Result<(), MosquittoError> {
        let now = Utc::now();
        let thing_name = req.backend_name.as_str();
        let topic = self.config.layout.thing(req.namespace, req.name)?;
        check_thing_name(thing_name)?;
        if thing_name == self.config.username {
            return Err(MosquittoError::OperatorAccount(thing_name.to_string()));
        }
        let key = req.key();
        let uid = req.thing.uid().unwrap_or_default();
        let generation = req.thing.metadata.generation;
        let secret_name = req.secret.name();

        // The in-memory shadow: restored from status after a restart, desired from the spec.
        let desired = req
            .thing
            .spec
            .desired
            .clone()
            .map(|d| d.0)
            .unwrap_or_default();
        let (changed, verified) = {
            let mut registry = self.registry.lock();
            let tracked = registry
                .track(&key, &uid, thing_name, || seed_shadow(req.thing, status))
                .map_err(|owner| MosquittoError::NameTaken {
                    thing_name: thing_name.to_string(),
                    owner,
                })?;
            tracked.set_labels(req.thing.labels());
            let changed = tracked.set_desired(desired, now);
            let verified = tracked.is_verified(generation, secret_name, VERIFY_EVERY);
            (changed, verified)
        };
        // Only once the name is this Thing's: a Thing that lost the name must not record it,
        // or after a restart it could claim the name from the status it wrote.
        record_device(
            status,
            DeviceIdentity {
                broker: Broker::Mosquitto,
                thing_name,
                client_id: thing_name,
                endpoint: &self.config.device_endpoint,
                topic: topic.base(),
                secret_name,
                policy_name: None,
            },
        );
        if let Some(change) = changed {
            let aws_root = aws_shadow_root(thing_name)?;
            for root in [topic.shadow_root(), aws_root] {
                if let Some(delta) = &change.delta {
                    self.publish(
                        format!("{root}/update/{}", ShadowReply::Delta.as_str()),
                        delta.to_string().into_bytes(),
                    )
                    .await;
                }
                self.publish(
                    format!("{root}/update/{}", ShadowReply::Documents.as_str()),
                    change.documents.clone(),
                )
                .await;
            }
        }

        if !verified {
            self.provision(req, &topic, status).await?;
            if let Some(tracked) = self.registry.lock().get_mut(&key) {
                tracked.mark_verified(generation, secret_name);
            }
        }

        let snapshot = self
            .registry
            .lock()
            .get_mut(&key)
            .map(|t| t.snapshot().clone())
            .unwrap_or_default();
        if status.version != Some(snapshot.version) {
            tracing::debug!(from = ?status.version, to = snapshot.version, "shadow snapshot to status");
        }
        let message = copy_snapshot(snapshot, status);
        set_condition(status, types::IN_SYNC, true, "DesiredPublished", message);
        Ok(())
    }

    /// Deletes the Thing's broker client (when it is the Thing's) and role, and forgets its
    /// shadow and retained state.
    async fn remove_device(
        &self,
        req: &DeviceRequest<'_>,
        status: &ThingStatus,
    ) -> Result<(), MosquittoError> {
        let thing_name = req.recorded_name(status);
        let marks = ThingMarks::of(req.namespace, req.name, req.thing.metadata.uid.as_deref());
        let owner = marks.owner();
        let result = async {
            let client_was_ours = match self.dynsec.delete_client(&thing_name, owner).await {
                Ok(was_there) => was_there,
                // Not ours: nothing of ours is left under that name, and the role belongs to
                // the client's owner (another Thing's device would lose its ACLs).
                Err(DynsecError::Foreign(_)) => {
                    tracing::warn!(client = %thing_name, "broker client not managed by this Thing, left alone with its role");
                    return Ok(());
                }
                Err(e) => return Err(MosquittoError::dynsec("deleteClient")(e)),
            };
            let role = role_name(&thing_name);
            match self
                .dynsec
                .delete_role(&role, owner, client_was_ours)
                .await
            {
                Ok(()) => Ok(()),
                Err(DynsecError::ForeignRole(_)) => {
                    tracing::warn!(%role, "role not managed by this Thing, left alone");
                    Ok(())
                }
                Err(e) => Err(MosquittoError::dynsec("deleteRole")(e)),
            }
        }
        .await;
        self.count_call("cleanup", &result);
        result?;
        self.registry.lock().remove(&req.key());
        self.feed.thing_removed(req.namespace, req.name);
        Ok(())
    }

    /// Notifications of a spec change (delta, documents) go out at QoS 1: unlike replies, the
    /// device did not ask and cannot repeat them.
    async fn publish(&self, topic: String, payload: Vec<u8>) {
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            tracing::warn!(error = %e, "shadow notification not queued");
        }
    }
}

/// Copies the shadow's snapshot into status; returns the `InSync` message.
fn copy_snapshot(snapshot: Snapshot, status: &mut ThingStatus) -> String {
    let pending: Vec<String> = snapshot.delta.keys().cloned().collect();
    status.reported = (!snapshot.reported.is_empty()).then_some(JsonObject(snapshot.reported));
    status.delta = (!snapshot.delta.is_empty()).then_some(JsonObject(snapshot.delta));
    status.version = Some(snapshot.version);
    status.last_reported_time = snapshot.last_reported;
    if pending.is_empty() {
        "desired state published; the device reported all of it".to_string()
    } else {
        format!(
            "desired state published; waiting for the device to report: {}",
            pending.join(", ")
        )
    }
}
