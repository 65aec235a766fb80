//! Shadow sync: `spec.desired` to the shadow's desired state when they differ; the shadow's
//! reported state, delta, version and time into status. Status fields are only assigned when
//! their value changes, so an idle Thing produces no status write.

use crate::failpoints::step;
use aws_smithy_types::Blob;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::{
    client::{AwsClients, Family},
    error::{AwsError, CallError},
};
use crate::api::{JsonObject, ThingStatus};

/// What the provider learnt from one sync.
#[derive(Debug, Default, PartialEq)]
pub struct SyncResult {
    /// The desired state was written to the shadow in this sync.
    pub pushed: bool,
    /// The shadow was read (or, for a thing created just now, is known) in this sync: the
    /// document, `None` when there is no shadow.
    pub read: Option<Option<Value>>,
}

async fn get(
    c: &AwsClients,
    thing_name: &str,
    shadow: Option<&str>,
) -> Result<Option<Value>, AwsError> {
    let res = c
        .call(Family::Shadow, "GetThingShadow", || {
            c.data
                .get_thing_shadow()
                .thing_name(thing_name)
                .set_shadow_name(shadow.map(str::to_string))
                .send()
        })
        .await;
    match res {
        Ok(out) => {
            let bytes = out
                .payload()
                .map(|b| b.as_ref().to_vec())
                .unwrap_or_default();
            let doc = serde_json::from_slice(&bytes).map_err(AwsError::InvalidShadowDocument)?;
            Ok(Some(doc))
        }
        Err(CallError::NotFound) => Ok(None),
        Err(e) => Err(e.into_error("GetThingShadow")),
    }
}

fn object_at<'a>(doc: &'a Value, path: &[&str]) -> Option<&'a Map<String, Value>> {
    let mut cur = doc;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_object()
}

/// Latest `timestamp` among the metadata leaves of the reported state.
fn latest_timestamp(v: &Value) -> Option<i64> {
    match v {
        Value::Object(m) => {
            let own = m.get("timestamp").and_then(Value::as_i64);
            m.iter()
                .filter(|(k, _)| k.as_str() != "timestamp")
                .filter_map(|(_, v)| latest_timestamp(v))
                .chain(own)
                .max()
        }
        Value::Array(a) => a.iter().filter_map(latest_timestamp).max(),
        _ => None,
    }
}

fn set_if_changed<T: PartialEq>(slot: &mut Option<T>, value: Option<T>) {
    if *slot != value {
        *slot = value;
    }
}

/// Copies reported, delta, version and time from a shadow document into status.
pub fn apply_to_status(doc: Option<&Value>, status: &mut ThingStatus) {
    let reported = doc
        .and_then(|d| object_at(d, &["state", "reported"]))
        .map(|m| JsonObject(m.clone()));
    let delta = doc
        .and_then(|d| object_at(d, &["state", "delta"]))
        .map(|m| JsonObject(m.clone()));
    let version = doc.and_then(|d| d.get("version")).and_then(Value::as_i64);
    let time: Option<DateTime<Utc>> = doc
        .and_then(|d| d.pointer("/metadata/reported"))
        .and_then(latest_timestamp)
        .and_then(|t| DateTime::from_timestamp(t, 0));
    set_if_changed(&mut status.reported, reported);
    set_if_changed(&mut status.delta, delta);
    set_if_changed(&mut status.version, version);
    set_if_changed(&mut status.last_reported_time, time);
}

