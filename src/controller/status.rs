//! Status writes: a merge patch of the status subresource holding only what changed, and only
//! when something changed.
//!
//! Not a server-side apply: the API server computes an apply's field sets over the whole object,
//! which made each reported-state write cost it ~5 ms of CPU (a third of a core for the default
//! fleet budget of 50 writes a second). A merge patch of the changed keys (typically `reported`,
//! `version` and `lastReportedTime`) is a fraction of that. Keys the new status drops are sent
//! as nulls; the patch is computed against the status the operator last saw or wrote, and a
//! key it could not know about (a stale cache) shows up in the next reconcile's comparison and is
//! removed then.

use std::{collections::HashMap, sync::Mutex};

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{
    error::{Error, KubeContext, Result},
    metrics::Metrics,
};

pub const FIELD_MANAGER: &str = "thing-operator";

/// The last status this process wrote per object, with the resourceVersion the object had
/// just before that write. A reconcile queued before the write can still read the object from
/// a cache that has not seen it; without this memory it would write the same status again.
///
/// An entry is only useful until the cache shows the object at another resourceVersion (the
/// write, or a later change: a cache never goes back), so the first reconcile that sees one
/// drops it. Memory then holds the writes in flight, not a status per object of the fleet.
#[derive(Default)]
pub struct StatusMemory {
    last: Mutex<HashMap<String, (String, serde_json::Value)>>,
}

impl StatusMemory {
    /// The status written to `key` on top of `resource_version`, if the cache has not seen
    /// that write yet; an entry made on another version is dropped.
    fn unseen(&self, key: &str, resource_version: &str) -> Option<Value> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (rv, written) = last.get(key)?;
        if rv == resource_version {
            return Some(written.clone());
        }
        last.remove(key);
        None
    }

    fn remember(&self, key: String, resource_version: String, status: serde_json::Value) {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (resource_version, status));
    }

    /// The status this process last wrote to the object, when `resource_version` is the one
    /// the object had just before that write: the cache the reconcile read the object from has
    /// not seen the write yet, and the written status (which the API server accepted) is the
    /// newer one. A reconcile triggered by the operator's own writes (the device Secret, the
    /// status) then starts from what it wrote, not from an empty status that would send the
    /// backend through provisioning checks again.
    pub fn unseen_own_write<S: DeserializeOwned>(
        &self,
        key: &str,
        resource_version: &str,
    ) -> Option<S> {
        serde_json::from_value(self.unseen(key, resource_version)?).ok()
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
    // The status the object has now, as far as this process knows: its own last write when the
    // cache has not seen it yet, else the cached one. A repeat of that unseen write makes an
    // empty patch, and nothing is written.
    let base = match memory.unseen(&key, &resource_version) {
        Some(written) => written,
        None => serde_json::to_value(current).map_err(|source| Error::Json {
            context: format!("encoding the current status of {name}"),
            source,
        })?,
    };
    let patch = match (&base, &value) {
        (Value::Object(have), Value::Object(want)) => {
            Value::Object(crate::merge_patch::diff(Some(have), want))
        }
        _ => value.clone(),
    };
    if patch.as_object().is_some_and(|p| p.is_empty()) {
        return Ok(false);
    }
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    api.patch_status(
        &name,
        &params,
        &Patch::Merge(serde_json::json!({ "status": patch })),
    )
    .await
    .kube_context(|| format!("writing status of {} {name}", K::kind(&())))?;
    metrics.count_status_write(&K::kind(&()));
    memory.remember(key, resource_version, value);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_write_stands_in_only_for_the_version_it_was_made_on() {
        let memory = StatusMemory::default();
        let written = serde_json::json!({"version": 3});
        memory.remember("Thing/ns/a".into(), "10".into(), written.clone());
        let seen: Option<serde_json::Value> = memory.unseen_own_write("Thing/ns/a", "10");
        assert_eq!(seen, Some(written.clone()));
        // The cache caught up (or someone else wrote since): its object is the truth.
        let seen: Option<serde_json::Value> = memory.unseen_own_write("Thing/ns/a", "11");
        assert_eq!(seen, None);
        // Seen at another version once, the entry is gone: nothing is kept per object.
        assert!(memory.last.lock().unwrap().is_empty());
        memory.remember("Thing/ns/a".into(), "10".into(), written.clone());
        let seen: Option<serde_json::Value> = memory.unseen_own_write("Thing/ns/b", "10");
        assert_eq!(seen, None);
        memory.forget("Thing/ns/a");
        let seen: Option<serde_json::Value> = memory.unseen_own_write("Thing/ns/a", "10");
        assert_eq!(seen, None);
    }
}
