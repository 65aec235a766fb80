//! The foundation against a real kube-apiserver: finalizers, conditions, validation, Events,
//! deletion, no hot loops.

mod common;

use common::{Setup, condition, merge_patch, thing};
use k8s_openapi::api::events::v1::Event;
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};
use serde_json::json;
use thing_operator::api::FINALIZER;

#[tokio::test]
async fn thing_gets_finalizer_and_conditions_and_deletion_completes() {
    let s = Setup::new("found").await;
    let _op = s.operator().ready().await;
    let api = s.things();
    // AWS is not configured in this operator: the Thing must say so, not hang silently.
    thing("dev1")
        .broker("AWS")
        .desired(json!({"temp": 21}))
        .create(&api)
        .await;
    let t = s
        .wait_until(&api, "dev1", "finalizer and Ready condition", |t| {
            t.metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
                && condition(t, "Ready").is_some()
        })
        .await;
    let status = t.status.clone().unwrap();
    let ready = status.conditions.get("Ready").unwrap();
    assert_eq!(ready.status, thing_operator::api::ConditionStatus::False);
    assert_eq!(ready.reason, "BackendNotConfigured");
    assert!(ready.message.contains("AWS"), "{}", ready.message);
    assert_eq!(ready.observed_generation, t.metadata.generation);
    assert_eq!(status.observed_generation, t.metadata.generation);
    assert!(status.conditions.get("Provisioned").is_some());

    api.delete("dev1", &DeleteParams::default()).await.unwrap();
    s.wait_gone(&api, "dev1").await;
}

#[tokio::test]
async fn invalid_thing_gets_invalid_spec_and_an_event_and_no_hot_loop() {
    let s = Setup::new("invalid").await;
    let op = s.operator().ready().await;
    let api = s.things();
    // Passes the 1.20 API server's schema (no CEL there) but breaks the operator's own rules.
    let big = "x".repeat(9000);
    thing("bad")
        .desired(json!({"blob": big}))
        .field("attributes", json!({"bad key!": "v"}))
        .create(&api)
        .await;
    let msg = &s
        .wait_condition(&api, "bad", "Ready", |c| c.reason == "InvalidSpec")
        .await
        .message;
    assert!(
        msg.contains("desired is") && msg.contains("over the limit of 8192"),
        "{msg}"
    );
    assert!(msg.contains("attribute name \"bad key!\""), "{msg}");

    let events: Api<Event> = s.api();
    let ev = s
        .wait_for("InvalidSpec event", || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("InvalidSpec")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bad")
            })
        })
        .await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert!(ev.note.unwrap_or_default().contains("over the limit"));

    // Make the operator reconcile again without changing the spec (a label change), and wait
    // until it has: the second reconcile must not write status nor publish another Event.
    let writes_before = op
        .metric("thing_operator_status_writes_total", &["kind=\"Thing\""])
        .await;
    let events_before = op
        .metric("thing_operator_events_total", &["InvalidSpec"])
        .await;
    let reconciles_before = op
        .metric("thing_operator_reconciles_total", &["kind=\"Thing\""])
        .await;
    assert_eq!(writes_before, 1.0, "one status write for the invalid spec");
    merge_patch(&api, "bad", json!({"metadata": {"labels": {"poke": "1"}}})).await;
    s.wait_for("a reconcile after the label change", || async {
        let n = op
            .metric("thing_operator_reconciles_total", &["kind=\"Thing\""])
            .await;
        (n > reconciles_before).then_some(())
    })
    .await;
    assert_eq!(
        op.metric("thing_operator_status_writes_total", &["kind=\"Thing\""])
            .await,
        writes_before
    );
    assert_eq!(
        op.metric("thing_operator_events_total", &["InvalidSpec"])
            .await,
        events_before
    );
    let settled = op
        .metric("thing_operator_reconciles_total", &["kind=\"Thing\""])
        .await;
    // The reconcile triggered by the operator's own status write, then the label change: a
    // loop would keep counting. Compare against a second snapshot taken after more work
    // elsewhere in the system (a second Thing reaching its condition).
    thing("good").broker("Azure").create(&api).await;
    s.wait_condition(&api, "good", "Ready", |_| true).await;
    let after = op
        .metric("thing_operator_reconciles_total", &["kind=\"Thing\""])
        .await;
    assert!(
        after - settled <= 4.0,
        "reconciles kept running: {settled} -> {after}"
    );

    // Fixing the spec clears InvalidSpec.
    merge_patch(
        &api,
        "bad",
        json!({"spec": {"desired": {"blob": "small"}, "attributes": null}}),
    )
    .await;
    s.wait_condition(&api, "bad", "Ready", |c| c.reason != "InvalidSpec")
        .await;
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let s = Setup::new("term").await;
    let mut op = s.operator().ready().await;
    assert_eq!(op.get("/healthz").await.map(|r| r.0), Some(200));
    assert!(
        op.get("/metrics")
            .await
            .unwrap()
            .1
            .contains("thing_operator_leader")
    );
    assert_eq!(op.terminate(), Some(0), "logs:\n{}", op.logs());
}
