//! The Thing reconciler against a mocked API server and the debug backend: finalizer path,
//! status writes, conditions, Events and requeue decisions, without a cluster.

use std::sync::Arc;

use kube::runtime::controller::Action;
use serde_json::json;

use super::reconcile;
use crate::{
    api::{ConditionStatus, Thing, conditions::types, thing::Broker},
    controller::fixtures::{self, ApiServer, finalized, thing},
    provider::debug::{Call, DebugError, DebugProvider, Script},
};

fn setup() -> (
    Arc<DebugProvider>,
    Arc<crate::controller::Context>,
    ApiServer,
) {
    let provider = Arc::new(DebugProvider::new(Broker::Mosquitto));
    let (ctx, server) = fixtures::context(provider.clone());
    (provider, ctx, server)
}

/// Reconciles the Thing as the API server stores it now (what the next watch event delivers).
async fn reconcile_stored(
    server: &ApiServer,
    ctx: &Arc<crate::controller::Context>,
    t: &Thing,
) -> crate::Result<Action> {
    reconcile(Arc::new(server.thing(t)), ctx.clone()).await
}

fn ready(t: &Thing) -> (ConditionStatus, String) {
    let c = t
        .status
        .as_ref()
        .and_then(|s| s.conditions.get(types::READY))
        .expect("a Ready condition");
    (c.status, c.reason.clone())
}

fn events(server: &ApiServer) -> Vec<(String, String)> {
    server.requests().iter().filter_map(|r| r.event()).collect()
}

fn status_writes(server: &ApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.is_status_write())
        .count()
}

#[tokio::test]
async fn first_reconcile_adds_the_finalizer_then_provisions() {
    let (provider, ctx, server) = setup();
    let t = thing("lamp", json!({}));
    server.seed(&t);

    reconcile_stored(&server, &ctx, &t)
        .await
        .expect("reconciles");

    let requests = server.requests();
    assert_eq!(requests[0].method, "PATCH", "{requests:?}");
    assert!(!requests[0].is_status_write());
    assert_eq!(
        requests[0].body["metadata"]["finalizers"],
        json!([crate::api::FINALIZER])
    );
    assert_eq!(
        server.thing(&t).metadata.finalizers,
        Some(vec![crate::api::FINALIZER.to_string()])
    );
    assert_eq!(
        provider.calls().len(),
        1,
        "provisioned in the same reconcile"
    );
    assert_eq!(status_writes(&server), 1);
    assert_eq!(
        ready(&server.thing(&t)),
        (ConditionStatus::True, "Reconciled".into())
    );
}

#[tokio::test]
async fn no_backend_call_until_the_finalizer_is_stored() {
    let (provider, ctx, server) = setup();
    // Never stored: the API server refuses the finalizer patch (404).
    let t = thing("lamp", json!({}));

    reconcile(Arc::new(t), ctx.clone())
        .await
        .expect_err("the finalizer could not be added");

    assert!(
        provider.calls().is_empty(),
        "no backend call before the finalizer is durable"
    );
    assert!(server.requests().iter().all(|r| !r.is_status_write()));
}

#[tokio::test]
async fn a_healthy_device_is_written_once_and_announced_once() {
    let (provider, ctx, server) = setup();
    let t = finalized(thing("lamp", json!({"desired": {"on": true}})));
    server.seed(&t);

    let action = reconcile_stored(&server, &ctx, &t)
        .await
        .expect("reconciles");
    assert_ne!(action, Action::await_change(), "a Ready Thing is resynced");
    assert_eq!(
        provider.calls(),
        vec![Call::Reconcile {
            thing: "team-a/lamp".into(),
            backend_name: "team-a_lamp".into()
        }]
    );
    assert_eq!(
        ready(&server.thing(&t)),
        (ConditionStatus::True, "Reconciled".into())
    );
    assert_eq!(status_writes(&server), 1);
    assert_eq!(
        events(&server),
        vec![("Reconciled".into(), "Normal".into())]
    );

    // The next reconcile sees its own status: nothing to write, nothing to announce.
    server.clear();
    reconcile_stored(&server, &ctx, &t)
        .await
        .expect("reconciles");
    assert_eq!(status_writes(&server), 0);
    assert!(events(&server).is_empty(), "{:?}", events(&server));
    assert_eq!(provider.calls().len(), 2, "the backend is still asked");
}

#[tokio::test]
async fn a_reconcile_from_a_cache_behind_its_own_write_starts_from_that_write() {
    let (provider, ctx, server) = setup();
    let t = finalized(thing("lamp", json!({"desired": {"on": true}})));
    server.seed(&t);
    reconcile_stored(&server, &ctx, &t)
        .await
        .expect("reconciles");
    assert_eq!(status_writes(&server), 1);

    // The watch event of that write has not reached the cache: the reconcile it queued (or one
    // the device Secret's event queued) gets the Thing as it was before, without status.
    server.clear();
    reconcile(Arc::new(t.clone()), ctx.clone())
        .await
        .expect("reconciles");
    assert_eq!(status_writes(&server), 0, "{:?}", server.requests());
    assert!(events(&server).is_empty(), "{:?}", events(&server));
    // The backend was handed the written status, not an empty one (which would send a real
    // backend through its provisioning checks again).
    assert_eq!(
        provider.last_status(),
        server.thing(&t).status,
        "the backend started from a stale status"
    );
}

