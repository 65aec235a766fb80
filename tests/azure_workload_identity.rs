//! Entra workload identity instead of a connection string, against the double's TLS listener
//! (hub and Entra token endpoint; the operator trusts the test CA through `SSL_CERT_FILE`): a
//! Thing provisions and syncs with bearer tokens; the token is fetched once and reused, and
//! renewed before it expires; a wrong federated token is a clear `BackendUnauthorized` condition
//! and Event with neither token in status, Events or logs. The double refuses unknown, expired and
//! plaintext bearer tokens.

mod azure_support;
mod common;

use azure_support::*;
use common::{condition, thing};
use serde_json::json;
use thing_operator::api::ConditionStatus;

#[tokio::test]
async fn a_thing_provisions_and_syncs_with_workload_identity_on_one_token() {
    let s = setup("az-wi").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    let app = EntraApp::register(&s.env, 3600).await;
    let op = azure_workload_identity(s.operator(), &s.env, &app, &app.federated_token_file)
        .ready()
        .await;
    thing("valve")
        .spec(
            json!({"broker": "Azure", "attributes": {"site": "north"}, "desired": {"open": true}}),
        )
        .create(&api)
        .await;
    s.wait_ready(&api, "valve").await;
    let id = format!("{}_valve", s.ns.name());
    let twin = hub.twin(&id).await.expect("twin in the hub");
    assert_eq!(twin["properties"]["desired"]["open"], json!(true));
    assert_eq!(twin["tags"]["site"], json!("north"));

    // The device simulator reports; the operator's twin reads (bearer-authenticated) bring it
    // to status.
    let secret = secret_data(&s.client, s.ns.name(), "valve-device")
        .await
        .unwrap();
    assert_eq!(
        hub.report(&id, &secret["tls.crt"], json!({"open": true}))
            .await,
        200
    );
    s.wait_for("the report in status", || async {
        let st = api.get("valve").await.ok()?.status?;
        (st.reported?.0.get("open") == Some(&json!(true))).then_some(())
    })
    .await;

    // Many hub requests, one token: the credential's cache, not a token per request.
    let (_, before) = app.counts(&hub).await;
    s.wait_for("ten more bearer-authenticated hub requests", || async {
        let (_, n) = app.counts(&hub).await;
        (n >= before + 10).then_some(())
    })
    .await;
    let (tokens, bearer) = app.counts(&hub).await;
    assert_eq!(tokens, 1, "one token request for {bearer} hub requests");

    let logs = op.logs();
    let token = app.federated_token();
    assert!(!logs.contains(&token), "federated token in the logs");
    assert!(!logs.contains("Bearer "), "a bearer token in the logs");
    let t = api.get("valve").await.unwrap();
    assert!(!serde_json::to_string(&t).unwrap().contains(&token));
}

#[tokio::test]
async fn a_short_lived_token_is_renewed_before_it_expires() {
    let s = setup("az-wi-renew").await;
    let hub = Hub::new(&s.env);
    let api = s.things();
    // 303 s: the SDK renews five minutes before expiry, so every ~3 s here; the double refuses a
    // token after its 303 s, so a renewal that came too late would show as 401s.
    let app = EntraApp::register(&s.env, 303).await;
    let _op = azure_workload_identity(s.operator(), &s.env, &app, &app.federated_token_file)
        .ready()
        .await;
    thing("gauge")
        .spec(json!({"broker": "Azure", "desired": {"unit": "bar"}}))
        .create(&api)
        .await;
    s.wait_ready(&api, "gauge").await;
    let (first, _) = app.counts(&hub).await;
    s.wait_for("two renewals", || async {
        let (n, _) = app.counts(&hub).await;
        (n >= first + 2).then_some(())
    })
    .await;
    // Requests went on with the renewed tokens, and the Thing never lost its footing.
    let (tokens, bearer) = app.counts(&hub).await;
    s.wait_for("hub requests on the latest token", || async {
        let (n, b) = app.counts(&hub).await;
        (b > bearer && n >= tokens).then_some(())
    })
    .await;
    let t = api.get("gauge").await.unwrap();
    assert!(common::is_ready(&t), "{:?}", t.status);
}

