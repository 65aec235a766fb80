//! What Observer and Subscriber tasks share: the registry of which task runs for which object
//! (and for which generation of it), and the merge-patch of a task's own status fields.
//!
//! A task is restarted when its object's generation changes (a spec edit) and cancelled when the
//! object goes; both managers used to keep this bookkeeping each on their own.

use std::{collections::HashMap, sync::Mutex};

use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use tokio_util::sync::CancellationToken;

use crate::{api::object_key, metrics::Metrics};

struct Running {
    generation: Option<i64>,
    cancel: CancellationToken,
}

/// The running tasks of one kind, keyed by their object's `namespace/name`.
#[derive(Default)]
pub struct TaskRegistry {
    running: Mutex<HashMap<String, Running>>,
}

impl TaskRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a live task already runs for this generation of the object: then nothing is to
    /// be done (reconciles repeat; a task must not restart on every one).
    pub fn is_current(&self, namespace: &str, name: &str, generation: Option<i64>) -> bool {
        self.lock()
            .get(&object_key(namespace, name))
            .is_some_and(|r| r.generation == generation && !r.cancel.is_cancelled())
    }

    /// Records the task started for `generation`, cancelling the one it replaces.
    pub fn insert(
        &self,
        namespace: &str,
        name: &str,
        generation: Option<i64>,
        cancel: CancellationToken,
    ) {
        let old = self
            .lock()
            .insert(object_key(namespace, name), Running { generation, cancel });
        if let Some(old) = old {
            old.cancel.cancel();
        }
    }

    /// Cancels the object's task, if one runs.
    pub fn stop(&self, namespace: &str, name: &str) {
        if let Some(r) = self.lock().remove(&object_key(namespace, name)) {
            r.cancel.cancel();
        }
    }
}

/// Merge-patches a task's own status fields (counters, memory) into its object. Returns whether
/// the write went through; a failed write is retried by the task's next flush.
pub async fn write_task_status<K>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_is_current_for_its_generation_until_replaced_or_stopped() {
        let tasks = TaskRegistry::default();
        assert!(!tasks.is_current("ns", "a", Some(1)));
        let first = CancellationToken::new();
        tasks.insert("ns", "a", Some(1), first.clone());
        assert!(tasks.is_current("ns", "a", Some(1)));
        assert!(!tasks.is_current("ns", "a", Some(2)));
        assert!(!tasks.is_current("other", "a", Some(1)));
        let second = CancellationToken::new();
        tasks.insert("ns", "a", Some(2), second.clone());
        assert!(first.is_cancelled(), "a replaced task is cancelled");
        assert!(tasks.is_current("ns", "a", Some(2)));
        // A task that ended on its own (cancelled) is not current: the next reconcile restarts it.
        second.cancel();
        assert!(!tasks.is_current("ns", "a", Some(2)));
        let third = CancellationToken::new();
        tasks.insert("ns", "a", Some(2), third.clone());
        tasks.stop("ns", "a");
        assert!(third.is_cancelled());
        assert!(!tasks.is_current("ns", "a", Some(2)));
    }
}
