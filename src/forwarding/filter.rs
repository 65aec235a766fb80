//! Observer filters: which Things an Observer watches, which of their updates pass, and what it
//! remembers between them. Pure functions; the memory is what survives a restart (kept in the
//! Observer's status).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::json::set_pointer;
use crate::api::{
    JsonObject, ThingUpdate,
    filter_expression::FilterExpression,
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
    /// The expression could not be evaluated for this update (a missing field, a type
    /// mismatch): not forwarded, and the Observer says why.
    Failed(String),
}

/// How far a numeric field must move to pass.
#[derive(Debug, Clone, Copy)]
enum Threshold {
    /// Any change.
    Any,
    Absolute(f64),
    /// A percentage of the last forwarded value.
    Percent(f64),
}

impl Threshold {
    fn of(filter: Option<&FilterSpec>) -> Self {
        match filter.map(|f| (f.changed_by, f.changed_by_percent)) {
            Some((Some(d), _)) => Threshold::Absolute(d),
            Some((None, Some(p))) => Threshold::Percent(p),
            _ => Threshold::Any,
        }
    }
}

/// Numbers move "by more than the threshold"; anything else passes when it differs.
fn moved(old: Option<&Value>, new: &Value, threshold: Threshold) -> bool {
    let Some(old) = old else { return true };
    match (threshold, old.as_f64(), new.as_f64()) {
        (Threshold::Absolute(t), Some(a), Some(b)) => (b - a).abs() > t,
        (Threshold::Percent(p), Some(a), Some(b)) => {
            (b - a).abs() > a.abs() * p / 100.0 || (a == 0.0 && b != 0.0)
        }
        _ => old != new,
    }
}

/// What was last forwarded, as a document (`{}` before the first forward).
fn last_forwarded(memory: &Memory) -> Value {
    if let Some(whole) = memory.get("") {
        return whole.clone();
    }
    let mut doc = Value::Object(Map::new());
    for (pointer, value) in memory {
        set_pointer(&mut doc, pointer, value.clone());
    }
    doc
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

/// What an update is judged by besides the spec: the compiled `filter.expression` and this
/// Thing's section at its previous update.
#[derive(Default, Clone, Copy)]
pub struct Context<'a> {
    pub expression: Option<&'a FilterExpression>,
    pub previous: Option<&'a Value>,
}

