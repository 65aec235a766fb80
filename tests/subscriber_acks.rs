//! An acknowledgement is a promise: a Subscriber acknowledges an MQTT QoS 1 message only once
//! it is written into the Thing, and the namespace's broker session is persistent, so a
//! `kill -9` of the operator at any moment loses nothing the broker took from the sender; and an
//! Observer delivering that Thing's state while the operator is killed reaches its sink with all
//! of it (state, not events: a restarted Observer delivers the latest state it has not
//! delivered).

mod common;

use common::{Setup, create_resource, http_receiver, thing};
use kube::Api;
use serde_json::json;
use thing_operator::api::{Observer, Subscriber, Thing};

/// How many of `keys` (k1..kN) the Thing's `spec.desired.keys` holds.
async fn landed(things: &Api<Thing>) -> usize {
    things
        .get("sink")
        .await
        .ok()
        .and_then(|t| t.spec.desired)
        .and_then(|d| d.0.get("keys").and_then(|k| k.as_object()).map(|k| k.len()))
        .unwrap_or(0)
}

#[tokio::test]
async fn every_acknowledged_message_lands_across_kill_9() {
    let s = Setup::new("sub-kill").await;
    let ns = &s.ns;
    let prefix = format!("t-{ns}");
    let (sink_url, delivered) = http_receiver().await;
    let builder = s
        .operator()
        .mqtt(&prefix)
        .args(["--http-sink-allow-cidr", "127.0.0.0/8"]);
    let mut operator = builder.ready().await;
    let things = s.things();
    thing("sink")
        .broker("Azure")
        .desired(json!({}))
        .create(&things)
        .await;
    let subscribers: Api<Subscriber> = s.api();
    let topic = format!("{prefix}/namespaces/{ns}/keys");
    create_resource(
        &subscribers,
        "keys",
        json!({"source": {"mqtt": {"topicFilter": topic, "qos": 1}},
               "target": {"thingName": "sink", "field": "Desired", "path": "/keys"}}),
    )
    .await;
    s.wait_ready(&subscribers, "keys").await;
    let observers: Api<Observer> = s.api();
    create_resource(
        &observers,
        "keys-out",
        json!({"source": {"thingName": "sink"}, "filter": {"section": "Desired"},
               "sink": {"http": {"url": sink_url}}}),
    )
    .await;
    s.wait_ready(&observers, "keys-out").await;

    let mut options = rumqttc::MqttOptions::new(
        format!("sender-{ns}"),
        "127.0.0.1",
        s.env.var("MQTT_PORT").parse().unwrap(),
    );
    options.set_credentials(s.env.var("MQTT_ADMIN_USER"), s.env.mqtt_admin_password());
    let (sender, mut eventloop) = rumqttc::AsyncClient::new(options, 1024);
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = acked.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_))) => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    });
    let send = |key: usize| {
        let (sender, topic) = (sender.clone(), topic.clone());
        async move {
            sender
                .publish(
                    topic,
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    json!({ format!("k{key}"): key }).to_string(),
                )
                .await
                .expect("publish queued");
        }
    };
    // The subscription must exist before the broker keeps anything for the session: a probe
    // until one lands (messages before it are nobody's promise).
    s.wait_for("the subscription live", || async {
        send(0).await;
        (landed(&things).await >= 1).then_some(())
    })
    .await;

    const MESSAGES: usize = 200;
    for round in 0..2 {
        let (from, to) = (1 + round * 100, 100 + round * 100);
        for key in from..=to {
            send(key).await;
        }
        // Killed while they flow: some are written, some in the task, some at the broker.
        let some = round * 100 + 30;
        s.wait_for("part of the round written", || async {
            (landed(&things).await > some).then_some(())
        })
        .await;
        operator.kill();
        operator = builder.ready().await;
    }
    s.wait_for(
        "the broker to acknowledge every message to the sender",
        || async { (acked.load(std::sync::atomic::Ordering::SeqCst) >= MESSAGES).then_some(()) },
    )
    .await;
    let keys = s
        .wait_for("every acknowledged message in the Thing", || async {
            let t = things.get("sink").await.ok()?;
            let keys = t.spec.desired?.0.get("keys")?.as_object()?.clone();
            (keys.len() > MESSAGES).then_some(keys)
        })
        .await;
    for key in 1..=MESSAGES {
        assert_eq!(keys.get(&format!("k{key}")), Some(&json!(key)), "k{key}");
    }
    // The Observer's sink: what was acknowledged reached it too, across both kills.
    let last = s
        .wait_for("the sink receiving every acknowledged message", || async {
            let events = delivered.lock().unwrap().clone();
            events.into_iter().rev().find(|e| {
                e["data"]["state"]["keys"]
                    .as_object()
                    .is_some_and(|k| k.len() > MESSAGES)
            })
        })
        .await;
    for key in 1..=MESSAGES {
        assert_eq!(
            last["data"]["state"]["keys"][format!("k{key}")],
            json!(key),
            "k{key} at the sink"
        );
    }
}
