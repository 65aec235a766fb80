//! The operator survives a kube-apiserver restart and converges afterwards. Its own test
//! binary, because it restarts the API server every other test shares.

mod common;

use std::time::Duration;

use common::{OperatorProcess, TestEnv, create_namespace, delete_namespace, wait_for};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use thing_operator::api::Thing;

const WAIT: Duration = Duration::from_secs(90);

fn thing(name: &str) -> Thing {
    common::resource(
        "Thing",
        name,
        json!({"broker": "Azure", "desired": {"on": true}}),
    )
}

#[tokio::test]
async fn operator_survives_an_apiserver_restart() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "restart").await;
    let mut op = OperatorProcess::start(&env, &ns, &[], &[]);
    op.wait_ready().await;
    let api: Api<Thing> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &thing("before"))
        .await
        .unwrap();
    wait_for("first Thing reconciled", WAIT, || async {
        api.get("before")
            .await
            .ok()?
            .status?
            .conditions
            .get("Ready")
            .map(|_| ())
    })
    .await;

    env.script("stop-apiserver");
    // While the API server is down the operator keeps running and keeps serving health.
    wait_for("operator notices the outage", WAIT, || async {
        op.logs().contains("controller stream error").then_some(())
    })
    .await;
    assert_eq!(op.get("/healthz").await.map(|r| r.0), Some(200));
    assert!(
        op.is_running(),
        "operator died with the API server down:\n{}",
        op.logs()
    );
    env.script("start-apiserver");

    // New work after the restart is picked up, and deletion of old work completes.
    let client = env.admin_client().await;
    let api: Api<Thing> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &thing("after"))
        .await
        .unwrap();
    wait_for(
        "Thing created after the restart reconciled",
        WAIT,
        || async {
            api.get("after")
                .await
                .ok()?
                .status?
                .conditions
                .get("Ready")
                .map(|_| ())
        },
    )
    .await;
    api.delete("before", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("Thing deleted after the restart", WAIT, || async {
        api.get_opt("before").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(op.is_running());
    delete_namespace(&client, &ns).await;
}
