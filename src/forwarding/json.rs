//! Pure JSON edits the forwarding tasks share: placing a value at a JSON pointer (an Observer's
//! selected fields, a sink's or Subscriber's `path`) and coalescing merge patches (a
//! Subscriber's pending messages). No I/O.

use serde_json::{Map, Value};

/// Sets `value` at `pointer` inside `target`, creating objects on the way (and replacing
/// non-objects in the way: the pointer decides the shape).
pub fn set_pointer(target: &mut Value, pointer: &str, value: Value) {
    if pointer.is_empty() {
        *target = value;
        return;
    }
    let mut current = target;
    let segments: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect();
    for (i, seg) in segments.iter().enumerate() {
        if !current.is_object() {
            *current = Value::Object(Map::new());
        }
        let Value::Object(map) = current else { return };
        if i == segments.len() - 1 {
            map.insert(seg.clone(), value);
            return;
        }
        current = map
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// Folds the merge patch `newer` into `pending`, a merge patch not yet written (later wins).
///
/// Where both sides hold an object this is RFC 7386: keys merge, a null removes the key.
/// Anywhere else `newer` is taken as it is, nulls inside included. That is why this is not
/// `json_patch::merge`, which turns a null inside a new subtree into nothing: `pending` is
/// itself sent as a merge patch (to `spec.desired`, or to the shadow), and a null kept there
/// still deletes that key in the target Thing.
pub fn coalesce(pending: &mut Value, newer: &Value) {
    match (pending, newer) {
        (Value::Object(pending), Value::Object(newer)) => {
            for (key, value) in newer {
                if value.is_null() {
                    pending.remove(key);
                } else {
                    coalesce(pending.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (pending, newer) => *pending = newer.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_pointer_unescapes_and_creates_objects() {
        let mut v = json!({});
        set_pointer(&mut v, "/a~1b/c~0d", json!(1));
        assert_eq!(v, json!({"a/b": {"c~d": 1}}));
        let mut v = json!({"a": 3});
        set_pointer(&mut v, "/a/b", json!(1));
        assert_eq!(v, json!({"a": {"b": 1}}));
        set_pointer(&mut v, "", json!([1]));
        assert_eq!(v, json!([1]));
    }

    #[test]
    fn coalescing_objects_follows_rfc7386() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}});
        coalesce(&mut t, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
        assert_eq!(t, json!({"b": {"c": 5, "d": 3}, "e": [1]}));
    }

    #[test]
    fn a_new_subtree_keeps_its_nulls_so_the_write_still_deletes() {
        let mut t = json!({"a": 1});
        coalesce(&mut t, &json!({"b": {"gone": null, "c": 2}}));
        assert_eq!(t, json!({"a": 1, "b": {"gone": null, "c": 2}}));
        // What json_patch::merge would have made of it: the deletion lost.
        let mut rfc = json!({"a": 1});
        json_patch::merge(&mut rfc, &json!({"b": {"gone": null, "c": 2}}));
        assert_eq!(rfc, json!({"a": 1, "b": {"c": 2}}));
    }
}
