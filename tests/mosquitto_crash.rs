//! Crash safety of Mosquitto provisioning: the operator exits (a crash, as far as the broker and
//! Kubernetes can tell) right after writing the device Secret, and right after creating the
//! broker client; a restarted operator converges with the password already in the Secret, so a
//! device holding it connects and no credential is lost or orphaned.
//!
//! Needs the `failpoints` feature: `cargo test --features failpoints --test mosquitto_crash`.
#![cfg(feature = "failpoints")]

mod common;
mod mosquitto_support;

use std::{
    path::PathBuf,
    process::{Child, Command},
    sync::OnceLock,
    time::Duration,
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use thing_operator::api::Thing;

use common::{TestEnv, create_namespace, delete_namespace, free_port, wait_for};
use mosquitto_support::{Credentials, try_connect};

/// A private copy of the operator binary: a concurrent `cargo build` without the feature would
/// replace target/debug/thing-operator with one that never crashes where it is told to.
fn binary() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_BIN_EXE_thing-operator"));
        let dst = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "thing-operator-mq-failpoints-{}",
            std::process::id()
        ));
        std::fs::copy(&src, &dst).expect("copy the operator binary");
        let bytes = std::fs::read(&dst).unwrap();
        assert!(
            bytes.windows(20).any(|w| w == b"exiting like a crash"),
            "{} was built without the failpoints feature",
            src.display()
        );
        dst
    })
}

fn spawn(env: &TestEnv, ns: &str, prefix: &str, failpoint: Option<&str>) -> Child {
    let log = std::fs::File::create(
        env.dir
            .join("logs")
            .join(format!("operator-{ns}-{}.log", free_port())),
    )
    .unwrap();
    let mut cmd = Command::new(binary());
    cmd.args([
        "run",
        "--http-addr",
        &format!("127.0.0.1:{}", free_port()),
        "--watch-namespace",
        ns,
    ])
    .args([
        "--mqtt-url",
        &env.var("MQTT_URL"),
        "--mqtt-username",
        &env.var("MQTT_ADMIN_USER"),
    ])
    .args([
        "--mqtt-password-file",
        &env.var("MQTT_ADMIN_PASSWORD_FILE"),
        "--mqtt-topic-prefix",
        prefix,
    ])
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .env("KUBECONFIG", env.var("OPERATOR_KUBECONFIG"))
    .env("RUST_LOG", "info,thing_operator=debug,kube_runtime=warn")
    .stdout(log.try_clone().unwrap())
    .stderr(log);
    if let Some(fp) = failpoint {
        cmd.env("FAILPOINTS", format!("{fp}=return"));
    }
    cmd.spawn().expect("operator starts")
}

async fn password(secrets: &Api<Secret>) -> Option<String> {
    let s = secrets.get_opt("d-device").await.ok()??;
    let v = s.data?.get("password")?.0.clone();
    String::from_utf8(v).ok()
}

#[tokio::test]
async fn crash_after_each_provisioning_step_converges() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    for failpoint in [
        "mosquitto-after-secret-written",
        "mosquitto-after-client-created",
    ] {
        let ns = create_namespace(&client, "mq-crash").await;
        let prefix = format!("t{:08x}", rand::random::<u32>());
        let things: Api<Thing> = Api::namespaced(client.clone(), &ns);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let mut crashing = spawn(&env, &ns, &prefix, Some(failpoint));
        let thing: Thing = serde_json::from_value(json!({
            "apiVersion": "iot.thing-operator.dev/v1alpha1", "kind": "Thing",
            "metadata": {"name": "d"}, "spec": {"desired": {"x": 1}},
        }))
        .unwrap();
        things
            .patch("d", &PatchParams::apply("test"), &Patch::Apply(&thing))
            .await
            .unwrap();
        let code = wait_for(
            "operator crash at the failpoint",
            Duration::from_secs(60),
            || {
                let status = crashing.try_wait().ok().flatten();
                async move { status.map(|s| s.code()) }
            },
        )
        .await;
        assert_eq!(code, Some(86), "{failpoint}: exit code");

        // The Secret was written before the broker heard of the password.
        let before = password(&secrets)
            .await
            .expect("Secret written before the crash");
        let thing_name = format!("{ns}_d");
        let creds = Credentials {
            endpoint: format!("127.0.0.1:{}", env.var("MQTT_PORT")),
            client_id: thing_name.clone(),
            username: thing_name.clone(),
            password: before.clone(),
            thing_name,
            topic: String::new(),
        };
        if failpoint == "mosquitto-after-secret-written" {
            assert!(try_connect(&creds).await.is_err(), "no broker client yet");
        }

        let mut operator = spawn(&env, &ns, &prefix, None);
        wait_for(
            "Thing Ready after the restart",
            Duration::from_secs(60),
            || async {
                let t = things.get_opt("d").await.ok().flatten()?;
                t.status
                    .as_ref()
                    .is_some_and(|s| s.conditions.is_true("Ready"))
                    .then_some(())
            },
        )
        .await;
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
        wait_for("Thing deleted", Duration::from_secs(60), || async {
            things
                .get_opt("d")
                .await
                .ok()
                .flatten()
                .is_none()
                .then_some(())
        })
        .await;
        assert!(try_connect(&creds).await.is_err(), "broker client removed");
        let _ = operator.kill();
        let _ = operator.wait();
        delete_namespace(&client, &ns).await;
    }
}
