//! Writing into a Thing's `spec.desired`: what an Observer's `thing` sink and a Subscriber with
//! `target.field: Desired` both do. A JSON merge patch, so it changes only the keys it names
//! and a null deletes; the Thing controller takes it from there like any user edit.
//!
//! Git owns the same field (docs/operations.md, "GitOps"): writing only the keys a message
//! carries, under a field manager of its own, is what lets a GitOps tool re-apply the Thing's
//! manifest without removing them and lets users tell the operator's keys apart in
//! `managedFields` (e.g. for Argo CD's `managedFieldsManagers`).

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::api::{JsonObject, Thing};

/// The field manager of every write into `spec.desired`.
pub const DESIRED_FIELD_MANAGER: &str = "thing-operator-desired";

/// Merge-patches `desired` into the `spec.desired` of Thing `name`; returns the desired
/// document the write left (what the provenance of the write is recorded against).
pub async fn merge_into_desired(
    things: &Api<Thing>,
    name: &str,
    desired: Value,
) -> Result<JsonObject, kube::Error> {
    things
        .patch(
            name,
            &PatchParams {
                field_manager: Some(DESIRED_FIELD_MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({"spec": {"desired": desired}})),
        )
        .await
        .map(|thing| thing.spec.desired.unwrap_or_default())
}

/// Whether the API server refused the patch itself (400, 422: invalid, too deep, over a
/// limit): sending the same patch again can never succeed.
pub fn refused(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 400 || s.code == 422)
}