/// One sync. `desired = None` leaves the shadow's desired state alone (not managed). `fresh`:
/// CreateThing answered for the thing in this reconcile, so it most likely has no shadow; the
/// desired state is written without a read before, and without one after when the answer shows
/// it was the shadow's first version (nothing is reported yet, so the delta is the whole desired
/// state); the next poll reads the whole document. `known`: a document the push
/// channel delivered, which stands in for the read.
pub async fn sync(
    c: &AwsClients,
    thing_name: &str,
    shadow: Option<&str>,
    desired: Option<&JsonObject>,
    fresh: bool,
    known: Option<Value>,
    status: &mut ThingStatus,
) -> Result<SyncResult, AwsError> {
    let mut result = SyncResult::default();
    let mut doc = match (fresh, known) {
        (true, _) => None,
        (false, Some(doc)) => Some(doc),
        (false, None) => {
            let doc = get(c, thing_name, shadow).await?;
            result.read = Some(doc.clone());
            doc
        }
    };
    if let Some(want) = desired {
        let have = doc
            .as_ref()
            .and_then(|d| object_at(d, &["state", "desired"]));
        let patch = crate::merge_patch::diff(have, &want.0);
        if !patch.is_empty() {
            let payload = json!({"state": {"desired": Value::Object(patch)}})
                .to_string()
                .into_bytes();
            step!("aws-before-update-shadow");
            let answer = c
                .call(Family::Shadow, "UpdateThingShadow", || {
                    c.data
                        .update_thing_shadow()
                        .thing_name(thing_name)
                        .set_shadow_name(shadow.map(str::to_string))
                        .payload(Blob::new(payload.clone()))
                        .send()
                })
                .await
                .map_err(|e| e.into_error("UpdateThingShadow"))?;
            result.pushed = true;
            doc = match fresh
                .then(|| fresh_document(&want.0, answer.payload()))
                .flatten()
            {
                Some(doc) => Some(doc),
                // The update's answer lacks reported and delta: read the whole document back.
                None => get(c, thing_name, shadow).await?,
            };
            result.read = Some(doc.clone());
        }
    }
    if fresh && result.read.is_none() {
        // Nothing managed to write: nothing can have been reported to a thing created just now
        // (after an interrupted run, the next poll reads what was).
        result.read = Some(doc.clone());
    }
    apply_to_status(doc.as_ref(), status);
    Ok(result)
}

/// The document of a shadow that `desired` was the first write to: nothing reported, the
/// delta is the whole desired state. `None` unless the update's answer says version 1: a later
/// version means the shadow existed before (the thing is left from an interrupted run, whose
/// CreateThing AWS answers like a new one, or the shadow outlived an earlier thing of that
/// name), so it has to be read.
fn fresh_document(
    desired: &serde_json::Map<String, Value>,
    answer: Option<&aws_smithy_types::Blob>,
) -> Option<Value> {
    let version = answer
        .and_then(|b| serde_json::from_slice::<Value>(b.as_ref()).ok())
        .and_then(|d| d.get("version").and_then(Value::as_i64))?;
    (version == 1).then(|| json!({"state": {"desired": desired, "delta": desired}, "version": 1}))
}

/// Deletes the shadow (teardown); a missing shadow is fine.
pub async fn delete(
    c: &AwsClients,
    thing_name: &str,
    shadow: Option<&str>,
) -> Result<(), AwsError> {
    let res = c
        .call(Family::Shadow, "DeleteThingShadow", || {
            c.data
                .delete_thing_shadow()
                .thing_name(thing_name)
                .set_shadow_name(shadow.map(str::to_string))
                .send()
        })
        .await;
    match res {
        Ok(_) | Err(CallError::NotFound) => Ok(()),
        Err(e) => Err(e.into_error("DeleteThingShadow")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gets_reported_delta_version_time() {
        let doc = json!({
            "state": {"desired": {"t": 26}, "reported": {"t": 24}, "delta": {"t": 26}},
            "metadata": {"reported": {"t": {"timestamp": 1700000100}}, "desired": {"t": {"timestamp": 1700000200}}},
            "version": 7
        });
        let mut s = ThingStatus::default();
        apply_to_status(Some(&doc), &mut s);
        assert_eq!(s.version, Some(7));
        assert_eq!(s.reported.as_ref().unwrap().0["t"], 24);
        assert_eq!(s.delta.as_ref().unwrap().0["t"], 26);
        assert_eq!(s.last_reported_time.unwrap().timestamp(), 1700000100);
        let before = s.clone();
        apply_to_status(Some(&doc), &mut s);
        assert_eq!(s, before);
    }
}
