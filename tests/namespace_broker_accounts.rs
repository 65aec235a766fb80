//! Observers and Subscribers act on the broker with their namespace's own account, whose ACL
//! covers only that namespace's topic tree. With topic validation switched off (the failpoint
//! `validation-topic-scope-off`, standing in for a bug in it), a Subscriber of one namespace
//! still cannot subscribe to another namespace's topics and an Observer cannot publish onto
//! them: the broker refuses. (With validation on, the same specs are `InvalidSpec`:
//! tests/hostile_tenant.rs.)

mod common;
mod mosquitto_support;

use common::{Setup, TestNamespace, create_resource, thing};
use kube::Api;
use mosquitto_support::{Credentials, Device, DeviceEvent, topic_prefix};
use serde_json::{Value, json};
use thing_operator::api::{Observer, Subscriber, Thing};

#[tokio::test]
async fn the_broker_confines_a_namespace_where_validation_does_not() {
    let s = Setup::new("acct-a").await;
    let (env, admin, tenant_a) = (&s.env, &s.client, &s.ns);
    let tenant_b = TestNamespace::create(env, admin, "acct-b").await;
    let tenant_b: &str = &tenant_b;
    let prefix = topic_prefix();
    let operator = s
        .operator()
        .cluster_wide()
        .mqtt(&prefix)
        .failpoint("validation-topic-scope-off=return")
        .ready()
        .await;
    let a_tree = format!("{prefix}/namespaces/{tenant_a}");
    let b_tree = format!("{prefix}/namespaces/{tenant_b}");

    // The test's own eyes on both trees, with the broker's admin account.
    let mut watcher = Device::start(
        &Credentials::admin(env),
        vec![format!("{a_tree}/#"), format!("{b_tree}/#")],
    );
    watcher.connected().await;
    assert_eq!(watcher.suback().await, vec![true, true]);

    let b_things: Api<Thing> = Api::namespaced(admin.clone(), tenant_b);
    thing("inbox")
        .broker("Azure")
        .desired(json!({"seq": 0}))
        .create(&b_things)
        .await;

    // Subscribers: one on tenant-a's tree (validation let it through), one on tenant-b's own.
    let b_subscribers: Api<Subscriber> = Api::namespaced(admin.clone(), tenant_b);
    create_resource(
        &b_subscribers,
        "spy",
        json!({"source": {"mqtt": {"topicFilter": format!("{a_tree}/#")}},
               "target": {"thingName": "inbox", "field": "Desired", "path": "/spied"}}),
    )
    .await;
    s.wait_ready(&b_subscribers, "spy").await;
    s.wait_for(
        "the broker refusing tenant-b's subscription to tenant-a's tree",
        || async {
            let refused = operator
                .metric(
                    "thing_operator_mqtt_subscriptions_refused_total",
                    &[&format!("namespace=\"{tenant_b}\"")],
                )
                .await;
            (refused >= 1.0).then_some(())
        },
    )
    .await;
    create_resource(
        &b_subscribers,
        "own",
        json!({"source": {"mqtt": {"topicFilter": format!("{b_tree}/in")}},
               "target": {"thingName": "inbox", "field": "Desired", "path": "/own"}}),
    )
    .await;
    s.wait_ready(&b_subscribers, "own").await;
    // The account works where it may: tenant-b's own topic reaches its Thing. Published until
    // it lands (the subscription is made asynchronously after Ready).
    let publisher = Device::start(&Credentials::admin(env), vec![]);
    s.wait_for("tenant-b's own topic written into its Thing", || async {
        publisher
            .publish(
                &format!("{a_tree}/secret"),
                json!({"pin": 1234}).to_string(),
            )
            .await;
        publisher
            .publish(&format!("{b_tree}/in"), json!({"hello": 1}).to_string())
            .await;
        let desired = b_things.get("inbox").await.ok()?.spec.desired?;
        (desired.0.get("own") == Some(&json!({"hello": 1}))).then_some(())
    })
    .await;
    // Observers: one publishing onto tenant-a's state topic, one onto tenant-b's own tree.
    let b_observers: Api<Observer> = Api::namespaced(admin.clone(), tenant_b);
    let forwarded = |name: &'static str| {
        let api = b_observers.clone();
        async move {
            api.get(name)
                .await
                .ok()?
                .status?
                .forwarded
                .filter(|n| *n >= 1)
        }
    };
    create_resource(
        &b_observers,
        "overwrite",
        json!({"source": {"thingName": "inbox"}, "filter": {"section": "Desired"},
               "sink": {"mqtt": {"topic": format!("{a_tree}/things/lamp/state"), "qos": 1}}}),
    )
    .await;
    s.wait_ready(&b_observers, "overwrite").await;
    // The broker acknowledged the publish (QoS 1) before the Observer counted it: by then it
    // has either routed it to the watcher or dropped it.
    s.wait_for("the overwrite Observer's publish acknowledged", || {
        forwarded("overwrite")
    })
    .await;
    create_resource(
        &b_observers,
        "own-out",
        json!({"source": {"thingName": "inbox"}, "filter": {"section": "Desired"},
               "sink": {"mqtt": {"topic": format!("{b_tree}/out"), "qos": 1}}}),
    )
    .await;
    s.wait_for("the own-out Observer's publish acknowledged", || {
        forwarded("own-out")
    })
    .await;
    // A sentinel after both: whatever the broker routed to the watcher before it has arrived
    // once the sentinel has.
    let sentinel = format!("{a_tree}/sentinel");
    publisher.publish(&sentinel, "{}").await;
    let mut seen = Vec::new();
    watcher
        .next("the sentinel", |e| match e {
            DeviceEvent::Message(topic, _) if *topic == sentinel => Some(()),
            DeviceEvent::Message(topic, payload) => {
                seen.push((
                    topic.clone(),
                    serde_json::from_slice::<Value>(payload).unwrap_or(Value::Null),
                ));
                None
            }
            _ => None,
        })
        .await;
    assert!(
        seen.iter().any(|(t, _)| *t == format!("{b_tree}/out")),
        "tenant-b's own Observer published: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|(t, _)| *t == format!("{a_tree}/things/lamp/state")),
        "tenant-b's account must not publish onto tenant-a's tree: {seen:?}"
    );
}
