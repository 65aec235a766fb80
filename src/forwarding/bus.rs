//! The in-memory stream of Thing state. The Thing controller publishes each Thing's state when
//! it changes; Observer tasks subscribe. Device updates reach Observers without a round trip
//! through etcd, and a task that falls behind (or starts) reads the latest state of every Thing
//! from [`StateBus::latest`]: state, not events.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::broadcast;

use crate::api::{ThingUpdate, object_key};

#[derive(Clone)]
pub struct StateBus {
    tx: broadcast::Sender<Arc<ThingUpdate>>,
    /// Deleted Things, `(namespace, name)`: what tasks keep per Thing goes with it.
    removals: broadcast::Sender<(String, String)>,
    latest: Arc<Mutex<HashMap<String, Arc<ThingUpdate>>>>,
}

impl Default for StateBus {
    fn default() -> Self {
        Self::new(4096)
    }
}

impl StateBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        let (removals, _) = broadcast::channel(capacity);
        Self {
            tx,
            removals,
            latest: Arc::default(),
        }
    }

    /// Publishes `update` unless the Thing's state did not change. Returns whether it was new.
    pub fn publish(&self, update: ThingUpdate) -> bool {
        let key = object_key(&update.namespace, &update.name);
        let update = Arc::new(update);
        {
            let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
            if latest.get(&key).is_some_and(|old| old.same_state(&update)) {
                return false;
            }
            latest.insert(key, update.clone());
        }
        // No receiver is fine: nobody observes this Thing right now.
        let _ = self.tx.send(update);
        true
    }

    /// Forgets a deleted Thing, and tells the subscribers of [`StateBus::removals`].
    pub fn remove(&self, namespace: &str, name: &str) {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&object_key(namespace, name));
        // No receiver is fine: no task keeps anything for it.
        let _ = self
            .removals
            .send((namespace.to_string(), name.to_string()));
    }

    /// Deleted Things as they go. A task that misses some (it fell behind) prunes what it keeps
    /// against [`StateBus::latest`] instead.
    pub fn removals(&self) -> broadcast::Receiver<(String, String)> {
        self.removals.subscribe()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ThingUpdate>> {
        self.tx.subscribe()
    }

    /// The latest state of every Thing in `namespace`.
    pub fn latest(&self, namespace: &str) -> Vec<Arc<ThingUpdate>> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = latest
            .values()
            .filter(|u| u.namespace == namespace)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Utc;

    use super::*;

    fn update(name: &str, temp: i64) -> ThingUpdate {
        ThingUpdate {
            namespace: "ns".into(),
            name: name.into(),
            labels: BTreeMap::new(),
            desired: None,
            reported: Some(serde_json::from_value(serde_json::json!({"temp": temp})).unwrap()),
            delta: None,
            version: Some(temp),
            time: Utc::now(),
        }
    }

    #[tokio::test]
    async fn unchanged_state_is_not_republished_and_latest_is_kept() {
        let bus = StateBus::new(16);
        let mut rx = bus.subscribe();
        assert!(bus.publish(update("a", 1)));
        assert!(!bus.publish(update("a", 1)));
        assert!(bus.publish(update("a", 2)));
        assert_eq!(rx.recv().await.unwrap().version, Some(1));
        assert_eq!(rx.recv().await.unwrap().version, Some(2));
        assert!(rx.try_recv().is_err());
        assert_eq!(bus.latest("ns").len(), 1);
        assert_eq!(bus.latest("other").len(), 0);
        let mut removals = bus.removals();
        bus.remove("ns", "a");
        assert!(bus.latest("ns").is_empty());
        assert_eq!(removals.recv().await.unwrap(), ("ns".into(), "a".into()));
    }
}
