//! What the push channel receives, and what it remembers of it. Pure.
//!
//! AWS IoT publishes every accepted shadow update as a documents message on
//! `$aws/things/<thing>/shadow/update/documents` (named shadows:
//! `$aws/things/<thing>/shadow/name/<shadow>/update/documents`) carrying the shadow before and
//! after it (`previous`, `current`, each with `state`, `metadata`, `version`). [`shadow_document`]
//! turns `current` into the document a shadow read returns (with the delta AWS leaves out of
//! documents messages), so status is filled by the same code whichever way the state came.
//!
//! [`Store`] is the memory: which thing names this operator manages (a message about any other
//! name is ignored: the account is shared with other namespaces' names, other clusters and other
//! tools), the newest document of each by version (an older or repeated one never replaces it:
//! MQTT QoS 1 may redeliver, and a poll may have read newer state already), and whether that
//! document can be trusted instead of a read (the connection has stayed up since the Thing was
//! last read, so nothing was missed, and the drift read is not due).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use serde_json::{Map, Value, json};

use crate::provider::ThingKey;

/// The topic filters the operator subscribes to: classic and named shadows of every thing. The
/// operator's policy lets it receive only the documents of the thing names it may manage.
pub const FILTERS: [&str; 2] = [
    "$aws/things/+/shadow/update/documents",
    "$aws/things/+/shadow/name/+/update/documents",
];

/// The thing and shadow a documents message is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentTopic<'a> {
    pub thing_name: &'a str,
    /// `None`: the classic shadow.
    pub shadow: Option<&'a str>,
}

/// Parses a documents topic; anything else is `None`.
pub fn parse_topic(topic: &str) -> Option<DocumentTopic<'_>> {
    let rest = topic.strip_prefix("$aws/things/")?;
    let (thing_name, rest) = rest.split_once('/')?;
    let shadow = match rest {
        "shadow/update/documents" => None,
        _ => Some(
            rest.strip_prefix("shadow/name/")?
                .strip_suffix("/update/documents")
                .filter(|s| !s.is_empty() && !s.contains('/'))?,
        ),
    };
    (!thing_name.is_empty()).then_some(DocumentTopic { thing_name, shadow })
}

/// Why a documents message was not used. Never carries the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("not a JSON object")]
    NotJson,
    #[error("no current document with a version")]
    NoCurrentVersion,
}

/// The shadow document after the update, as a shadow read would return it: state (desired,
/// reported and their delta), metadata and version.
pub fn shadow_document(payload: &[u8]) -> Result<Value, DocumentError> {
    let message: Value = serde_json::from_slice(payload).map_err(|_| DocumentError::NotJson)?;
    let current = message
        .get("current")
        .and_then(Value::as_object)
        .ok_or(DocumentError::NoCurrentVersion)?;
    let version = current
        .get("version")
        .and_then(Value::as_i64)
        .ok_or(DocumentError::NoCurrentVersion)?;
    let section = |name: &str| {
        current
            .get("state")
            .and_then(|s| s.get(name))
            .and_then(Value::as_object)
    };
    let mut state = Map::new();
    if let Some(desired) = section("desired") {
        state.insert("desired".into(), Value::Object(desired.clone()));
        let delta = delta(desired, section("reported"));
        if !delta.is_empty() {
            state.insert("delta".into(), Value::Object(delta));
        }
    }
    if let Some(reported) = section("reported") {
        state.insert("reported".into(), Value::Object(reported.clone()));
    }
    let mut doc = json!({"state": state, "version": version});
    if let Some(metadata) = current.get("metadata") {
        doc["metadata"] = metadata.clone();
    }
    Ok(doc)
}

/// AWS's delta: every desired key whose reported value differs, objects compared key by key.
pub fn delta(
    desired: &Map<String, Value>,
    reported: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, want) in desired {
        match (want, reported.and_then(|r| r.get(k))) {
            (Value::Null, _) => {}
            (Value::Object(w), Some(Value::Object(have))) => {
                let inner = delta(w, Some(have));
                if !inner.is_empty() {
                    out.insert(k.clone(), Value::Object(inner));
                }
            }
            (w, Some(have)) if w == have => {}
            (w, _) => {
                out.insert(k.clone(), w.clone());
            }
        }
    }
    out
}

fn version_of(doc: &Value) -> Option<i64> {
    doc.get("version").and_then(Value::as_i64)
}

/// One managed thing name.
#[derive(Debug)]
struct Tracked {
    key: ThingKey,
    labels: std::collections::BTreeMap<String, String>,
    shadow: Option<String>,
    /// The newest document seen, pushed or read.
    document: Option<Value>,
    /// The connection epoch in which the shadow was last read.
    read_epoch: Option<u64>,
    last_read: Option<Instant>,
}

/// What became of a documents message.
#[derive(Debug, Clone, PartialEq)]
pub enum Offer {
    /// Not a thing name (or not the shadow) of a Thing this operator manages.
    Unknown,
    /// Not newer than what is known.
    Stale,
    /// Newer: the Thing it belongs to, its labels and the document.
    Accepted {
        key: ThingKey,
        labels: std::collections::BTreeMap<String, String>,
        document: Value,
    },
}

