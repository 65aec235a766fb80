//! Loop-safe event graphs: an Observer/Observer cycle between two Things settles (the event
//! that would return to its origin is dropped and counted), and an Observer's CloudEvent fed
//! into a Subscriber writes the state it carries, not the envelope.

mod common;

use common::{Setup, create_resource, merge_patch, thing};
use kube::Api;
use serde_json::{Value, json};
use thing_operator::api::{Observer, Subscriber, Thing};

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[tokio::test]
async fn a_cycle_between_two_things_settles() {
    let s = Setup::new("graph-cycle").await;
    let operator = s.operator().ready().await;
    let things = s.things();
    for name in ["a", "b"] {
        thing(name)
            .broker("Azure")
            .desired(json!({"temp": 1}))
            .create(&things)
            .await;
    }
    let observers: Api<Observer> = s.api();
    for (name, from, to, path) in [
        ("a-to-b", "a", "b", "/fromA"),
        ("b-to-a", "b", "a", "/fromB"),
    ] {
        create_resource(
            &observers,
            name,
            json!({"source": {"thingName": from}, "filter": {"section": "Desired"},
                   "sink": {"thing": {"name": to, "path": path}}}),
        )
        .await;
    }
    let drops = || async {
        operator
            .metric(
                "thing_operator_events_total",
                &["kind=\"Observer\"", "outcome=\"dropped_loop\""],
            )
            .await
    };
    // Each Thing's first state goes over once; what comes back is dropped at its origin.
    s.wait_for("both directions dropped at their origin", || async {
        (drops().await >= 2.0).then_some(())
    })
    .await;
    let settled = drops().await;
    // A fresh change goes over once, and stops there.
    let patched = merge_patch(&things, "a", json!({"spec": {"desired": {"temp": 7}}})).await;
    s.wait_for("the change in b and its echo dropped", || async {
        let b = things.get("b").await.ok()?;
        let from_a = b.spec.desired?.0.get("fromA")?.clone();
        (from_a["temp"] == json!(7) && drops().await > settled).then_some(())
    })
    .await;
    let a = things.get("a").await.unwrap();
    assert_eq!(
        a.metadata.generation, patched.metadata.generation,
        "nothing wrote a's spec again: the echo stopped at its origin"
    );
    for name in ["a", "b"] {
        let desired = Value::Object(
            things
                .get(name)
                .await
                .unwrap()
                .spec
                .desired
                .unwrap()
                .0
                .into_iter()
                .collect(),
        );
        assert!(depth(&desired) <= 3, "{name} nests: {desired}");
    }
}

#[tokio::test]
async fn an_observers_cloud_event_into_a_subscriber_writes_the_state() {
    let s = Setup::new("graph-ce").await;
    let ns = &s.ns;
    let prefix = format!("t-{ns}");
    let _operator = s.operator().mqtt(&prefix).ready().await;
    let things: Api<Thing> = s.things();
    thing("source")
        .broker("Azure")
        .desired(json!({"temp": 21}))
        .create(&things)
        .await;
    thing("mirror")
        .broker("Azure")
        .desired(json!({}))
        .create(&things)
        .await;
    let topic = format!("{prefix}/namespaces/{ns}/bridge");
    let subscribers: Api<Subscriber> = s.api();
    create_resource(
        &subscribers,
        "in",
        json!({"source": {"mqtt": {"topicFilter": topic, "qos": 1}},
               "target": {"thingName": "mirror", "field": "Desired", "path": "/copy"}}),
    )
    .await;
    s.wait_ready(&subscribers, "in").await;
    let observers: Api<Observer> = s.api();
    create_resource(
        &observers,
        "out",
        json!({"source": {"thingName": "source"}, "filter": {"section": "Desired"},
               "sink": {"mqtt": {"topic": topic, "qos": 1}}}),
    )
    .await;
    // The Subscriber may subscribe after the Observer's first publish: change the source
    // until the mirror shows it.
    let mut temp = 21;
    s.wait_for("the source's state in the mirror", || {
        temp += 1;
        let (things, t) = (things.clone(), temp);
        async move {
            merge_patch(&things, "source", json!({"spec": {"desired": {"temp": t}}})).await;
            let copy = things
                .get("mirror")
                .await
                .ok()?
                .spec
                .desired?
                .0
                .get("copy")?
                .clone();
            (copy.get("temp").is_some()).then_some(())
        }
    })
    .await;
    let copy = things.get("mirror").await.unwrap().spec.desired.unwrap().0["copy"].clone();
    assert!(copy.get("temp").is_some(), "{copy}");
    for envelope in ["specversion", "data", "iotorigin", "type"] {
        assert!(
            copy.get(envelope).is_none(),
            "the envelope was written: {copy}"
        );
    }
}
