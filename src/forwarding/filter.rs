//! Observer filters: which Things an Observer watches, which of their updates pass, and what it
//! remembers between them. Pure functions; the memory is what survives a restart (kept in the
//! Observer's status).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::json::set_pointer;
use crate::api::{
    JsonObject, ThingUpdate,
    observer::{FilterSpec, ThingSelector},
};

/// Last forwarded value per JSON pointer (`""` stands for the whole section).
pub type Memory = BTreeMap<String, Value>;

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Skip,
    /// Forward `data`, and remember `memory` from now on.
    Forward {
        data: Value,
        memory: Memory,
    },
}

/// Numbers move "by more than `threshold`"; anything else passes when it differs.
fn moved(old: Option<&Value>, new: &Value, threshold: Option<f64>) -> bool {
    let Some(old) = old else { return true };
    match (threshold, old.as_f64(), new.as_f64()) {
        (Some(t), Some(a), Some(b)) => (b - a).abs() > t,
        _ => old != new,
    }
}

/// The memories of an Observer as `status.lastForwarded` keeps them: per Thing, JSON pointer to
/// last forwarded value.
pub fn memories_from_status(saved: BTreeMap<String, JsonObject>) -> BTreeMap<String, Memory> {
    saved
        .into_iter()
        .map(|(thing, m)| (thing, m.0.into_iter().collect()))
        .collect()
}

/// The inverse of [`memories_from_status`].
pub fn memories_to_status(memories: &BTreeMap<String, Memory>) -> BTreeMap<String, JsonObject> {
    memories
        .iter()
        .map(|(thing, m)| (thing.clone(), JsonObject(m.clone().into_iter().collect())))
        .collect()
}

/// Whether an Observer in `namespace` watching `selector` watches the Thing of `update`: only
/// Things of its own namespace, by name or by all of the labels.
pub fn selects(selector: &ThingSelector, namespace: &str, update: &ThingUpdate) -> bool {
    if update.namespace != namespace {
        return false;
    }
    match (&selector.thing_name, &selector.match_labels) {
        (Some(name), _) => &update.name == name,
        (None, Some(labels)) => labels.iter().all(|(k, v)| update.labels.get(k) == Some(v)),
        // Refused by the schema (exactly one must be set); selects nothing if it gets through.
        (None, None) => false,
    }
}

