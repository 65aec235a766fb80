//! The twin, pure: IoT Hub's rules for twin documents (key grammar, depth, size), the patch that
//! brings tags and desired properties to the spec, and what of the twin goes into status.
//!
//! - Tags mirror `spec.attributes` plus the owner record ([`OWNER_TAG`]); a tag the spec no
//!   longer has is removed (set to null, IoT Hub's way of deleting in a merge patch).
//! - Desired properties follow `spec.desired` key by key, nulls in the spec count as absent (a
//!   null would delete the key on the hub and be "missing" again at the next read: a write per
//!   poll forever).
//! - Reported properties and their `$version` go into status only when `$version` moved, so an
//!   idle device causes no status write and no Observer update.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::client::Twin;
use crate::{
    api::{JsonObject, ThingStatus},
    merge_patch::diff,
};

/// The tag that names a device's owner (`<namespace>/<name>/<uid>`), the same record and key
/// as the AWS backend's owner attribute.
pub use crate::api::validation::OWNER_ATTRIBUTE as OWNER_TAG;

/// IoT Hub's twin limits: each of tags, desired and reported at most 32 KB, objects nested at
/// most 10 deep, keys at most 1 KB.
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
pub const MAX_DEPTH: usize = 10;
pub const MAX_KEY_BYTES: usize = 1024;

/// Why `key` cannot be a twin key, if it cannot: no `.`, `$`, space or control characters.
fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("is empty")
    } else if key.len() > MAX_KEY_BYTES {
        Some("is longer than 1 KB")
    } else if key.contains(['.', '$', ' ']) {
        Some("contains '.', '$' or a space")
    } else if key.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    }
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn collect_key_problems(path: &str, v: &Value, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, inner) in m {
            let here = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            if let Some(why) = key_problem(k) {
                out.push(format!(
                    "{what} key {k:?} {why}",
                    what = if path.is_empty() {
                        "top-level"
                    } else {
                        "nested"
                    }
                ));
            }
            collect_key_problems(&here, inner, out);
        }
    }
}

/// Every reason `section` (named `what`) cannot be a twin section.
pub fn check_section(what: &str, section: &Map<String, Value>) -> Vec<String> {
    let value = Value::Object(section.clone());
    let mut problems = Vec::new();
    let mut keys = Vec::new();
    collect_key_problems("", &value, &mut keys);
    problems.extend(keys.into_iter().map(|p| format!("{what}: {p}")));
    if depth(&value) > MAX_DEPTH {
        problems.push(format!("{what}: nested deeper than {MAX_DEPTH} levels"));
    }
    let size = value.to_string().len();
    if size > MAX_SECTION_BYTES {
        problems.push(format!(
            "{what}: {size} bytes, over IoT Hub's twin limit of {MAX_SECTION_BYTES}"
        ));
    }
    problems
}

/// `v` without null members (recursively).
fn without_nulls(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Value::Object(inner) => (k.clone(), Value::Object(without_nulls(inner))),
            _ => (k.clone(), v.clone()),
        })
        .collect()
}

