//! The JSON Merge Patch (RFC 7386) that turns one document into another: what the operator
//! sends wherever a backend or the API server merges key by key (AWS shadow desired state,
//! Azure twin tags and desired properties, object status). Pure.

use serde_json::{Map, Value};

/// The patch turning `have` into `want`: changed keys set, nested objects diffed key by key,
/// removed keys nulled (a merge keeps any key the patch leaves out). Empty when they are equal.
/// A `null` inside `want` cannot be expressed (in a merge patch it deletes); callers' documents
/// hold none.
pub fn diff(have: Option<&Map<String, Value>>, want: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    if let Some(have) = have {
        for k in have.keys() {
            if !want.contains_key(k) {
                patch.insert(k.clone(), Value::Null);
            }
        }
    }
    for (k, v) in want {
        match (have.and_then(|h| h.get(k)), v) {
            (Some(old), new) if old == new => {}
            (Some(Value::Object(old)), Value::Object(new)) => {
                let inner = diff(Some(old), new);
                if !inner.is_empty() {
                    patch.insert(k.clone(), Value::Object(inner));
                }
            }
            _ => {
                patch.insert(k.clone(), v.clone());
            }
        }
    }
    patch
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn patch_sets_changes_and_nulls_removed_keys() {
        let have = map(json!({"a": 1, "b": 2, "n": {"x": 1, "y": 2}}));
        let want = map(json!({"a": 1, "c": 3, "n": {"x": 5}}));
        let p = diff(Some(&have), &want);
        assert_eq!(
            Value::Object(p),
            json!({"b": null, "c": 3, "n": {"x": 5, "y": null}})
        );
        assert!(diff(Some(&want), &want).is_empty());
        assert_eq!(
            Value::Object(diff(None, &want)),
            Value::Object(want.clone())
        );
    }

    #[test]
    fn applying_the_patch_gives_the_wanted_document() {
        let have = json!({"conditions": [{"type": "Ready"}], "reported": {"t": 1, "gone": {"x": 1}}, "v": 1});
        let want = json!({"conditions": [{"type": "Ready"}, {"type": "InSync"}], "reported": {"t": 2, "new": [1]}, "v": 2});
        let patch = diff(have.as_object(), want.as_object().unwrap());
        let mut patched = have.clone();
        json_patch::merge(&mut patched, &Value::Object(patch));
        assert_eq!(patched, want);
    }
}