#[tokio::test]
async fn a_wrong_federated_token_is_a_clear_condition_without_secrets() {
    let s = setup("az-wi-bad").await;
    let api = s.things();
    let app = EntraApp::register(&s.env, 3600).await;
    // The operator's projected token is not the one the federated credential trusts.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("token");
    let wrong_token = federated_token();
    std::fs::write(&wrong, &wrong_token).unwrap();
    let op = azure_workload_identity(s.operator(), &s.env, &app, &wrong)
        .ready()
        .await;
    thing("latch")
        .spec(json!({"broker": "Azure"}))
        .create(&api)
        .await;
    s.wait_condition(&api, "latch", "Ready", |c| {
        c.status == ConditionStatus::False && c.reason == "BackendUnauthorized"
    })
    .await;
    let t = api.get("latch").await.unwrap();
    let provisioned = condition(&t, "Provisioned").expect("Provisioned condition");
    assert_eq!(provisioned.status, ConditionStatus::False);
    assert_eq!(provisioned.reason, "BackendUnauthorized");
    assert!(
        provisioned.message.contains("AADSTS700213"),
        "Entra's reason in the message: {}",
        provisioned.message
    );
    s.wait_for("a BackendUnauthorized Event", || async {
        let ev = events(&s.client, s.ns.name()).await;
        ev.iter()
            .any(|e| e.starts_with("BackendUnauthorized"))
            .then_some(())
    })
    .await;
    let hub = Hub::new(&s.env);
    assert!(
        hub.device(&format!("{}_latch", s.ns.name()))
            .await
            .is_none(),
        "nothing created without a token"
    );

    let shown = format!(
        "{}\n{}\n{}",
        serde_json::to_string(&t).unwrap(),
        events(&s.client, s.ns.name()).await.join("\n"),
        op.logs()
    );
    for secret in [wrong_token.as_str(), app.federated_token().as_str()] {
        assert!(!shown.contains(secret), "a federated token is shown");
    }
}

#[tokio::test]
async fn the_double_refuses_unknown_expired_and_plaintext_bearer_tokens() {
    let s = setup("az-wi-double").await;
    let app = EntraApp::register(&s.env, 1).await;
    let tls = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(
            &std::fs::read(s.env.var("AZURE_CA_FILE")).unwrap(),
        )
        .unwrap()])
        .build()
        .unwrap();
    let base = s.env.var("AZURE_TLS_URL");
    let token_request = |assertion: String| {
        tls.post(format!("{base}/{}/oauth2/v2.0/token", app.tenant))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(
                url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", "client_credentials")
                    .append_pair(
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    )
                    .append_pair("client_assertion", &assertion)
                    .append_pair("client_id", &app.client_id)
                    .append_pair("scope", "https://iothubs.azure.net/.default")
                    .finish(),
            )
            .send()
    };
    let refused = token_request(federated_token()).await.unwrap();
    assert_eq!(refused.status().as_u16(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([700213]));

    let answer: serde_json::Value = token_request(app.federated_token())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["expires_in"], 1);
    let token = answer["access_token"].as_str().unwrap().to_string();
    let twin_read = |client: &reqwest::Client, base: &str, auth: String| {
        client
            .get(format!(
                "{base}/twins/no-such-device?api-version=2021-04-12"
            ))
            .header("Authorization", auth)
            .send()
    };
    // Accepted (404: authenticated, no such device) until it expires, then refused.
    assert_eq!(
        twin_read(&tls, &base, format!("Bearer {token}"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    assert_eq!(
        twin_read(&tls, &base, "Bearer made-up".into())
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    let plain = reqwest::Client::new();
    assert_eq!(
        twin_read(&plain, &s.env.var("AZURE_URL"), format!("Bearer {token}"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        401,
        "bearer tokens over plain http"
    );
    s.wait_for("the token expired at the hub", || async {
        let status = twin_read(&tls, &base, format!("Bearer {token}"))
            .await
            .ok()?
            .status()
            .as_u16();
        (status == 401).then_some(())
    })
    .await;
}