/// A section without IoT Hub's own members (`$version`, `$metadata`).
pub fn user_part(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The desired properties the spec asks for.
pub fn wanted_desired(desired: Option<&JsonObject>) -> Map<String, Value> {
    desired.map(|d| without_nulls(&d.0)).unwrap_or_default()
}

/// The tags the spec asks for: its attributes and the owner record.
pub fn wanted_tags(
    attributes: &std::collections::BTreeMap<String, String>,
    owner: &str,
) -> Map<String, Value> {
    let mut tags: Map<String, Value> = attributes
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    tags.insert(OWNER_TAG.to_string(), Value::String(owner.to_string()));
    tags
}

/// The twin PATCH body that brings tags and desired properties to the spec; `None`: nothing to do.
pub fn twin_patch(
    twin: &Twin,
    tags: &Map<String, Value>,
    desired: &Map<String, Value>,
) -> Option<Value> {
    let tag_patch = diff(Some(&twin.tags), tags);
    let desired_patch = diff(Some(&user_part(&twin.properties.desired)), desired);
    if tag_patch.is_empty() && desired_patch.is_empty() {
        return None;
    }
    let mut body = Map::new();
    if !tag_patch.is_empty() {
        body.insert("tags".into(), Value::Object(tag_patch));
    }
    if !desired_patch.is_empty() {
        body.insert("properties".into(), json!({ "desired": desired_patch }));
    }
    Some(Value::Object(body))
}

fn set_if_changed<T: PartialEq>(slot: &mut Option<T>, value: Option<T>) {
    if *slot != value {
        *slot = value;
    }
}

/// The newest `$lastUpdated` in a `$metadata` tree.
fn last_updated(metadata: Option<&Value>) -> Option<DateTime<Utc>> {
    fn walk(v: &Value, best: &mut Option<DateTime<Utc>>) {
        if let Value::Object(m) = v {
            for (k, inner) in m {
                if k == "$lastUpdated"
                    && let Some(t) = inner
                        .as_str()
                        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                {
                    let t = t.with_timezone(&Utc);
                    if best.is_none_or(|b| t > b) {
                        *best = Some(t);
                    }
                }
                walk(inner, best);
            }
        }
    }
    let mut best = None;
    if let Some(m) = metadata {
        walk(m, &mut best);
    }
    best
}

/// Desired keys whose reported value differs (what the device has not caught up with).
pub fn pending(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    desired
        .iter()
        .filter(|(k, v)| reported.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Copies reported properties, `$version` and the pending delta into status, when the reported
/// `$version` moved (or status has none yet) or the desired state changed. Returns whether
/// the reported state changed.
pub fn apply_to_status(
    twin: &Twin,
    desired: &Map<String, Value>,
    status: &mut ThingStatus,
) -> bool {
    let reported_all = &twin.properties.reported;
    let version = reported_all.get("$version").and_then(Value::as_i64);
    let reported = user_part(reported_all);
    let delta = pending(desired, &reported);
    set_if_changed(
        &mut status.delta,
        (!delta.is_empty()).then_some(JsonObject(delta)),
    );
    if version.is_some() && status.version == version {
        return false;
    }
    set_if_changed(
        &mut status.reported,
        (!reported.is_empty()).then_some(JsonObject(reported)),
    );
    set_if_changed(&mut status.version, version);
    let updated = last_updated(reported_all.get("$metadata"));
    if updated.is_some() {
        set_if_changed(&mut status.last_reported_time, updated);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn twin_rules_are_those_iot_hub_documents() {
        assert!(check_section("desired", &obj(json!({"temp": 1, "a": {"b_c-d": [1]}}))).is_empty());
        let bad = check_section("desired", &obj(json!({"a.b": 1, "x": {"$y": 1, "s p": 2}})));
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[0].contains("\"a.b\""));
        let mut deep = json!(1);
        for _ in 0..11 {
            deep = json!({ "k": deep });
        }
        let p = check_section("desired", &obj(deep));
        assert!(p.iter().any(|m| m.contains("deeper than 10")), "{p:?}");
        let big = obj(json!({ "blob": "x".repeat(MAX_SECTION_BYTES) }));
        assert!(check_section("tags", &big)[0].contains("over IoT Hub's twin limit"));
    }

    #[test]
    fn the_patch_is_empty_when_the_twin_already_matches_and_removes_what_the_spec_dropped() {
        let twin = Twin {
            tags: obj(json!({"model": "rpi3", OWNER_TAG: "ns/a/u", "gone": "x"})),
            properties: crate::provider::azure::client::TwinProperties {
                desired: obj(json!({"temp": 20, "old": 1, "$version": 4, "$metadata": {}})),
                reported: Map::new(),
            },
            ..Twin::default()
        };
        let tags = wanted_tags(
            &[("model".to_string(), "rpi4".to_string())].into(),
            "ns/a/u",
        );
        let desired = wanted_desired(Some(&JsonObject(obj(json!({"temp": 26, "nothing": null})))));
        let patch = twin_patch(&twin, &tags, &desired).unwrap();
        assert_eq!(
            patch,
            json!({"tags": {"model": "rpi4", "gone": null}, "properties": {"desired": {"temp": 26, "old": null}}})
        );
        let converged = Twin {
            tags: tags.clone(),
            properties: crate::provider::azure::client::TwinProperties {
                desired: obj(json!({"temp": 26, "$version": 5})),
                reported: Map::new(),
            },
            ..Twin::default()
        };
        assert_eq!(twin_patch(&converged, &tags, &desired), None);
    }

    #[test]
    fn reported_state_reaches_status_only_when_its_version_moves() {
        let mut twin = Twin::default();
        twin.properties.reported = obj(json!({
            "temp": 24, "$version": 7,
            "$metadata": {"$lastUpdated": "2026-01-01T00:00:00Z", "temp": {"$lastUpdated": "2026-01-02T00:00:00Z"}}
        }));
        let desired = obj(json!({"temp": 26}));
        let mut status = ThingStatus::default();
        assert!(apply_to_status(&twin, &desired, &mut status));
        assert_eq!(status.version, Some(7));
        assert_eq!(
            status.reported.as_ref().unwrap().0,
            obj(json!({"temp": 24}))
        );
        assert_eq!(status.delta.as_ref().unwrap().0, obj(json!({"temp": 26})));
        assert_eq!(
            status.last_reported_time.unwrap().to_rfc3339(),
            "2026-01-02T00:00:00+00:00"
        );
        let before = status.clone();
        assert!(!apply_to_status(&twin, &desired, &mut status));
        assert_eq!(status, before);
    }
}
