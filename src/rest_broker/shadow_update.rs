//! Reported state for a Thing, written the way its device would write it: published on the
//! Thing's `…/shadow/update` topic (see docs/broker.md), where the Mosquitto shadow service
//! takes it like any device report and answers on the usual reply topics.
//!
//! This is the [`ReportedStateWriter`] the runner hands to Subscribers (`target.field:
//! Reported`). It lives here, not in forwarding, because which Things have a shadow behind
//! their topic tree, and what an update looks like there, is this topic tree's contract: the
//! Subscriber tasks stay free of backend knowledge, and a later change (a per-namespace broker
//! identity, another backend taking reported state) is made in this one place.

use kube::ResourceExt;
use rumqttc::{AsyncClient, QoS};
use serde_json::{Value, json};

use crate::{
    api::{Thing, thing::Broker},
    feed::{ReportError, ReportedStateWriter},
    mqtt::topic::{ShadowOp, TopicLayout},
};

/// Publishes shadow updates on the operator's events connection (the one Subscribers and
/// Observers use), so a slow or stuck write never stalls the shadow service's own connection.
pub struct ShadowUpdateWriter {
    /// `None` without a configured broker: every write is refused with the reason.
    mqtt: Option<(AsyncClient, TopicLayout)>,
}

impl ShadowUpdateWriter {
    pub fn new(mqtt: Option<(AsyncClient, TopicLayout)>) -> Self {
        Self { mqtt }
    }
}

/// Refuses a Thing whose backend has no shadow service behind its topic tree. Checked before
/// anything else, so that such a Thing is told so even where no broker is configured.
fn check_backend(thing: &Thing) -> Result<(), ReportError> {
    if thing.spec.broker == Broker::Mosquitto {
        return Ok(());
    }
    Err(ReportError::Unsupported(format!(
        "target.field Reported needs a Mosquitto Thing; {} is on {}",
        thing.name_any(),
        thing.spec.broker
    )))
}

/// The topic and payload of a reported-state update of `thing`. Pure.
fn shadow_update(
    layout: &TopicLayout,
    thing: &Thing,
    reported: &Value,
) -> Result<(String, Vec<u8>), ReportError> {
    let topic = layout
        .thing(&thing.namespace().unwrap_or_default(), &thing.name_any())
        .map_err(|e| ReportError::Unsupported(e.to_string()))?;
    let payload = serde_json::to_vec(&json!({"state": {"reported": reported}}))
        .map_err(|e| ReportError::Unsupported(e.to_string()))?;
    Ok((
        format!("{}/{}", topic.shadow_root(), ShadowOp::Update.as_str()),
        payload,
    ))
}

#[async_trait::async_trait]
impl ReportedStateWriter for ShadowUpdateWriter {
    async fn write_reported(&self, thing: &Thing, reported: &Value) -> Result<(), ReportError> {
        check_backend(thing)?;
        let Some((client, layout)) = &self.mqtt else {
            return Err(ReportError::Unsupported(
                "target.field Reported needs the operator's MQTT broker (--mqtt-url)".into(),
            ));
        };
        let (topic, payload) = shadow_update(layout, thing, reported)?;
        // QoS 1 and not retained: a device report, delivered once the broker has it.
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| {
                ReportError::Failed(format!(
                    "publishing to the shadow of {}: {e}",
                    thing.name_any()
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ThingSpec;

    fn thing(broker: Broker) -> Thing {
        let mut thing = Thing::new(
            "meter",
            serde_json::from_value::<ThingSpec>(json!({ "broker": broker })).unwrap(),
        );
        thing.metadata.namespace = Some("prod".into());
        thing
    }

    #[test]
    fn a_mosquitto_thing_gets_a_device_style_update_on_its_shadow_topic() {
        let layout = TopicLayout::new("things").unwrap();
        let meter = thing(Broker::Mosquitto);
        assert_eq!(check_backend(&meter), Ok(()));
        let (topic, payload) = shadow_update(&layout, &meter, &json!({"kwh": 4})).unwrap();
        assert_eq!(topic, "things/namespaces/prod/things/meter/shadow/update");
        assert_eq!(
            serde_json::from_slice::<Value>(&payload).unwrap(),
            json!({"state": {"reported": {"kwh": 4}}})
        );
    }

    #[tokio::test]
    async fn other_backends_and_a_missing_broker_are_refused_for_good() {
        let no_broker = ShadowUpdateWriter::new(None);
        // The backend is named first, even without a broker.
        for broker in [Broker::Aws, Broker::Azure] {
            let refused = no_broker.write_reported(&thing(broker), &json!({})).await;
            assert!(
                matches!(&refused, Err(ReportError::Unsupported(m)) if m.contains("needs a Mosquitto Thing")),
                "{refused:?}"
            );
        }
        let refused = no_broker
            .write_reported(&thing(Broker::Mosquitto), &json!({}))
            .await;
        assert!(matches!(&refused, Err(ReportError::Unsupported(m)) if m.contains("--mqtt-url")));
    }
}
