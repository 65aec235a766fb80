//! Events brought to Things: the in-memory state stream ([`bus`]), Observer filters
//! ([`filter`]), destinations ([`sink`]) and the tasks that connect them ([`observers`]).

pub mod bus;
pub mod filter;
pub mod observers;
pub mod sink;
pub mod subscribers;

pub use bus::{StateBus, ThingUpdate};
pub use observers::ObserverManager;
pub use subscribers::SubscriberManager;

use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};

use crate::metrics::Metrics;

/// Merge-patches a task's own status fields (counters, memory) into its object. Returns whether
/// the write went through; a failed write is retried by the task's next flush.
pub(crate) async fn write_task_status<K>(
    api: &Api<K>,
    name: &str,
    status: serde_json::Value,
    metrics: &Metrics,
) -> bool
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({ "status": status });
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {
            metrics.count_status_write(&K::kind(&()));
            true
        }
        Err(e) => {
            tracing::debug!(kind = %K::kind(&()), %name, error = %e, "status flush failed; retrying later");
            false
        }
    }
}
