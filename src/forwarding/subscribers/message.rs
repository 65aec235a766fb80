//! What a Subscriber receives and how a message is judged: size, JSON, an object, within the
//! depth and size rules every stored document follows. Pure, so the checks that stand between a
//! sender and a Thing are tested on their own.

use serde_json::Value;

use super::receipt::Receipt;
use crate::{
    api::{JsonObject, validation::check_document},
    forwarding::{
        json::{coalesce, set_pointer},
        provenance::Provenance,
    },
};

/// The CloudEvent `type` prefix of Observers' events.
const OBSERVER_EVENT_TYPE: &str = "dev.thing-operator.thing.";

/// A message as it will be written: the document, and the provenance it carries when it is an
/// Observer's CloudEvent (see [`crate::forwarding::provenance`]).
#[derive(Debug, PartialEq)]
pub struct Parsed {
    pub doc: JsonObject,
    pub provenance: Option<Provenance>,
}

/// An Observer's CloudEvent stands for its `data.state`: that is what is written, so an
/// Observer -> Subscriber graph (across clusters, say) carries the state, not the envelope.
fn unwrap_observer_event(mut doc: serde_json::Map<String, Value>) -> Parsed {
    let is_observer_event = doc.contains_key("specversion")
        && doc
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.starts_with(OBSERVER_EVENT_TYPE))
        && doc
            .get("data")
            .and_then(|d| d.get("state"))
            .is_some_and(Value::is_object);
    if !is_observer_event {
        return Parsed {
            doc: JsonObject(doc),
            provenance: None,
        };
    }
    let provenance = Provenance::of_event(&Value::Object(doc.clone()));
    let state = match doc.remove("data") {
        Some(Value::Object(mut data)) => match data.remove("state") {
            Some(Value::Object(state)) => state,
            _ => Default::default(),
        },
        _ => Default::default(),
    };
    Parsed {
        doc: JsonObject(state),
        provenance,
    }
}

/// Default `maxMessageBytes`.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024;

/// A message for a Subscriber, and whom to tell once it is written (or refused).
pub struct Inbound {
    pub payload: Vec<u8>,
    pub receipt: Receipt,
}

/// Why a message was refused. Shown to the sender (HTTP) and in status; never echoes payloads.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("message is {0} bytes, over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("message is not JSON: {0}")]
    NotJson(String),
    #[error("message is not a JSON object")]
    NotObject,
    #[error("{0}")]
    Invalid(String),
    #[error("the Subscriber is busy; retry later")]
    Busy,
    /// Accepted but not yet written within the caller's wait: retrying is safe (messages are
    /// merged, so a repeat changes nothing).
    #[error("not written yet; retry later")]
    NotWrittenYet,
    /// The target can never take it (e.g. reported state of a Thing without a shadow).
    #[error("{0}")]
    NotWritable(String),
    #[error("unauthorized")]
    Unauthorized,
    #[error("no Subscriber serves this path")]
    NotFound,
    #[error("this replica is on standby; retry (the leader serves Subscribers)")]
    Standby,
}

/// Parses and checks one message.
pub fn parse_message(payload: &[u8], max_bytes: usize) -> Result<Parsed, Rejection> {
    if payload.len() > max_bytes {
        return Err(Rejection::TooLarge(payload.len(), max_bytes));
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| Rejection::NotJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(Rejection::NotObject);
    };
    let parsed = unwrap_observer_event(map);
    let problems = check_document("message", &parsed.doc, max_bytes);
    if !problems.is_empty() {
        return Err(Rejection::Invalid(problems.join("; ")));
    }
    Ok(parsed)
}

/// Folds an accepted message into the pending write: placed at the target's `path` (the whole
/// document without one), later messages winning key by key.
pub fn add_to_pending(pending: &mut Option<Value>, path: Option<&str>, message: JsonObject) {
    let mut placed = Value::Object(Default::default());
    set_pointer(&mut placed, path.unwrap_or(""), message.into_value());
    coalesce(
        pending.get_or_insert_with(|| Value::Object(Default::default())),
        &placed,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_are_checked_before_anything_is_written() {
        assert!(parse_message(br#"{"temp": 21}"#, 100).is_ok());
        assert_eq!(parse_message(b"[1,2]", 100), Err(Rejection::NotObject));
        assert!(matches!(
            parse_message(b"{nope", 100),
            Err(Rejection::NotJson(_))
        ));
        assert_eq!(
            parse_message(&[b' '; 101], 100),
            Err(Rejection::TooLarge(101, 100))
        );
        let deep = br#"{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}"#;
        assert!(matches!(
            parse_message(deep, 1000),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn an_observers_cloud_event_stands_for_its_state_and_keeps_its_provenance() {
        let event = json!({
            "specversion": "1.0", "type": "dev.thing-operator.thing.desired",
            "iotorigin": "ns/a", "iothops": 1,
            "data": {"thing": "a", "namespace": "ns", "state": {"temp": 21}},
        });
        let parsed = parse_message(event.to_string().as_bytes(), 1000).unwrap();
        assert_eq!(
            parsed.doc.0,
            json!({"temp": 21}).as_object().unwrap().clone()
        );
        assert_eq!(
            parsed.provenance,
            Some(Provenance {
                origin: "ns/a".into(),
                hops: 1
            })
        );
        // Another producer's CloudEvent is written as it is.
        let other =
            json!({"specversion": "1.0", "type": "com.example.reading", "data": {"state": {}}});
        let parsed = parse_message(other.to_string().as_bytes(), 1000).unwrap();
        assert!(parsed.doc.0.contains_key("specversion"));
        assert_eq!(parsed.provenance, None);
    }

    #[test]
    fn messages_are_placed_at_the_path_and_later_ones_win() {
        let msg = |v: Value| parse_message(v.to_string().as_bytes(), 1000).unwrap().doc;
        let mut pending = None;
        add_to_pending(
            &mut pending,
            Some("/meter"),
            msg(json!({"kwh": 1, "v": 230})),
        );
        add_to_pending(&mut pending, Some("/meter"), msg(json!({"kwh": 2})));
        assert_eq!(pending, Some(json!({"meter": {"kwh": 2, "v": 230}})));
        let mut pending = None;
        add_to_pending(&mut pending, None, msg(json!({"on": true})));
        add_to_pending(&mut pending, None, msg(json!({"level": 3})));
        assert_eq!(pending, Some(json!({"on": true, "level": 3})));
    }
}
