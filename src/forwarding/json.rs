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

/// Folds the merge patch `newer` into `pending`, a merge patch not yet written, so that writing
/// `pending` does what writing both in turn would (later wins).
///
/// Objects merge key by key, as in RFC 7386, except that a null is kept rather than applied:
/// `pending` is itself sent as a merge patch (to `spec.desired`, or to the shadow), and the null
/// must reach the target Thing to delete the key there. Anything else in `newer` replaces what
/// `pending` has, nulls inside included. That is why this is not `json_patch::merge`, which
/// applies a patch to a document and so drops every null.
///
/// One sequence a single merge patch cannot express: a key deleted and then set to an object in
/// the same write interval is written as that object merged over the target's old value.
pub fn coalesce(pending: &mut Value, newer: &Value) {
    match (pending, newer) {
        (Value::Object(pending), Value::Object(newer)) => {
            for (key, value) in newer {
                if value.is_null() {
                    pending.insert(key.clone(), Value::Null);
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
    fn coalescing_merges_objects_and_keeps_deletions() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}});
        coalesce(&mut t, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
        assert_eq!(t, json!({"a": null, "b": {"c": 5, "d": 3}, "e": [1]}));
        // A deletion alone, with nothing pending, still reaches the target.
        let mut t = json!({});
        coalesce(&mut t, &json!({"gone": null}));
        assert_eq!(t, json!({"gone": null}));
        // Set again after the deletion: the later value wins.
        coalesce(&mut t, &json!({"gone": 7}));
        assert_eq!(t, json!({"gone": 7}));
    }

    #[test]
    fn writing_the_coalesced_patch_equals_writing_each_in_turn() {
        let target = json!({"a": 1, "b": {"c": 2, "d": 3}, "keep": true});
        let patches = [
            json!({"a": 5, "b": {"c": null}}),
            json!({"a": null, "b": {"e": 1}}),
            json!({"f": {"g": 1, "h": null}}),
        ];
        let mut in_turn = target.clone();
        let mut pending = json!({});
        for p in &patches {
            json_patch::merge(&mut in_turn, p);
            coalesce(&mut pending, p);
        }
        let mut at_once = target;
        json_patch::merge(&mut at_once, &pending);
        assert_eq!(at_once, in_turn);
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
