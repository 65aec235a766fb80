//! This operator's Mosquitto Things in memory: each one's shadow, the snapshot its status
//! shows, how its status writes are paced and when its broker client was last verified;
//! indexed by Thing and by device name (the `$aws/things/{name}` topics address a Thing by the
//! latter). Shared by the shadow service (device requests) and the reconciler (spec changes).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::shadow::{DesiredChanged, Shadow};
use crate::{
    api::{
        JsonObject, ThingUpdate,
        update::{Documents, Subject},
    },
    mqtt::topic::ShadowTarget,
    provider::ThingKey,
};

/// What the Thing's status shows of its shadow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub reported: Map<String, Value>,
    pub delta: Map<String, Value>,
    pub version: i64,
    pub last_reported: Option<DateTime<Utc>>,
}

impl Snapshot {
    fn of(shadow: &Shadow) -> Self {
        Self {
            reported: shadow.reported().clone(),
            delta: shadow.delta(),
            version: shadow.version(),
            last_reported: shadow.last_reported(),
        }
    }
}

/// When the shadow service last asked for a reconcile of the Thing, and whether one is
/// scheduled (see `service::pace`).
#[derive(Debug, Default)]
pub struct Pacing {
    pub last_request: Option<Instant>,
    pub scheduled: bool,
}

/// The broker client, role and Secret were checked at `at` for this generation and Secret.
#[derive(Debug)]
struct Verified {
    generation: Option<i64>,
    secret_name: String,
    at: Instant,
}

/// One Thing this operator hosts a shadow for.
#[derive(Debug)]
pub struct TrackedThing {
    uid: String,
    thing_name: String,
    /// The Thing's labels, for the state feed (Observers select by label).
    labels: BTreeMap<String, String>,
    pub shadow: Shadow,
    snapshot: Snapshot,
    pub pacing: Pacing,
    verified: Option<Verified>,
}

impl TrackedThing {
    pub fn new(uid: String, thing_name: String, shadow: Shadow) -> Self {
        Self {
            uid,
            thing_name,
            labels: BTreeMap::new(),
            snapshot: Snapshot::of(&shadow),
            shadow,
            pacing: Pacing::default(),
            verified: None,
        }
    }

    pub fn set_labels(&mut self, labels: &BTreeMap<String, String>) {
        if &self.labels != labels {
            self.labels = labels.clone();
        }
    }

    /// Sets desired state from the spec. A change takes a new snapshot at once (a spec change
    /// is not paced: it happens once per edit).
    pub fn set_desired(
        &mut self,
        desired: Map<String, Value>,
        now: DateTime<Utc>,
    ) -> Option<DesiredChanged> {
        let changed = self.shadow.set_desired(desired, now);
        if changed.is_some() {
            self.refresh_snapshot();
        }
        changed
    }

    /// What the Thing's status shows of the shadow.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Takes a new snapshot now.
    pub fn refresh_snapshot(&mut self) {
        self.snapshot = Snapshot::of(&self.shadow);
    }

    /// Whether the broker client, role and Secret were checked for this generation and Secret
    /// less than `max_age` ago: storm-driven reconciles skip that work and stay cheap.
    pub fn is_verified(
        &self,
        generation: Option<i64>,
        secret_name: &str,
        max_age: Duration,
    ) -> bool {
        self.verified.as_ref().is_some_and(|v| {
            v.generation == generation && v.secret_name == secret_name && v.at.elapsed() < max_age
        })
    }

    pub fn mark_verified(&mut self, generation: Option<i64>, secret_name: &str) {
        self.verified = Some(Verified {
            generation,
            secret_name: secret_name.to_string(),
            at: Instant::now(),
        });
    }

    /// The Thing's state now, for the state feed.
    pub fn state_update(&self, key: &ThingKey, now: DateTime<Utc>) -> ThingUpdate {
        ThingUpdate::new(
            Subject {
                namespace: &key.namespace,
                name: &key.name,
                labels: &self.labels,
            },
            Documents {
                desired: Some(JsonObject(self.shadow.desired().clone())),
                reported: Some(JsonObject(self.shadow.reported().clone())),
                delta: Some(JsonObject(self.shadow.delta())),
            },
            Some(self.shadow.version()),
            now,
        )
    }
}

/// Every tracked Thing, by Thing and by device name.
#[derive(Default)]
pub struct Registry {
    by_key: HashMap<ThingKey, TrackedThing>,
    by_name: HashMap<String, ThingKey>,
}

impl Registry {
    /// The record of `key` under `thing_name`: the existing one, or a new one with the shadow
    /// from `seed` when there is none or it was made for another uid (a re-created Thing) or
    /// another name. `Err` names the Thing that already uses `thing_name`.
    pub fn track(
        &mut self,
        key: &ThingKey,
        uid: &str,
        thing_name: &str,
        seed: impl FnOnce() -> Shadow,
    ) -> Result<&mut TrackedThing, ThingKey> {
        if let Some(owner) = self.by_name.get(thing_name)
            && owner != key
        {
            return Err(owner.clone());
        }
        let current = self
            .by_key
            .get(key)
            .is_some_and(|t| t.uid == uid && t.thing_name == thing_name);
        if !current {
            self.remove(key);
            // The name is free or this Thing's (checked above), so the record goes in.
            self.restore(
                key.clone(),
                TrackedThing::new(uid.to_string(), thing_name.to_string(), seed()),
            );
        }
        Ok(self
            .by_key
            .get_mut(key)
            .expect("tracked just above under the same key"))
    }