#[tokio::test]
async fn an_invalid_spec_is_parked_without_a_backend_call() {
    let (provider, ctx, server) = setup();
    let t = finalized(thing("lamp", json!({"shadow": {"pollInterval": "soon"}})));
    server.seed(&t);

    let action = reconcile_stored(&server, &ctx, &t)
        .await
        .expect("reconciles");

    assert_eq!(action, Action::await_change(), "no hot loop");
    assert!(provider.calls().is_empty());
    assert_eq!(
        ready(&server.thing(&t)),
        (ConditionStatus::False, "InvalidSpec".into())
    );
    assert_eq!(
        events(&server),
        vec![("InvalidSpec".into(), "Warning".into())]
    );
}

#[tokio::test]
async fn backend_failures_back_off_or_wait_for_a_spec_change() {
    for (retryable, reason) in [(true, "Throttled"), (false, "BackendRejected")] {
        let (provider, ctx, server) = setup();
        provider.script(Script {
            fail: Some(DebugError { reason, retryable }),
            ..Script::default()
        });
        let t = finalized(thing("lamp", json!({})));
        server.seed(&t);

        let result = reconcile_stored(&server, &ctx, &t).await;

        match (retryable, &result) {
            (true, Err(e)) => assert_eq!(e.reason(), reason),
            (false, Ok(action)) => assert_eq!(action, &Action::await_change()),
            _ => panic!("{reason}: unexpected {result:?}"),
        }
        // Written even though the backend failed: identifiers recorded so far must survive.
        let stored = server.thing(&t);
        assert_eq!(ready(&stored), (ConditionStatus::False, reason.into()));
        assert!(stored.status.and_then(|s| s.device).is_some());
        assert_eq!(events(&server), vec![(reason.into(), "Warning".into())]);
    }
}

#[tokio::test]
async fn a_broker_the_operator_lacks_is_reported_not_retried() {
    let (provider, ctx, server) = setup();
    let t = finalized(thing("lamp", json!({"broker": "AWS"})));
    server.seed(&t);

    let action = reconcile_stored(&server, &ctx, &t)
        .await
        .expect("reconciles");

    assert_eq!(action, Action::await_change());
    assert!(provider.calls().is_empty());
    assert_eq!(
        ready(&server.thing(&t)),
        (ConditionStatus::False, "BackendNotConfigured".into())
    );
}

fn deleted(t: Thing) -> Thing {
    let mut t = t;
    t.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    t
}

#[tokio::test]
async fn deletion_cleans_up_the_backend_then_releases_the_finalizer() {
    let (provider, ctx, server) = setup();
    let t = deleted(finalized(thing("lamp", json!({}))));
    server.seed(&t);

    reconcile_stored(&server, &ctx, &t)
        .await
        .expect("reconciles");

    assert_eq!(
        provider.calls(),
        vec![Call::Cleanup {
            thing: "team-a/lamp".into(),
            backend_name: "team-a_lamp".into()
        }]
    );
    assert_eq!(
        events(&server),
        vec![("Deprovisioned".into(), "Normal".into())]
    );
    assert_eq!(server.thing(&t).metadata.finalizers, Some(vec![]));
}

#[tokio::test]
async fn a_failed_cleanup_keeps_the_finalizer() {
    let (provider, ctx, server) = setup();
    provider.script(Script {
        fail: Some(DebugError {
            reason: "BackendUnreachable",
            retryable: true,
        }),
        ..Script::default()
    });
    let t = deleted(finalized(thing("lamp", json!({}))));
    server.seed(&t);

    let result = reconcile_stored(&server, &ctx, &t).await;

    assert_eq!(result.err().map(|e| e.reason()), Some("BackendUnreachable"));
    assert_eq!(
        events(&server),
        vec![("CleanupFailed".into(), "Warning".into())]
    );
    assert_eq!(
        server.thing(&t).metadata.finalizers,
        Some(vec![crate::api::FINALIZER.to_string()]),
        "the Thing stays until its backend resources are gone"
    );
}

#[tokio::test]
async fn orphan_deletion_leaves_the_backend_alone() {
    let (provider, ctx, server) = setup();
    let t = deleted(finalized(thing(
        "lamp",
        json!({"deletionPolicy": "Orphan"}),
    )));
    server.seed(&t);

    reconcile_stored(&server, &ctx, &t)
        .await
        .expect("reconciles");

    // Nothing deleted in the backend; only what the backend kept in memory for it goes.
    assert_eq!(
        provider.calls(),
        vec![Call::Release {
            thing: "team-a/lamp".into()
        }]
    );
    assert_eq!(server.thing(&t).metadata.finalizers, Some(vec![]));
}
