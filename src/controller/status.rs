//! Status writes: server-side apply of the status subresource, only when something changed.

use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    error::{Error, KubeContext, Result},
    metrics::Metrics,
};

pub const FIELD_MANAGER: &str = "thing-operator";

/// Applies `status` to the object's status subresource when it differs from `current`.
/// Returns whether a write happened.
pub async fn apply_if_changed<K, S>(
    api: &Api<K>,
    name: &str,
    current: &S,
    status: &S,
    metrics: &Metrics,
) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if current == status {
        return Ok(false);
    }
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": serde_json::to_value(status).map_err(|source| Error::Json {
            context: format!("encoding status of {name}"),
            source,
        })?,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .kube_context(|| format!("writing status of {} {name}", K::kind(&())))?;
    metrics.count_status_write(&K::kind(&()));
    Ok(true)
}
