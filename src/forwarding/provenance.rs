//! Loop-safe event graphs. An Observer -> Thing -> Observer cycle (or one that runs through a
//! Subscriber, in this cluster or another) must settle instead of ping-ponging. Every event
//! carries where its chain started (`origin`, a Thing) and how many hops it has made; a write
//! into a Thing remembers both, so the Thing's next update continues the chain; an event that
//! would return to its origin, or has made more than [`MAX_HOPS`] hops, is dropped and counted.
//!
//! Across processes the provenance travels as CloudEvents extension attributes
//! ([`ORIGIN_EXTENSION`], [`HOPS_EXTENSION`]). Within the operator it is kept in memory,
//! keyed by the Thing and the desired document the write produced: a later change by anyone
//! else produces another document, and with it a fresh chain. After a restart a running cycle
//! makes one more round before it is recognised again.
//!
//! An origin names its cluster when the operator has a `--cluster-id` ([`ThingPlace`]): a
//! Thing `ns/lamp` mirrored into `ns/lamp` of another cluster is another Thing, not the chain's
//! origin, and the mirror must not be dropped as a loop.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use serde_json::Value;

use crate::api::{JsonObject, ThingUpdate, object_key, observer::StateSection};

/// The CloudEvents extension naming the Thing a chain of events started at (`namespace/name`).
pub const ORIGIN_EXTENSION: &str = "iotorigin";
/// The CloudEvents extension counting the hops an event has made.
pub const HOPS_EXTENSION: &str = "iothops";
/// Longest chain allowed (Thing -> sink or Subscriber -> Thing counts one hop).
pub const MAX_HOPS: u32 = 8;

/// Where a chain of events started and how long it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    pub origin: String,
    pub hops: u32,
}

/// Why an event is not passed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoopStop {
    #[error("event would return to its origin Thing {0}")]
    BackToOrigin(String),
    #[error("event has made {0} hops (at most {MAX_HOPS})")]
    TooManyHops(u32),
}

/// How this operator names its Things in origins: `ns/name`, or `<cluster-id>/ns/name` with a
/// cluster id (a namespace has no `/`, so the two never meet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThingPlace {
    cluster: Option<String>,
}

impl ThingPlace {
    pub fn new(cluster: Option<String>) -> Self {
        Self { cluster }
    }

    /// Thing `namespace/name` of this cluster, as an origin.
    pub fn key(&self, namespace: &str, name: &str) -> String {
        match &self.cluster {
            Some(cluster) => format!("{cluster}/{}", object_key(namespace, name)),
            None => object_key(namespace, name),
        }
    }
}

impl Provenance {
    /// A chain starting at the Thing `key` names ([`ThingPlace::key`]).
    pub fn start(key: String) -> Self {
        Self {
            origin: key,
            hops: 0,
        }
    }

    /// The provenance one hop further, into the Thing `key` names ([`ThingPlace::key`]);
    /// `Err` when that closes a loop or makes the chain too long.
    pub fn into_thing(&self, key: &str) -> Result<Provenance, LoopStop> {
        let next = self.next()?;
        if next.origin == key {
            return Err(LoopStop::BackToOrigin(next.origin));
        }
        Ok(next)
    }

    /// One hop further, destination unknown (an MQTT or HTTP sink).
    pub fn next(&self) -> Result<Provenance, LoopStop> {
        let hops = self.hops + 1;
        if hops > MAX_HOPS {
            return Err(LoopStop::TooManyHops(hops));
        }
        Ok(Provenance {
            origin: self.origin.clone(),
            hops,
        })
    }

    /// The provenance a CloudEvent carries, if it carries one.
    pub fn of_event(event: &Value) -> Option<Provenance> {
        let origin = event.get(ORIGIN_EXTENSION)?.as_str()?.to_string();
        let hops = event.get(HOPS_EXTENSION)?.as_u64()?;
        Some(Provenance {
            origin,
            hops: u32::try_from(hops).unwrap_or(u32::MAX),
        })
    }
}

/// What the operator's own writes into Things caused: per Thing, the provenance of the last
/// write and the desired document it produced. Clones share it.
#[derive(Clone, Default)]
pub struct ProvenanceBook {
    writes: Arc<Mutex<HashMap<String, (Provenance, JsonObject)>>>,
    place: ThingPlace,
}

