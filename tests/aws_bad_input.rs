//! Bad input never reaches AWS: the Thing says InvalidSpec (condition and Event), and the
//! operator makes no cloud call at all.

mod aws_support;
mod common;

use aws_support::*;
use common::thing;
use kube::api::PostParams;
use serde_json::json;
use thing_operator::api::ConditionStatus;

#[tokio::test]
async fn invalid_specs_get_invalid_spec_and_no_cloud_call() {
    let s = setup("aws-bad").await;
    let op = s.operator().aws().ready().await;
    let api = s.things();

    let cases = [
        (
            "bad-attr",
            json!({"broker": "AWS", "attributes": {"bad key!": "v", "ok": "spaces are not allowed"}}),
            "attribute",
        ),
        (
            "too-big",
            json!({"broker": "AWS", "desired": {"blob": "x".repeat(9000)}}),
            "over the limit of 8192",
        ),
        (
            "too-deep",
            json!({"broker": "AWS", "desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}),
            "levels deep",
        ),
        (
            "bad-policy",
            json!({"broker": "AWS", "policy": {"template": "{not json"}}),
            "policy.template",
        ),
        (
            "bad-placeholder",
            json!({"broker": "AWS", "policy": {"template": r#"{"Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"${nope}"}]}"#}}),
            "unknown placeholder",
        ),
        (
            "bad-rotation",
            json!({"broker": "AWS", "credentials": {"rotateAfter": "1y"}}),
            "rotateAfter",
        ),
    ];
    for (name, spec, _) in &cases {
        // Some rules are also in the CRD schema; the API server may refuse those at admission.
        let _ = api
            .create(
                &PostParams::default(),
                &thing(name).spec(spec.clone()).build(),
            )
            .await;
    }
    let mut checked = 0;
    for (name, _, needle) in &cases {
        let Ok(Some(_)) = api.get_opt(name).await else {
            continue;
        };
        checked += 1;
        let message = s
            .wait_condition(&api, name, "Ready", |c| {
                c.status == ConditionStatus::False && c.reason == "InvalidSpec"
            })
            .await
            .message;
        assert!(message.contains(needle), "{name}: {message}");
    }
    assert!(checked >= 5, "only {checked} cases got past admission");
    // An invalid thing name is refused by the API server's schema before the operator sees it.
    let refused = api
        .create(
            &PostParams::default(),
            &thing("bad-name")
                .spec(json!({"broker": "AWS", "thingName": "bad name!"}))
                .build(),
        )
        .await;
    assert!(refused.is_err(), "the schema accepted an invalid thingName");

    s.wait_for("InvalidSpec events", || async {
        events(&s.client, &s.ns)
            .await
            .iter()
            .any(|e| e.starts_with("InvalidSpec"))
            .then_some(())
    })
    .await;
    let calls = op
        .metric("thing_operator_backend_calls_total", &["backend=\"aws\""])
        .await;
    assert_eq!(calls, 0.0, "an invalid spec caused AWS calls");
    let iot = iot(&s.env);
    for (name, _, _) in &cases {
        assert!(!thing_exists(&iot, &format!("{}_{name}", s.ns)).await);
    }
    // Delete while the operator runs, so the finalizers go and the namespace can follow.
    api.delete_collection(&Default::default(), &Default::default())
        .await
        .unwrap();
    s.wait_all_gone(&api).await;
    drop(op);
}
