//! Leader failover with the Mosquitto backend. The shadows live in the leader's memory, so the
//! new leader must rebuild them from the Things' status when it takes over, not from what the
//! status said when it booted (a standby that booted before the device's reports would roll
//! `reported` and `version` back). And a standby must hold no broker session whose last will
//! could announce the operator offline while the leader runs.

mod common;
mod mosquitto_support;

use std::time::Duration;

use serde_json::{Value, json};

use common::{OperatorProcess, Setup, thing};
use mosquitto_support::{Credentials, Device, DeviceEvent, topic_prefix};
use thing_operator::api::Thing;

const WAIT: Duration = Duration::from_secs(90);

async fn leads(op: &OperatorProcess) -> bool {
    op.metric("thing_operator_leader", &[]).await == 1.0
}

#[tokio::test]
async fn failover_keeps_the_shadow_and_a_standby_death_keeps_the_operator_online() {
    let s = Setup::new("failover").await.timeout(WAIT);
    let prefix = topic_prefix();
    let replica = s
        .operator()
        .mqtt(&prefix)
        .leader_elect(&format!("lease-{}", s.ns));
    let mut leader = replica.clone().env("POD_NAME", "replica-a").start();
    leader.wait_ready().await;
    s.wait_for("replica-a leads", || async {
        leads(&leader).await.then_some(())
    })
    .await;
    // Two standbys, booted before the device reports anything.
    let successor = replica.clone().env("POD_NAME", "replica-b").start();
    let mut spare = replica.env("POD_NAME", "replica-c").start();
    successor.wait_ready().await;
    spare.wait_ready().await;

    let things = s.things();
    thing("lamp").broker("Mosquitto").create(&things).await;
    s.wait_ready(&things, "lamp").await;
    let secret = s
        .api::<k8s_openapi::api::core::v1::Secret>()
        .get("lamp-device")
        .await
        .expect("lamp's Secret");
    let creds = Credentials::from_secret(&secret);
    let get_accepted = format!("{}/shadow/get/accepted", creds.topic);
    let mut device = Device::start(&creds, vec![get_accepted.clone()]);
    device.connected().await;
    for n in 1..=3 {
        device
            .publish(
                &format!("{}/shadow/update", creds.topic),
                json!({"state": {"reported": {"n": n}}}).to_string(),
            )
            .await;
    }
    let reported = s
        .wait_until(
            &things,
            "lamp",
            "the third report in status",
            |t: &Thing| {
                t.status
                    .as_ref()
                    .and_then(|st| st.reported.as_ref())
                    .and_then(|r| r.0.get("n"))
                    == Some(&json!(3))
            },
        )
        .await;
    let version = reported
        .status
        .and_then(|st| st.version)
        .expect("a shadow version in status");

    // A standby dies: the operator's retained status stays "online".
    spare.kill();
    let mut watcher = Device::start(
        &Credentials::admin(&s.env),
        vec![format!("{prefix}/_operator/status")],
    );
    watcher.connected().await;
    let status = watcher
        .next("the operator's retained status", |e| match e {
            DeviceEvent::Message(_, payload) => Some(String::from_utf8_lossy(payload).into_owned()),
            _ => None,
        })
        .await;
    assert_eq!(
        status, "online",
        "a standby's death marked the operator offline"
    );

    // The leader dies: replica-b takes over and answers from the shadow as it was.
    leader.kill();
    s.wait_for("replica-b leads", || async {
        leads(&successor).await.then_some(())
    })
    .await;
    // Asked again until the new leader's shadow service answers (bounded).
    let deadline = tokio::time::Instant::now() + WAIT;
    let shadow: Value = loop {
        device
            .publish(&format!("{}/shadow/get", creds.topic), "{}")
            .await;
        if let Ok(answer) =
            tokio::time::timeout(Duration::from_secs(2), device.message(&get_accepted)).await
        {
            break answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new leader never answered a shadow get"
        );
    };
    assert_eq!(shadow["state"]["reported"]["n"], json!(3), "{shadow}");
    let served = shadow["version"].as_i64().expect("a version");
    assert!(
        served >= version,
        "version rolled back: {served} < {version}"
    );
}