/// The push channel's memory (see the module docs).
#[derive(Debug, Default)]
pub struct Store {
    things: HashMap<String, Tracked>,
    /// Counts connections: a read in an earlier one may have missed messages since.
    epoch: u64,
    up: bool,
}

impl Store {
    /// The connection is up and subscribed (`true`) or lost. Each new connection starts an
    /// epoch: every Thing is read once in it before pushed documents are trusted again.
    pub fn set_up(&mut self, up: bool) {
        if up && !self.up {
            self.epoch += 1;
        }
        self.up = up;
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Manages `thing_name` for `key` (its labels and shadow as the spec has them now). A name
    /// that moves to another Thing or shadow starts over.
    pub fn track(
        &mut self,
        thing_name: &str,
        key: &ThingKey,
        labels: &std::collections::BTreeMap<String, String>,
        shadow: Option<&str>,
    ) {
        match self.things.get_mut(thing_name) {
            Some(t) if t.key == *key && t.shadow.as_deref() == shadow => {
                if t.labels != *labels {
                    t.labels = labels.clone();
                }
            }
            _ => {
                self.things.insert(
                    thing_name.to_string(),
                    Tracked {
                        key: key.clone(),
                        labels: labels.clone(),
                        shadow: shadow.map(str::to_string),
                        document: None,
                        read_epoch: None,
                        last_read: None,
                    },
                );
            }
        }
    }

    pub fn forget(&mut self, thing_name: &str) {
        self.things.remove(thing_name);
    }

    /// The Things this operator manages.
    pub fn keys(&self) -> Vec<ThingKey> {
        self.things.values().map(|t| t.key.clone()).collect()
    }

    /// Whether `topic` is about a thing name and shadow this operator manages.
    pub fn manages(&self, topic: &DocumentTopic<'_>) -> bool {
        self.things
            .get(topic.thing_name)
            .is_some_and(|t| t.shadow.as_deref() == topic.shadow)
    }

    /// A pushed document for `topic`.
    pub fn offer(&mut self, topic: &DocumentTopic<'_>, document: Value) -> Offer {
        let Some(t) = self.things.get_mut(topic.thing_name) else {
            return Offer::Unknown;
        };
        if t.shadow.as_deref() != topic.shadow {
            return Offer::Unknown;
        }
        if !newer(&document, t.document.as_ref()) {
            return Offer::Stale;
        }
        t.document = Some(document.clone());
        Offer::Accepted {
            key: t.key.clone(),
            labels: t.labels.clone(),
            document,
        }
    }

    /// A document read from the shadow (or `None`: no shadow yet) at `now`.
    pub fn record_read(&mut self, thing_name: &str, document: Option<&Value>, now: Instant) {
        let epoch = self.epoch;
        let up = self.up;
        let Some(t) = self.things.get_mut(thing_name) else {
            return;
        };
        if let Some(doc) = document
            && newer(doc, t.document.as_ref())
        {
            t.document = Some(doc.clone());
        }
        if up {
            t.read_epoch = Some(epoch);
            t.last_read = Some(now);
        }
    }

    /// Whether pushed documents stand in for reads of this Thing now: the connection is up, the
    /// shadow was read since it came up, and the drift read is not due.
    pub fn covers(
        &self,
        thing_name: &str,
        shadow: Option<&str>,
        drift: Duration,
        now: Instant,
    ) -> bool {
        self.up
            && self.things.get(thing_name).is_some_and(|t| {
                t.shadow.as_deref() == shadow
                    && t.read_epoch == Some(self.epoch)
                    && t.last_read.is_some_and(|at| now.duration_since(at) < drift)
            })
    }

    /// The newest document of a covered Thing (see [`Self::covers`]).
    pub fn document(
        &self,
        thing_name: &str,
        shadow: Option<&str>,
        drift: Duration,
        now: Instant,
    ) -> Option<Value> {
        if !self.covers(thing_name, shadow, drift, now) {
            return None;
        }
        self.things.get(thing_name)?.document.clone()
    }
}

/// Whether `doc` is newer than `known` by shadow version (a document without a version is
/// never newer than one with).
fn newer(doc: &Value, known: Option<&Value>) -> bool {
    match (version_of(doc), known.and_then(version_of)) {
        (_, None) => true,
        (Some(v), Some(k)) => v > k,
        (None, Some(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_of_classic_and_named_shadows_parse_and_nothing_else_does() {
        let table = [
            (
                "$aws/things/c:ns_lamp/shadow/update/documents",
                Some(("c:ns_lamp", None)),
            ),
            (
                "$aws/things/t1/shadow/name/cfg/update/documents",
                Some(("t1", Some("cfg"))),
            ),
            ("$aws/things/t1/shadow/update/accepted", None),
            ("$aws/things/t1/shadow/name//update/documents", None),
            ("$aws/things/t1/shadow/name/a/b/update/documents", None),
            ("$aws/things//shadow/update/documents", None),
            ("things/ns/lamp/state", None),
        ];
        for (topic, want) in table {
            let got = parse_topic(topic).map(|t| (t.thing_name, t.shadow));
            assert_eq!(got, want, "{topic}");
        }
    }

    #[test]
    fn the_current_document_becomes_a_shadow_document_with_its_delta() {
        let msg = json!({
            "previous": {"state": {"reported": {"t": 1}}, "version": 3},
            "current": {
                "state": {"desired": {"t": 26, "mode": "eco", "n": {"a": 1, "b": 2}}, "reported": {"t": 24, "mode": "eco", "n": {"a": 1}}},
                "metadata": {"reported": {"t": {"timestamp": 1700000100}}},
                "version": 4
            },
            "timestamp": 1700000100
        });
        let doc = shadow_document(msg.to_string().as_bytes()).unwrap();
        assert_eq!(doc["version"], 4);
        assert_eq!(doc["state"]["delta"], json!({"t": 26, "n": {"b": 2}}));
        assert_eq!(doc["state"]["reported"]["t"], 24);
        assert_eq!(doc["metadata"]["reported"]["t"]["timestamp"], 1700000100);
        let mut status = crate::api::ThingStatus::default();
        crate::provider::aws::shadow::apply_to_status(Some(&doc), &mut status);
        assert_eq!(status.version, Some(4));
        assert_eq!(status.reported.unwrap().0["t"], 24);

        let in_sync = json!({"current": {"state": {"desired": {"t": 1}, "reported": {"t": 1}}, "version": 9}});
        let doc = shadow_document(in_sync.to_string().as_bytes()).unwrap();
        assert!(doc["state"].get("delta").is_none());
        assert_eq!(
            shadow_document(b"[1]"),
            Err(DocumentError::NoCurrentVersion)
        );
        assert_eq!(shadow_document(b"{"), Err(DocumentError::NotJson));
        assert_eq!(
            shadow_document(br#"{"current": {"state": {}}}"#),
            Err(DocumentError::NoCurrentVersion)
        );
    }

    fn doc(version: i64, t: i64) -> Value {
        json!({"state": {"reported": {"t": t}}, "version": version})
    }

    #[test]
    fn only_managed_names_count_and_an_older_document_never_replaces_a_newer_one() {
        let mut store = Store::default();
        let key = ThingKey::new("team-a", "lamp");
        let labels = Default::default();
        store.track("team-a_lamp", &key, &labels, None);
        let classic = DocumentTopic {
            thing_name: "team-a_lamp",
            shadow: None,
        };
        let other = DocumentTopic {
            thing_name: "team-b_lamp",
            shadow: None,
        };
        let named = DocumentTopic {
            thing_name: "team-a_lamp",
            shadow: Some("cfg"),
        };
        assert!(!store.manages(&other) && !store.manages(&named) && store.manages(&classic));
        assert_eq!(store.offer(&other, doc(9, 1)), Offer::Unknown);
        assert_eq!(store.offer(&named, doc(9, 1)), Offer::Unknown);
        assert!(matches!(
            store.offer(&classic, doc(5, 5)),
            Offer::Accepted { .. }
        ));
        assert_eq!(store.offer(&classic, doc(4, 4)), Offer::Stale);
        assert_eq!(
            store.offer(&classic, doc(5, 5)),
            Offer::Stale,
            "a redelivery"
        );
        // A read of older state (a GET that raced the push) keeps the newer document.
        let now = Instant::now();
        store.set_up(true);
        store.record_read("team-a_lamp", Some(&doc(3, 3)), now);
        let hour = Duration::from_secs(3600);
        assert_eq!(
            store.document("team-a_lamp", None, hour, now),
            Some(doc(5, 5))
        );
        store.forget("team-a_lamp");
        assert_eq!(store.offer(&classic, doc(6, 6)), Offer::Unknown);
    }

    #[test]
    fn pushed_documents_stand_in_for_reads_only_while_nothing_can_have_been_missed() {
        let mut store = Store::default();
        let key = ThingKey::new("ns", "t");
        let drift = Duration::from_secs(60);
        let t0 = Instant::now();
        store.track("ns_t", &key, &Default::default(), None);
        store.record_read("ns_t", Some(&doc(1, 1)), t0);
        assert!(!store.covers("ns_t", None, drift, t0), "connection down");
        store.set_up(true);
        assert!(
            !store.covers("ns_t", None, drift, t0),
            "not read since it came up"
        );
        store.record_read("ns_t", Some(&doc(1, 1)), t0);
        assert!(store.covers("ns_t", None, drift, t0));
        assert!(
            !store.covers("ns_t", Some("cfg"), drift, t0),
            "another shadow"
        );
        assert!(
            !store.covers("ns_t", None, drift, t0 + drift),
            "drift read due"
        );
        store.set_up(false);
        store.set_up(true);
        assert!(
            !store.covers("ns_t", None, drift, t0),
            "a reconnect may have missed messages"
        );
        assert!(!store.covers("ns_u", None, drift, t0), "not managed");
    }
}
