//! The message Observers send to `mqtt` and `http` sinks: a CloudEvents 1.0 document in
//! structured mode (JSON), so that any CloudEvents consumer (Knative, Argo Events, a function
//! runtime) takes it without an adapter. Pure; the attributes are documented in docs/events.md.

use serde_json::{Value, json};

use super::provenance::{HOPS_EXTENSION, ORIGIN_EXTENSION, Provenance};
use crate::api::{ThingUpdate, observer::StateSection, thing_url};

fn section_name(section: StateSection) -> &'static str {
    match section {
        StateSection::Reported => "reported",
        StateSection::Desired => "desired",
        StateSection::Delta => "delta",
    }
}

/// The CloudEvent announcing that `data` (the filtered `section` of `update`) passed the filter,
/// carrying its `provenance` (where its chain of events started, how many hops it made).
pub fn cloud_event(
    update: &ThingUpdate,
    section: StateSection,
    data: &Value,
    provenance: &Provenance,
) -> Value {
    let name = section_name(section);
    json!({
        ORIGIN_EXTENSION: provenance.origin,
        HOPS_EXTENSION: provenance.hops,
        "specversion": "1.0",
        // Unique per Thing, state version and report time: a consumer can de-duplicate the
        // re-deliveries at-least-once delivery makes.
        "id": format!("{}/{}/{}-{}", update.namespace, update.name, update.version.unwrap_or(0), update.time.timestamp_micros()),
        "source": thing_url(&update.namespace, &update.name),
        "type": format!("dev.thing-operator.thing.{name}"),
        "subject": update.name,
        "time": update.time.to_rfc3339(),
        "datacontenttype": "application/json",
        "data": {
            "thing": update.name,
            "namespace": update.namespace,
            "section": name,
            "version": update.version,
            "state": data,
        },
    })
}

/// The CloudEvent a dead-letter destination receives: the event that could not be delivered,
/// and why (the error never carries a payload or a header value).
pub fn dead_letter_event(event: &Value, reason: &str) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("dead-letter/{}", event.get("id").and_then(Value::as_str).unwrap_or_default()),
        "source": event.get("source").cloned().unwrap_or(Value::Null),
        "type": "dev.thing-operator.deadletter",
        "subject": event.get("subject").cloned().unwrap_or(Value::Null),
        "time": chrono::Utc::now().to_rfc3339(),
        "datacontenttype": "application/json",
        "data": {"reason": reason, "event": event},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    #[test]
    fn the_event_names_the_thing_by_its_kubernetes_path() {
        let update = ThingUpdate {
            namespace: "prod".into(),
            name: "lamp".into(),
            labels: Default::default(),
            desired: None,
            reported: None,
            delta: None,
            version: Some(7),
            time: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        };
        let provenance = crate::forwarding::provenance::Provenance::start("prod/lamp".into());
        let event = cloud_event(
            &update,
            StateSection::Delta,
            &json!({"on": true}),
            &provenance.next().unwrap(),
        );
        assert_eq!(event["iotorigin"], "prod/lamp");
        assert_eq!(event["iothops"], 1);
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], "prod/lamp/7-1700000000000000");
        assert_eq!(
            event["source"],
            "/apis/iot.thing-operator.dev/v1alpha1/namespaces/prod/things/lamp"
        );
        assert_eq!(event["type"], "dev.thing-operator.thing.delta");
        assert_eq!(event["subject"], "lamp");
        assert_eq!(
            event["data"],
            json!({"thing": "lamp", "namespace": "prod", "section": "delta", "version": 7, "state": {"on": true}})
        );
    }
}
