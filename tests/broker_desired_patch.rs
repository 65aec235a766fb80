//! The REST message broker, inbound: an MQTT client patches a Thing's desired state by
//! publishing on `{thing topic}/desired/patch`; the answer comes on `…/accepted` or
//! `…/rejected`; who may publish there is the broker's ACL (a device of another Thing may not).

mod common;
mod mosquitto_support;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use common::thing;
use mosquitto_support::{Credentials, Device, setup};
use serde_json::json;

/// A client that counts the broker's PUBACKs (so the test knows the broker took a publish).
fn counting_client(creds: &Credentials) -> (rumqttc::AsyncClient, Arc<AtomicUsize>) {
    let (host, port) = creds.endpoint.rsplit_once(':').unwrap();
    let mut options =
        rumqttc::MqttOptions::new(creds.client_id.clone(), host, port.parse().unwrap());
    options.set_credentials(creds.username.clone(), creds.password.clone());
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
    let acked = Arc::new(AtomicUsize::new(0));
    let counter = acked.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_))) => {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    });
    (client, acked)
}

#[tokio::test]
async fn mqtt_clients_patch_desired_state_as_the_acl_allows() {
    let s = setup("broker-in", &[]).await;
    let ns = &s.ns;
    thing("lamp")
        .broker("Azure")
        .desired(json!({"on": false}))
        .create(&s.things)
        .await;
    thing("meter").create(&s.things).await;
    s.wait_ready(&s.things, "meter").await;
    let lamp_topic = format!("{}/namespaces/{ns}/things/lamp/desired/patch", s.prefix);

    // Each client its own id (admin_credentials makes a new one): the broker drops the older
    // of two sessions with the same id.
    let mut watcher = Device::start(&s.admin_credentials(), vec![format!("{lamp_topic}/+")]);
    watcher.connected().await;
    watcher.suback().await;
    // The operator's subscription may come a moment after it is ready: patch until one lands.
    let mut seq = 0;
    s.wait_for("a patch written into spec.desired", || {
        seq += 1;
        let (publisher, topic, things, n) = (
            Device::start(&s.admin_credentials(), vec![]),
            lamp_topic.clone(),
            s.things.clone(),
            seq,
        );
        async move {
            publisher
                .publish(&topic, json!({"on": true, "seq": n}).to_string())
                .await;
            let desired = things.get("lamp").await.ok()?.spec.desired?;
            (desired.0.get("on") == Some(&json!(true))).then_some(())
        }
    })
    .await;
    let accepted = watcher.message(&format!("{lamp_topic}/accepted")).await;
    assert_eq!(accepted["desired"]["on"], json!(true), "{accepted}");

    // Bad input: refused with the reason, nothing written.
    let publisher = Device::start(&s.admin_credentials(), vec![]);
    publisher.publish(&lamp_topic, "{not json").await;
    let rejected = watcher.message(&format!("{lamp_topic}/rejected")).await;
    assert!(
        rejected["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not JSON"),
        "{rejected}"
    );

    // Another Thing's device may not: the broker drops its publish (its role covers only its
    // own shadow topics). Once the broker acknowledged it to the device, it would already be
    // queued to the operator ahead of the admin's next patch.
    let meter = s.credentials("meter").await;
    let (device, acked) = counting_client(&meter);
    device
        .publish(
            lamp_topic.clone(),
            rumqttc::QoS::AtLeastOnce,
            false,
            json!({"hijacked": true}).to_string(),
        )
        .await
        .unwrap();
    s.wait_for("the broker's PUBACK to the device", || async {
        (acked.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    publisher
        .publish(&lamp_topic, json!({"after": 1}).to_string())
        .await;
    let desired = s
        .wait_for("the admin's later patch", || async {
            let d = s.things.get("lamp").await.ok()?.spec.desired?;
            d.0.get("after").is_some().then_some(d)
        })
        .await;
    assert!(desired.0.get("hijacked").is_none(), "{desired:?}");
}
