//! The one [`StateFeed`] of a running operator: news about a Thing's state goes to the Observers'
//! state bus, the REST message broker's retained state topics and the Thing controller's queue.
//! Built by `runner.rs`; the parts it connects never import each other.

use std::sync::Mutex;

use crate::{
    api::{Thing, ThingStatus, ThingUpdate},
    controller::ThingTrigger,
    feed::StateFeed,
    forwarding::{StateBus, provenance::ProvenanceBook},
    rest_broker::StatePublisher,
};

pub struct Wiring {
    bus: StateBus,
    trigger: ThingTrigger,
    /// What the operator's own writes into Things caused; a deleted Thing's entry goes with it
    /// (otherwise every Thing ever written by a Subscriber or Observer stays in memory).
    provenance: ProvenanceBook,
    /// Installed once the MQTT connection exists; until then (or without a broker) state goes
    /// to the bus only. The online flag is kept so a publisher installed late starts right.
    publisher: Mutex<(Option<StatePublisher>, bool)>,
}

impl Wiring {
    pub fn new(bus: StateBus, trigger: ThingTrigger, provenance: ProvenanceBook) -> Self {
        Self {
            bus,
            trigger,
            provenance,
            publisher: Mutex::new((None, false)),
        }
    }

    /// Starts publishing retained state through `publisher`.
    pub fn install_publisher(&self, publisher: StatePublisher) {
        let mut slot = self.publisher.lock().unwrap_or_else(|p| p.into_inner());
        publisher.set_online(slot.1);
        slot.0 = Some(publisher);
    }

    fn with_publisher(&self, f: impl FnOnce(&StatePublisher)) {
        let slot = self.publisher.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(publisher) = &slot.0 {
            f(publisher);
        }
    }
}

impl StateFeed for Wiring {
    fn thing_state(&self, thing: &Thing, status: &ThingStatus) {
        // Non-blocking and de-duplicated on both sides.
        self.with_publisher(|p| p.publish(thing, status));
        self.bus.publish(ThingUpdate::of_thing(thing, status));
    }

    fn device_state(&self, update: ThingUpdate) {
        self.bus.publish(update);
    }

    fn request_reconcile(&self, namespace: &str, name: &str) {
        self.trigger.request(namespace, name);
    }

    fn broker_online(&self, online: bool) {
        let mut slot = self.publisher.lock().unwrap_or_else(|p| p.into_inner());
        slot.1 = online;
        if let Some(publisher) = &slot.0 {
            publisher.set_online(online);
        }
    }

    fn thing_removed(&self, namespace: &str, name: &str) {
        self.bus.remove(namespace, name);
        self.trigger.forget(namespace, name);
        self.provenance.forget(namespace, name);
        self.with_publisher(|p| p.clear(namespace, name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{JsonObject, observer::StateSection},
        forwarding::provenance::Provenance,
    };

    #[test]
    fn a_removed_thing_leaves_no_provenance_behind() {
        let book = ProvenanceBook::default();
        let (trigger, _rx) = ThingTrigger::channel();
        let wiring = Wiring::new(StateBus::default(), trigger, book.clone());
        let desired: JsonObject = serde_json::from_value(serde_json::json!({"on": true})).unwrap();
        let chained = Provenance {
            origin: "ns/a".into(),
            hops: 1,
        };
        book.record("ns", "b", chained.clone(), desired.clone());
        let update = ThingUpdate {
            namespace: "ns".into(),
            name: "b".into(),
            labels: Default::default(),
            desired: Some(desired),
            reported: None,
            delta: None,
            version: None,
            time: chrono::Utc::now(),
        };
        assert_eq!(book.of_update(&update, StateSection::Desired), chained);

        wiring.thing_removed("ns", "b");
        // A Thing of the same name created later starts its own chains.
        assert_eq!(
            book.of_update(&update, StateSection::Desired),
            Provenance::start("ns/b".into())
        );
    }
}
