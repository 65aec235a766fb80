//! The operator survives a kube-apiserver restart and converges afterwards. Its own test
//! binary, because it restarts the API server every other test shares.

mod common;

use std::time::Duration;

use common::{Setup, thing};
use kube::api::DeleteParams;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn operator_survives_an_apiserver_restart() {
    let mut s = Setup::new("restart").await.timeout(WAIT);
    let mut op = s.operator().ready().await;
    let api = s.things();
    thing("before")
        .broker("Azure")
        .desired(json!({"on": true}))
        .create(&api)
        .await;
    s.wait_condition(&api, "before", "Ready", |_| true).await;

    s.env.script("stop-apiserver");
    // While the API server is down the operator keeps running and keeps serving health.
    s.wait_for("operator notices the outage", || async {
        op.logs().contains("controller stream error").then_some(())
    })
    .await;
    assert_eq!(op.get("/healthz").await.map(|r| r.0), Some(200));
    assert!(
        op.is_running(),
        "operator died with the API server down:\n{}",
        op.logs()
    );
    s.env.script("start-apiserver");

    // New work after the restart is picked up, and deletion of old work completes.
    s.client = s.env.admin_client().await;
    let api = s.things();
    thing("after")
        .broker("Azure")
        .desired(json!({"on": true}))
        .create(&api)
        .await;
    s.wait_condition(&api, "after", "Ready", |_| true).await;
    api.delete("before", &DeleteParams::default())
        .await
        .unwrap();
    s.wait_gone(&api, "before").await;
    assert!(op.is_running());
}
