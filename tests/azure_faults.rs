//! Bad input and an unwell hub. A spec IoT Hub cannot hold (twin keys with '.', '$' or spaces,
//! tag names likewise, oversized or too deep documents) gets `InvalidSpec` with a Warning Event
//! and creates nothing; fixed, it converges. Throttling (429, with and without Retry-After) and
//! 5xx are retried with spacing, never in a storm, and the Thing converges once the hub recovers.

mod azure_support;
mod common;

use azure_support::*;
use common::{merge_patch, thing};
use serde_json::{Value, json};

#[tokio::test]
async fn a_spec_iot_hub_cannot_hold_is_invalid_and_creates_nothing() {
    let s = setup("az-bad").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    let _op = azure(s.operator(), &s.env).ready().await;
    let cases = [
        (
            "dotted",
            json!({"broker": "Azure", "desired": {"a.b": 1}}),
            "contains '.', '$' or a space",
        ),
        (
            "spaced",
            json!({"broker": "Azure", "desired": {"x": {"s p": 1}}}),
            "contains '.', '$' or a space",
        ),
        (
            "tagdot",
            json!({"broker": "Azure", "attributes": {"site.name": "p1"}}),
            "attributes (twin tags)",
        ),
        // Oversized and too deep documents are refused by the rules every backend shares.
        (
            "big",
            json!({"broker": "Azure", "desired": {"blob": "x".repeat(40 * 1024)}}),
            "",
        ),
        (
            "deep",
            json!({"broker": "Azure", "desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}),
            "",
        ),
    ];
    for (name, spec, _) in &cases {
        thing(name).spec(spec.clone()).create(&api).await;
    }
    for (name, _, expect) in &cases {
        let c = s
            .wait_condition(&api, name, "Ready", |c| c.reason == "InvalidSpec")
            .await;
        assert!(c.message.contains(expect), "{name}: {}", c.message);
        let id = format!("{}_{name}", s.ns.name());
        assert!(
            hub.device(&id).await.is_none(),
            "{name}: a device was created"
        );
    }
    s.wait_for("InvalidSpec Warning Events", || async {
        let ev = events(&s.client, s.ns.name()).await;
        (ev.iter().filter(|e| e.starts_with("InvalidSpec")).count() >= 1).then_some(())
    })
    .await;
    // Fixed, it converges.
    merge_patch(
        &api,
        "dotted",
        json!({"spec": {"desired": {"a.b": null, "ab": 1}}}),
    )
    .await;
    s.wait_ready(&api, "dotted").await;
    let id = format!("{}_dotted", s.ns.name());
    assert_eq!(
        hub.twin(&id).await.unwrap()["properties"]["desired"]["ab"],
        1
    );
}

/// Times (seconds) at which the double served injected faults on paths containing `path`.
async fn fault_times(hub: &Hub, path: &str) -> Vec<f64> {
    hub.state().await["faultLog"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|f| f["path"].as_str().is_some_and(|p| p.contains(path)))
        .filter_map(|f| f["t"].as_f64())
        .collect()
}

fn min_gap(times: &[f64]) -> f64 {
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min)
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried_with_spacing_not_a_storm() {
    let s = setup("az-throttle").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    let op = azure(s.operator(), &s.env).ready().await;

    // 429 with Retry-After: 1 on the device registry: every retry waits at least that long.
    let id = format!("{}_slow", s.ns.name());
    let devices = format!("/devices/{id}");
    hub.inject(429, 4, Some(1), &devices).await;
    thing("slow")
        .spec(json!({"broker": "Azure", "desired": {"v": 1}}))
        .create(&api)
        .await;
    s.wait_ready(&api, "slow").await;
    assert_eq!(hub.faults_left(&devices).await, 0);
    let times = fault_times(&hub, &devices).await;
    assert_eq!(times.len(), 4);
    assert!(
        min_gap(&times) >= 0.95,
        "retried before Retry-After: {times:?}"
    );

    // 429 without Retry-After and 503 on the twin, more than one call's retries: backoff
    // spaces the attempts, the Thing shows it is throttled, and converges when the hub recovers.
    let id = format!("{}_busy", s.ns.name());
    let twins = format!("/twins/{id}");
    hub.inject(429, 8, None, &twins).await;
    hub.inject(503, 2, None, &twins).await;
    thing("busy")
        .spec(json!({"broker": "Azure", "desired": {"v": 2}}))
        .create(&api)
        .await;
    s.wait_condition(&api, "busy", "Ready", |c| c.reason == "Throttled")
        .await;
    s.wait_ready(&api, "busy").await;
    let times = fault_times(&hub, &twins).await;
    assert_eq!(times.len(), 10, "every injected fault was served once");
    // One early attempt is the controller's: the status write that records `Throttled` is a
    // watch event, which starts a reconcile at once. After that, only backoff.
    let short = times.windows(2).filter(|w| w[1] - w[0] < 0.45).count();
    assert!(short <= 1, "attempts not spaced: {times:?}");
    let twin: Value = hub.twin(&id).await.unwrap();
    assert_eq!(twin["properties"]["desired"]["v"], 2);
    // Calls that ended throttled (after the pipeline's own retries) are counted.
    let throttled = op
        .metric(
            "thing_operator_backend_calls_total",
            &["backend=\"azure\"", "outcome=\"throttled\""],
        )
        .await;
    assert!(throttled >= 1.0, "{throttled}");
}