    /// Adds a record as it was before a restart (from the Thing's status). The first Thing to
    /// claim a device name keeps it: returns false (and records nothing) for another Thing
    /// claiming the same name.
    pub fn restore(&mut self, key: ThingKey, thing: TrackedThing) -> bool {
        if let Some(owner) = self.by_name.get(&thing.thing_name)
            && *owner != key
        {
            return false;
        }
        self.by_name.insert(thing.thing_name.clone(), key.clone());
        self.by_key.insert(key, thing);
        true
    }

    pub fn get_mut(&mut self, key: &ThingKey) -> Option<&mut TrackedThing> {
        self.by_key.get_mut(key)
    }

    /// The Thing a shadow request addresses, if this operator tracks it.
    pub fn resolve(&self, target: &ShadowTarget) -> Option<ThingKey> {
        match target {
            ShadowTarget::Path { namespace, name } => {
                let key = ThingKey::new(namespace, name);
                self.by_key.contains_key(&key).then_some(key)
            }
            ShadowTarget::AwsName(n) => self.by_name.get(n).cloned(),
        }
    }

    pub fn remove(&mut self, key: &ThingKey) {
        if let Some(t) = self.by_key.remove(key)
            && self.by_name.get(&t.thing_name) == Some(key)
        {
            self.by_name.remove(&t.thing_name);
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// The registry as the shadow service and the provider share it.
#[derive(Clone, Default)]
pub struct SharedRegistry(Arc<Mutex<Registry>>);

impl SharedRegistry {
    /// A panic elsewhere while holding the lock leaves the maps consistent (every update is a
    /// single insert or remove), so a poisoned lock is used as is.
    pub fn lock(&self) -> MutexGuard<'_, Registry> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ThingKey {
        ThingKey::new("ns", name)
    }

    #[test]
    fn a_thing_name_belongs_to_one_thing() {
        let mut r = Registry::default();
        r.track(&key("a"), "uid-a", "dev", Shadow::default).unwrap();
        assert_eq!(
            r.track(&key("b"), "uid-b", "dev", Shadow::default)
                .unwrap_err(),
            key("a")
        );
        assert_eq!(
            r.resolve(&ShadowTarget::AwsName("dev".into())),
            Some(key("a"))
        );
        r.remove(&key("a"));
        assert!(r.track(&key("b"), "uid-b", "dev", Shadow::default).is_ok());
        assert_eq!(
            r.resolve(&ShadowTarget::AwsName("dev".into())),
            Some(key("b"))
        );
    }

    #[test]
    fn after_a_restart_the_first_claim_keeps_the_name() {
        let mut r = Registry::default();
        let tracked = |uid: &str| TrackedThing::new(uid.into(), "dev".into(), Shadow::default());
        assert!(r.restore(key("owner"), tracked("uid-o")));
        // A squatter whose status also names the device, restored later: refused.
        assert!(!r.restore(key("squatter"), tracked("uid-s")));
        assert_eq!(
            r.resolve(&ShadowTarget::AwsName("dev".into())),
            Some(key("owner"))
        );
        assert_eq!(
            r.track(&key("squatter"), "uid-s", "dev", Shadow::default)
                .unwrap_err(),
            key("owner")
        );
    }

    #[test]
    fn a_recreated_thing_or_a_new_name_starts_a_new_record() {
        let mut r = Registry::default();
        let t = r.track(&key("a"), "uid-1", "dev", Shadow::default).unwrap();
        t.set_desired(Map::from_iter([("x".into(), Value::from(1))]), Utc::now());
        t.mark_verified(Some(1), "s");
        // Same uid and name: the same record.
        let t = r.track(&key("a"), "uid-1", "dev", Shadow::default).unwrap();
        assert_eq!(t.shadow.version(), 1);
        assert!(t.is_verified(Some(1), "s", Duration::from_secs(60)));
        assert!(!t.is_verified(Some(2), "s", Duration::from_secs(60)));
        // Another uid: a fresh record from the seed.
        let t = r.track(&key("a"), "uid-2", "dev", Shadow::default).unwrap();
        assert_eq!(t.shadow.version(), 0);
        assert!(!t.is_verified(Some(1), "s", Duration::from_secs(60)));
        // Another name: the old name is free again.
        r.track(&key("a"), "uid-2", "dev2", Shadow::default)
            .unwrap();
        assert_eq!(r.resolve(&ShadowTarget::AwsName("dev".into())), None);
        assert_eq!(r.len(), 1);
    }
}