/// Decides whether the current `section` passes `filter`, given what was forwarded last.
pub fn evaluate(
    filter: Option<&FilterSpec>,
    context: Context<'_>,
    section: Option<&JsonObject>,
    memory: &Memory,
) -> Decision {
    let whole = Value::Object(section.map(|s| s.0.clone()).unwrap_or_default());
    let fields = filter.map(|f| f.fields.as_slice()).unwrap_or_default();
    let candidate = if fields.is_empty() {
        if memory.get("") == Some(&whole) {
            return Decision::Skip;
        }
        Decision::Forward {
            data: whole.clone(),
            memory: Memory::from([(String::new(), whole.clone())]),
        }
    } else {
        let threshold = Threshold::of(filter);
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
    };
    let Some(expression) = context.expression else {
        return candidate;
    };
    let empty = Value::Object(Map::new());
    let previous = context.previous.unwrap_or(&empty);
    match expression.matches(&whole, previous, &last_forwarded(memory)) {
        Ok(true) => candidate,
        Ok(false) => Decision::Skip,
        Err(why) => Decision::Failed(why),
    }
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
            other => panic!("expected forward, got {other:?}"),
        }
    }

    #[test]
    fn without_filter_every_change_passes_once() {
        let s = obj(json!({"temp": 20}));
        let (data, mem) = forward(evaluate(None, Context::default(), Some(&s), &Memory::new()));
        assert_eq!(data, json!({"temp": 20}));
        assert_eq!(
            evaluate(None, Context::default(), Some(&s), &mem),
            Decision::Skip
        );
        assert!(matches!(
            evaluate(
                None,
                Context::default(),
                Some(&obj(json!({"temp": 21}))),
                &mem
            ),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn changed_by_compares_with_the_last_forwarded_value_not_the_last_seen() {
        let f = filter(&["/temp"], Some(2.0));
        let (_, mem) = forward(evaluate(
            Some(&f),
            Context::default(),
            Some(&obj(json!({"temp": 20}))),
            &Memory::new(),
        ));
        // 21 and 22 are each within 2 of 20 (the last forwarded): no forward, memory stays 20.
        assert_eq!(
            evaluate(
                Some(&f),
                Context::default(),
                Some(&obj(json!({"temp": 21}))),
                &mem
            ),
            Decision::Skip
        );
        assert_eq!(
            evaluate(
                Some(&f),
                Context::default(),
                Some(&obj(json!({"temp": 22}))),
                &mem
            ),
            Decision::Skip
        );
        let (data, mem) = forward(evaluate(
            Some(&f),
            Context::default(),
            Some(&obj(json!({"temp": 22.5}))),
            &mem,
        ));
        assert_eq!(data, json!({"temp": 22.5}));
        assert_eq!(mem["/temp"], json!(22.5));
        let (_, _) = forward(evaluate(
            Some(&f),
            Context::default(),
            Some(&obj(json!({"temp": 20.4}))),
            &mem,
        ));
    }

    #[test]
    fn fields_select_nested_values_and_ignore_other_changes() {
        let f = filter(&["/env/temp", "/mode"], None);
        let s = obj(json!({"env": {"temp": 20, "hum": 40}, "mode": "eco", "other": 1}));
        let (data, mem) = forward(evaluate(
            Some(&f),
            Context::default(),
            Some(&s),
            &Memory::new(),
        ));
        assert_eq!(data, json!({"env": {"temp": 20}, "mode": "eco"}));
        let s2 = obj(json!({"env": {"temp": 20, "hum": 99}, "mode": "eco", "other": 2}));
        assert_eq!(
            evaluate(Some(&f), Context::default(), Some(&s2), &mem),
            Decision::Skip
        );
        let s3 = obj(json!({"env": {"temp": 20}, "mode": "boost"}));
        assert!(matches!(
            evaluate(Some(&f), Context::default(), Some(&s3), &mem),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn non_numeric_values_with_changed_by_pass_when_they_differ() {
        let f = filter(&["/state"], Some(5.0));
        let (_, mem) = forward(evaluate(
            Some(&f),
            Context::default(),
            Some(&obj(json!({"state": "on"}))),
            &Memory::new(),
        ));
        assert_eq!(
            evaluate(
                Some(&f),
                Context::default(),
                Some(&obj(json!({"state": "on"}))),
                &mem
            ),
            Decision::Skip
        );
        assert!(matches!(
            evaluate(
                Some(&f),
                Context::default(),
                Some(&obj(json!({"state": "off"}))),
                &mem
            ),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn missing_fields_do_not_pass() {
        let f = filter(&["/temp"], None);
        assert_eq!(
            evaluate(
                Some(&f),
                Context::default(),
                Some(&obj(json!({"x": 1}))),
                &Memory::new()
            ),
            Decision::Skip
        );
        assert_eq!(
            evaluate(Some(&f), Context::default(), None, &Memory::new()),
            Decision::Skip
        );
    }

    #[test]
    fn changed_by_percent_is_relative_to_the_last_forwarded_value() {
        let f = FilterSpec {
            fields: vec!["/load".into()],
            changed_by_percent: Some(10.0),
            ..Default::default()
        };
        let judge = |load: f64, mem: &Memory| {
            evaluate(
                Some(&f),
                Context::default(),
                Some(&obj(json!({ "load": load }))),
                mem,
            )
        };
        let (_, mem) = forward(judge(200.0, &Memory::new()));
        assert_eq!(judge(219.0, &mem), Decision::Skip, "9.5 % of 200");
        assert_eq!(judge(181.0, &mem), Decision::Skip);
        let (_, mem) = forward(judge(221.0, &mem));
        assert_eq!(mem.get("/load"), Some(&json!(221.0)));
        let zero = Memory::from([("/load".to_string(), json!(0.0))]);
        assert!(matches!(judge(0.1, &zero), Decision::Forward { .. }));
        assert_eq!(judge(0.0, &zero), Decision::Skip);
    }

    /// The event model's three examples, each one line of spec: too high, too low, changed by
    /// more than 2 since the last forwarded value.
    #[test]
    fn the_event_models_examples() {
        let too_high = FilterExpression::compile("state.temp > 30.0").unwrap();
        let too_low = FilterExpression::compile("state.temp < 5.0").unwrap();
        let by_expression = |e: &FilterExpression, temp: f64| {
            evaluate(
                None,
                Context {
                    expression: Some(e),
                    previous: None,
                },
                Some(&obj(json!({ "temp": temp }))),
                &Memory::new(),
            )
        };
        assert!(matches!(
            by_expression(&too_high, 31.0),
            Decision::Forward { .. }
        ));
        assert_eq!(by_expression(&too_high, 29.0), Decision::Skip);
        assert!(matches!(
            by_expression(&too_low, 4.0),
            Decision::Forward { .. }
        ));
        assert_eq!(by_expression(&too_low, 6.0), Decision::Skip);
        let changed_by_2 = filter(&["/temp"], Some(2.0));
        let (_, mem) = forward(evaluate(
            Some(&changed_by_2),
            Context::default(),
            Some(&obj(json!({"temp": 20.0}))),
            &Memory::new(),
        ));
        let step = |temp: f64, mem: &Memory| {
            evaluate(
                Some(&changed_by_2),
                Context::default(),
                Some(&obj(json!({ "temp": temp }))),
                mem,
            )
        };
        assert_eq!(step(22.0, &mem), Decision::Skip);
        assert!(matches!(step(22.5, &mem), Decision::Forward { .. }));
    }

    #[test]
    fn an_expression_sees_previous_and_last_and_reports_what_it_cannot_evaluate() {
        let rising = FilterExpression::compile(
            "has(previous.temp) && state.temp > previous.temp && state.temp != last.temp",
        )
        .unwrap();
        let judge = |temp: f64, previous: Value, mem: &Memory| {
            evaluate(
                None,
                Context {
                    expression: Some(&rising),
                    previous: Some(&previous),
                },
                Some(&obj(json!({ "temp": temp }))),
                mem,
            )
        };
        let mem = Memory::from([(String::new(), json!({"temp": 3.0}))]);
        assert!(matches!(
            judge(4.0, json!({"temp": 2.0}), &mem),
            Decision::Forward { .. }
        ));
        assert_eq!(judge(1.0, json!({"temp": 2.0}), &mem), Decision::Skip);
        assert_eq!(judge(4.0, json!({}), &mem), Decision::Skip);
        // `last` has no temp before the first forward: the expression cannot be evaluated.
        assert!(matches!(
            judge(4.0, json!({"temp": 2.0}), &Memory::new()),
            Decision::Failed(_)
        ));
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
