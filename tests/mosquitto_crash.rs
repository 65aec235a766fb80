//! Crash safety of Mosquitto provisioning: the operator exits (a crash, as far as the broker and
//! Kubernetes can tell) right after writing the device Secret, and right after creating the
//! broker client; a restarted operator converges with the password already in the Secret, so a
//! device holding it connects and no credential is lost or orphaned.
//!
//! Needs the `failpoints` feature: `cargo test --features failpoints --test mosquitto_crash`.
#![cfg(feature = "failpoints")]

mod common;
mod mosquitto_support;

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;

use common::{Setup, thing};
use mosquitto_support::{Credentials, topic_prefix, try_connect};

async fn password(secrets: &Api<Secret>) -> Option<String> {
    let s = secrets.get_opt("d-device").await.ok()??;
    let v = s.data?.get("password")?.0.clone();
    String::from_utf8(v).ok()
}

#[tokio::test]
async fn crash_after_each_provisioning_step_converges() {
    for failpoint in [
        "mosquitto-after-secret-written",
        "mosquitto-after-client-created",
    ] {
        let s = Setup::new("mq-crash").await;
        let ns = &s.ns;
        // The private copy of the failpoints build: a concurrent build without the feature would
        // replace the binary under test with one that never crashes where it is told to.
        let operator = s.operator().mqtt(&topic_prefix()).failpoints_binary();
        let things = s.things();
        let secrets: Api<Secret> = s.api();
        let mut crashing = operator
            .clone()
            .failpoint(&format!("{failpoint}=return"))
            .start();
        let d = thing("d").desired(json!({"x": 1})).build();
        things
            .patch("d", &PatchParams::apply("test"), &Patch::Apply(&d))
            .await
            .unwrap();
        let code = crashing
            .wait_exit("operator crash at the failpoint", s.timeout)
            .await;
        assert_eq!(code, Some(86), "{failpoint}: exit code");

        // The Secret was written before the broker heard of the password.
        let before = password(&secrets)
            .await
            .expect("Secret written before the crash");
        let thing_name = format!("{ns}_d");
        let creds = Credentials {
            endpoint: format!("127.0.0.1:{}", s.env.var("MQTT_PORT")),
            client_id: thing_name.clone(),
            username: thing_name.clone(),
            password: before.clone(),
            thing_name,
            topic: String::new(),
        };
        if failpoint == "mosquitto-after-secret-written" {
            assert!(try_connect(&creds).await.is_err(), "no broker client yet");
        }

        let _operator = operator.start();
        s.wait_ready(&things, "d").await;
        assert_eq!(
            password(&secrets).await.as_deref(),
            Some(before.as_str()),
            "{failpoint}: password kept"
        );
        try_connect(&creds)
            .await
            .unwrap_or_else(|e| panic!("{failpoint}: device refused: {e}"));

        // Clean up through the operator (the finalizer removes the broker client).
        things.delete("d", &Default::default()).await.unwrap();
        s.wait_gone(&things, "d").await;
        assert!(try_connect(&creds).await.is_err(), "broker client removed");
    }
}
