//! One Thing's state at one moment: what the Thing controller and a backend's push channel hand
//! to the Observers' state bus and the REST message broker. One builder, so every producer fills
//! it the same way.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{JsonObject, observer::StateSection};

/// One Thing's state at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct ThingUpdate {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub desired: Option<JsonObject>,
    pub reported: Option<JsonObject>,
    pub delta: Option<JsonObject>,
    pub version: Option<i64>,
    pub time: DateTime<Utc>,
}

impl ThingUpdate {
    pub fn section(&self, section: StateSection) -> Option<&JsonObject> {
        match section {
            StateSection::Desired => self.desired.as_ref(),
            StateSection::Reported => self.reported.as_ref(),
            StateSection::Delta => self.delta.as_ref(),
        }
    }

    /// Whether two updates carry the same state (the time aside).
    pub fn same_state(&self, other: &ThingUpdate) -> bool {
        self.desired == other.desired
            && self.reported == other.reported
            && self.delta == other.delta
            && self.version == other.version
            && self.labels == other.labels
    }
}

/// Which Thing an update is about.
pub struct Subject<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// The three state documents of an update; an empty document counts as absent.
pub struct Documents {
    pub desired: Option<JsonObject>,
    pub reported: Option<JsonObject>,
    pub delta: Option<JsonObject>,
}

impl ThingUpdate {
    /// The one constructor every producer goes through.
    pub fn new(
        subject: Subject<'_>,
        documents: Documents,
        version: Option<i64>,
        time: DateTime<Utc>,
    ) -> Self {
        let present = |d: Option<JsonObject>| d.filter(|o| !o.is_empty());
        ThingUpdate {
            namespace: subject.namespace.to_string(),
            name: subject.name.to_string(),
            labels: subject.labels.clone(),
            desired: present(documents.desired),
            reported: present(documents.reported),
            delta: present(documents.delta),
            version,
            time,
        }
    }

    /// The state of `thing` as its status shows it. `time` is when the state was reported
    /// (now, when nothing was reported yet).
    pub fn of_thing(thing: &super::Thing, status: &super::ThingStatus) -> Self {
        use kube::ResourceExt;
        let (namespace, name) = (thing.namespace().unwrap_or_default(), thing.name_any());
        ThingUpdate::new(
            Subject {
                namespace: &namespace,
                name: &name,
                labels: thing.labels(),
            },
            Documents {
                desired: thing.spec.desired.clone(),
                reported: status.reported.clone(),
                delta: status.delta.clone(),
            },
            status.version,
            status.last_reported_time.unwrap_or_else(Utc::now),
        )
    }
}