/// Decides whether the current `section` passes `filter`, given what was forwarded last.
pub fn evaluate(
    filter: Option<&FilterSpec>,
    section: Option<&JsonObject>,
    memory: &Memory,
) -> Decision {
    let whole = Value::Object(section.map(|s| s.0.clone()).unwrap_or_default());
    let fields = filter.map(|f| f.fields.as_slice()).unwrap_or_default();
    if fields.is_empty() {
        if memory.get("") == Some(&whole) {
            return Decision::Skip;
        }
        return Decision::Forward {
            data: whole.clone(),
            memory: Memory::from([(String::new(), whole)]),
        };
    }
    let threshold = filter.and_then(|f| f.changed_by);
    let present: Vec<(&String, &Value)> = fields
        .iter()
        .filter_map(|p| whole.pointer(p).map(|v| (p, v)))
        .collect();
    if !present
        .iter()
        .any(|(p, v)| moved(memory.get(*p), v, threshold))
    {
        return Decision::Skip;
    }
    let mut data = Value::Object(Map::new());
    let mut next = memory.clone();
    for (pointer, value) in present {
        set_pointer(&mut data, pointer, value.clone());
        next.insert(pointer.clone(), value.clone());
    }
    Decision::Forward { data, memory: next }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> JsonObject {
        serde_json::from_value(v).unwrap()
    }

    fn filter(fields: &[&str], changed_by: Option<f64>) -> FilterSpec {
        FilterSpec {
            fields: fields.iter().map(|s| s.to_string()).collect(),
            changed_by,
            ..Default::default()
        }
    }

    fn forward(d: Decision) -> (Value, Memory) {
        match d {
            Decision::Forward { data, memory } => (data, memory),
            Decision::Skip => panic!("expected forward"),
        }
    }

    #[test]
    fn without_filter_every_change_passes_once() {
        let s = obj(json!({"temp": 20}));
        let (data, mem) = forward(evaluate(None, Some(&s), &Memory::new()));
        assert_eq!(data, json!({"temp": 20}));
        assert_eq!(evaluate(None, Some(&s), &mem), Decision::Skip);
        assert!(matches!(
            evaluate(None, Some(&obj(json!({"temp": 21}))), &mem),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn changed_by_compares_with_the_last_forwarded_value_not_the_last_seen() {
        let f = filter(&["/temp"], Some(2.0));
        let (_, mem) = forward(evaluate(
            Some(&f),
            Some(&obj(json!({"temp": 20}))),
            &Memory::new(),
        ));
        // 21 and 22 are each within 2 of 20 (the last forwarded): no forward, memory stays 20.
        assert_eq!(
            evaluate(Some(&f), Some(&obj(json!({"temp": 21}))), &mem),
            Decision::Skip
        );
        assert_eq!(
            evaluate(Some(&f), Some(&obj(json!({"temp": 22}))), &mem),
            Decision::Skip
        );
        let (data, mem) = forward(evaluate(Some(&f), Some(&obj(json!({"temp": 22.5}))), &mem));
        assert_eq!(data, json!({"temp": 22.5}));
        assert_eq!(mem["/temp"], json!(22.5));
        let (_, _) = forward(evaluate(Some(&f), Some(&obj(json!({"temp": 20.4}))), &mem));
    }

    #[test]
    fn fields_select_nested_values_and_ignore_other_changes() {
        let f = filter(&["/env/temp", "/mode"], None);
        let s = obj(json!({"env": {"temp": 20, "hum": 40}, "mode": "eco", "other": 1}));
        let (data, mem) = forward(evaluate(Some(&f), Some(&s), &Memory::new()));
        assert_eq!(data, json!({"env": {"temp": 20}, "mode": "eco"}));
        let s2 = obj(json!({"env": {"temp": 20, "hum": 99}, "mode": "eco", "other": 2}));
        assert_eq!(evaluate(Some(&f), Some(&s2), &mem), Decision::Skip);
        let s3 = obj(json!({"env": {"temp": 20}, "mode": "boost"}));
        assert!(matches!(
            evaluate(Some(&f), Some(&s3), &mem),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn non_numeric_values_with_changed_by_pass_when_they_differ() {
        let f = filter(&["/state"], Some(5.0));
        let (_, mem) = forward(evaluate(
            Some(&f),
            Some(&obj(json!({"state": "on"}))),
            &Memory::new(),
        ));
        assert_eq!(
            evaluate(Some(&f), Some(&obj(json!({"state": "on"}))), &mem),
            Decision::Skip
        );
        assert!(matches!(
            evaluate(Some(&f), Some(&obj(json!({"state": "off"}))), &mem),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn missing_fields_do_not_pass() {
        let f = filter(&["/temp"], None);
        assert_eq!(
            evaluate(Some(&f), Some(&obj(json!({"x": 1}))), &Memory::new()),
            Decision::Skip
        );
        assert_eq!(evaluate(Some(&f), None, &Memory::new()), Decision::Skip);
    }

    #[test]
    fn memories_survive_the_round_trip_through_status() {
        let memories = BTreeMap::from([
            (
                "lamp".to_string(),
                Memory::from([("/temp".to_string(), json!(20.5))]),
            ),
            (
                "fan".to_string(),
                Memory::from([(String::new(), json!({"on": true}))]),
            ),
        ]);
        let saved = memories_to_status(&memories);
        assert_eq!(saved["lamp"], obj(json!({"/temp": 20.5})));
        assert_eq!(memories_from_status(saved), memories);
    }

    #[test]
    fn an_observer_selects_by_name_or_by_every_label_in_its_own_namespace() {
        let update = |ns: &str, name: &str, labels: &[(&str, &str)]| ThingUpdate {
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            desired: None,
            reported: None,
            delta: None,
            version: None,
            time: chrono::Utc::now(),
        };
        let by_name = ThingSelector {
            thing_name: Some("lamp".into()),
            match_labels: None,
        };
        let by_labels = ThingSelector {
            thing_name: None,
            match_labels: Some(BTreeMap::from([
                ("room".to_string(), "hall".to_string()),
                ("kind".to_string(), "light".to_string()),
            ])),
        };
        let lamp = update(
            "ns",
            "lamp",
            &[("room", "hall"), ("kind", "light"), ("x", "y")],
        );
        assert!(selects(&by_name, "ns", &lamp));
        assert!(selects(&by_labels, "ns", &lamp));
        assert!(
            !selects(&by_name, "other", &lamp),
            "never across namespaces"
        );
        assert!(
            !selects(&by_labels, "other", &lamp),
            "never across namespaces"
        );
        assert!(!selects(&by_name, "ns", &update("ns", "lamp2", &[])));
        assert!(!selects(
            &by_labels,
            "ns",
            &update("ns", "fan", &[("room", "hall")])
        ));
        assert!(!selects(&ThingSelector::default(), "ns", &lamp));
    }
}
