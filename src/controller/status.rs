//! Status writes: server-side apply of the status subresource, only when something changed.

use std::{collections::HashMap, sync::Mutex};

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    error::{Error, KubeContext, Result},
    metrics::Metrics,
};

pub const FIELD_MANAGER: &str = "thing-operator";

/// The last status this process wrote per object, with the resourceVersion the object had
/// just before that write. A reconcile queued before the write can still read the object from
/// a cache that has not seen it; without this memory it would write the same status again.
#[derive(Default)]
pub struct StatusMemory {
    last: Mutex<HashMap<String, (String, serde_json::Value)>>,
}

impl StatusMemory {
    fn is_stale_repeat(
        &self,
        key: &str,
        resource_version: &str,
        status: &serde_json::Value,
    ) -> bool {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.get(key)
            .is_some_and(|(rv, written)| rv == resource_version && written == status)
    }

    fn remember(&self, key: String, resource_version: String, status: serde_json::Value) {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (resource_version, status));
    }

    /// Forgets a deleted object.
    pub fn forget(&self, key: &str) {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// Applies `status` to the status subresource of `obj` when it differs from `current` (and is
/// not a repeat of our own write that the cache has not caught up with). Returns whether a
/// write happened.
pub async fn apply_if_changed<K, S>(
    api: &Api<K>,
    obj: &K,
    current: &S,
    status: &S,
    metrics: &Metrics,
    memory: &StatusMemory,
) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if current == status {
        return Ok(false);
    }
    let name = obj.name_any();
    let key = super::object_key(obj);
    let value = serde_json::to_value(status).map_err(|source| Error::Json {
        context: format!("encoding status of {name}"),
        source,
    })?;
    let resource_version = obj.resource_version().unwrap_or_default();
    if memory.is_stale_repeat(&key, &resource_version, &value) {
        return Ok(false);
    }
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": value,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .kube_context(|| format!("writing status of {} {name}", K::kind(&())))?;
    metrics.count_status_write(&K::kind(&()));
    memory.remember(key, resource_version, value);
    Ok(true)
}
