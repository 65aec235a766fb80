//! Shadows restored from Thing status: the operator keeps Mosquitto shadows in memory only, so
//! after a restart each provisioned Thing's shadow is rebuilt from what its status recorded
//! (reported state, version, time) and its spec (desired state). Done once, when the backend
//! starts (after this replica won the lease, so the status is the last leader's), so reports
//! that arrive before the first reconcile are neither lost nor refused; a Thing the list missed
//! is seeded the same way by its first reconcile.

use kube::{Api, ResourceExt};

use super::{MosquittoProvider, registry::TrackedThing, shadow::Shadow};
use crate::{
    api::{Thing, ThingStatus, thing::Broker},
    provider::ThingKey,
};

impl MosquittoProvider {
    /// Loads the shadows of already provisioned Things from their status.
    pub async fn seed_from(&self, api: Api<Thing>) {
        let list = match api.list(&Default::default()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list Things to restore shadows; the first reconciles will");
                return;
            }
        };
        // Oldest first: when two Things recorded the same device name (a squatter's status
        // written by an operator before names were claimed ahead of recording them), the one
        // that had it first keeps it, whatever order the list comes in.
        let mut items = list.items;
        items.sort_by(|a, b| {
            let created = |t: &Thing| t.metadata.creation_timestamp.clone().map(|c| c.0);
            created(a)
                .cmp(&created(b))
                .then_with(|| a.uid().cmp(&b.uid()))
        });
        let mut registry = self.registry.lock();
        for thing in items {
            if thing.spec.broker != Broker::Mosquitto {
                continue;
            }
            let Some(status) = &thing.status else {
                continue;
            };
            let Some(thing_name) = status.device.as_ref().and_then(|d| d.thing_name.clone()) else {
                continue;
            };
            let key = ThingKey::new(&thing.namespace().unwrap_or_default(), &thing.name_any());
            let mut tracked = TrackedThing::new(
                thing.uid().unwrap_or_default(),
                thing_name,
                seed_shadow(&thing, status),
            );
            tracked.set_labels(thing.labels());
            if !registry.restore(key.clone(), tracked) {
                tracing::warn!(thing = %key, "device name already restored for an older Thing; not tracked");
            }
        }
        tracing::info!(
            things = registry.len(),
            "shadows restored from Thing status"
        );
    }
}

/// A shadow restored from what the Thing's status recorded.
pub(super) fn seed_shadow(thing: &Thing, status: &ThingStatus) -> Shadow {
    Shadow::seed(
        thing.spec.desired.clone().map(|d| d.0).unwrap_or_default(),
        status.reported.clone().map(|r| r.0).unwrap_or_default(),
        status.version.unwrap_or(0),
        status.last_reported_time,
    )
}