impl ProvenanceBook {
    /// The book of an operator whose Things `place` names.
    pub fn new(place: ThingPlace) -> Self {
        Self {
            writes: Arc::default(),
            place,
        }
    }

    /// How this operator names its Things in origins.
    pub fn place(&self) -> &ThingPlace {
        &self.place
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Provenance, JsonObject)>> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that a write with `provenance` left Thing `namespace/name` with `desired`.
    pub fn record(&self, namespace: &str, name: &str, provenance: Provenance, desired: JsonObject) {
        self.lock()
            .insert(object_key(namespace, name), (provenance, desired));
    }

    /// Forgets a Thing that went away.
    pub fn forget(&self, namespace: &str, name: &str) {
        self.lock().remove(&object_key(namespace, name));
    }

    /// The provenance of `update`'s `section`: the chain a write of the operator continued,
    /// when the desired state is still what that write left; a new chain otherwise (reported
    /// state comes from the device: always new).
    pub fn of_update(&self, update: &ThingUpdate, section: StateSection) -> Provenance {
        if section == StateSection::Desired
            && let Some((provenance, desired)) = self
                .lock()
                .get(&object_key(&update.namespace, &update.name))
            && update.desired.as_ref() == Some(desired)
        {
            return provenance.clone();
        }
        Provenance::start(self.place.key(&update.namespace, &update.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn update(desired: Value) -> ThingUpdate {
        ThingUpdate {
            namespace: "ns".into(),
            name: "b".into(),
            labels: Default::default(),
            desired: Some(serde_json::from_value(desired).unwrap()),
            reported: None,
            delta: None,
            version: None,
            time: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_chain_stops_at_its_origin_and_after_max_hops() {
        let here = ThingPlace::default();
        let a = Provenance::start(here.key("ns", "a"));
        let into_b = a.into_thing(&here.key("ns", "b")).unwrap();
        assert_eq!(into_b.hops, 1);
        assert_eq!(
            into_b.into_thing(&here.key("ns", "a")),
            Err(LoopStop::BackToOrigin("ns/a".into()))
        );
        let mut long = a;
        for _ in 0..MAX_HOPS {
            long = long.next().unwrap();
        }
        assert_eq!(long.next(), Err(LoopStop::TooManyHops(MAX_HOPS + 1)));
    }

    #[test]
    fn a_write_continues_the_chain_only_while_its_document_stands() {
        let book = ProvenanceBook::default();
        let chained = Provenance {
            origin: "ns/a".into(),
            hops: 1,
        };
        let written: JsonObject = serde_json::from_value(json!({"fromA": 1})).unwrap();
        book.record("ns", "b", chained.clone(), written);
        assert_eq!(
            book.of_update(&update(json!({"fromA": 1})), StateSection::Desired),
            chained
        );
        // Someone else changed it since: a new chain, starting at b.
        assert_eq!(
            book.of_update(&update(json!({"fromA": 1, "x": 2})), StateSection::Desired),
            Provenance::start("ns/b".into())
        );
        assert_eq!(
            book.of_update(&update(json!({"fromA": 1})), StateSection::Reported),
            Provenance::start("ns/b".into())
        );
    }

    #[test]
    fn a_mirror_into_the_same_name_in_another_cluster_is_no_loop() {
        let (east, west) = (
            ThingPlace::new(Some("east".into())),
            ThingPlace::new(Some("west".into())),
        );
        let from_east = Provenance::start(east.key("ns", "lamp"));
        assert_eq!(from_east.origin, "east/ns/lamp");
        // east's ns/lamp -> west's ns/lamp: another Thing.
        let in_west = from_east
            .into_thing(&west.key("ns", "lamp"))
            .expect("a mirror, not a loop");
        // ... and back into east's ns/lamp: the origin.
        assert_eq!(
            in_west.into_thing(&east.key("ns", "lamp")),
            Err(LoopStop::BackToOrigin("east/ns/lamp".into()))
        );
    }

    #[test]
    fn provenance_travels_in_cloud_event_extensions() {
        let event = json!({"specversion": "1.0", ORIGIN_EXTENSION: "ns/a", HOPS_EXTENSION: 2});
        assert_eq!(
            Provenance::of_event(&event),
            Some(Provenance {
                origin: "ns/a".into(),
                hops: 2
            })
        );
        assert_eq!(Provenance::of_event(&json!({"specversion": "1.0"})), None);
    }
}
