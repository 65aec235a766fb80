//! Faults moto cannot produce, injected with an SDK interceptor into an in-process provider:
//! throttling and 5xx on a fleet (converges, bounded number of calls), AWS's 409 on an existing
//! thing, a lost RegisterCertificateWithoutCA answer, a lost CreateKeysAndCertificate answer
//! (the certificate it created is found and deleted, one another tool created is not), a
//! rotation that cannot register its certificate (the working key stays), and AWS's transient
//! 4xx answers (retried, with a condition that says what is wrong).

mod aws_support;
mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aws_smithy_runtime_api::{
    box_error::BoxError,
    client::{
        interceptors::{
            Intercept, SharedInterceptor, context::BeforeDeserializationInterceptorContextMut,
        },
        orchestrator::Metadata,
        runtime_components::RuntimeComponents,
    },
    http::StatusCode,
};
use aws_smithy_types::{body::SdkBody, config_bag::ConfigBag};
use aws_support::*;
use common::{Setup, TestEnv, thing};
use kube::Client;
use serde_json::json;
use thing_operator::{
    api::{Thing, ThingStatus},
    credentials::{DeviceSecret, pki},
    provider::{
        DeviceOutcome, DeviceRequest, IotProvider,
        aws::{AwsProvider, AwsSettings, client::ClientSettings},
    },
};

/// What to do to the n-th answer of an operation.
type Rule = Box<dyn Fn(&str, u64) -> Option<(u16, &'static str)> + Send + Sync>;

/// Rewrites chosen answers into errors after moto has acted on the request (a lost answer).
struct Faults {
    rule: Rule,
    seen: Mutex<HashMap<String, u64>>,
    injected: AtomicU64,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Faults")
    }
}

impl Faults {
    fn new(rule: Rule) -> Arc<Self> {
        Arc::new(Faults {
            rule,
            seen: Mutex::default(),
            injected: AtomicU64::new(0),
        })
    }
}

#[derive(Debug)]
struct Shared(Arc<Faults>);

impl Intercept for Shared {
    fn name(&self) -> &'static str {
        "fault-injection"
    }

    fn modify_before_deserialization(
        &self,
        ctx: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let f = &self.0;
        let op = cfg
            .load::<Metadata>()
            .map(|m| m.name().to_string())
            .unwrap_or_default();
        let n = {
            let mut seen = f.seen.lock().unwrap();
            let e = seen.entry(op.clone()).or_insert(0);
            *e += 1;
            *e
        };
        if let Some((status, code)) = (f.rule)(&op, n) {
            f.injected.fetch_add(1, Ordering::Relaxed);
            let resp = ctx.response_mut();
            *resp.status_mut() = StatusCode::try_from(status).unwrap();
            resp.headers_mut().insert("x-amzn-errortype", code);
            resp.headers_mut()
                .insert("content-type", "application/json");
            *resp.body_mut() = SdkBody::from(format!(r#"{{"message":"injected {code}"}}"#));
        }
        Ok(())
    }
}

async fn provider(env: &TestEnv, faults: Option<Arc<Faults>>) -> AwsProvider {
    provider_with(env, faults, false).await
}

/// `adopt_unowned`: whether an existing thing without an owner record may be adopted.
async fn provider_with(
    env: &TestEnv,
    faults: Option<Arc<Faults>>,
    adopt_unowned: bool,
) -> AwsProvider {
    provider_from(settings(env, adopt_unowned), faults).await
}

fn settings(env: &TestEnv, adopt_unowned: bool) -> AwsSettings {
    let moto = moto_url(env);
    AwsSettings {
        client: ClientSettings {
            region: Some("us-east-1".into()),
            iot_endpoint: Some(moto.clone()),
            data_endpoint: Some(moto),
            static_credentials: Some(("testing".into(), "testing".into())),
            ..ClientSettings::default()
        },
        device_endpoint: Some("device.example.com:8883".into()),
        orphan_grace: Duration::from_secs(1),
        adopt_unowned,
        ..AwsSettings::default()
    }
}

async fn provider_from(settings: AwsSettings, faults: Option<Arc<Faults>>) -> AwsProvider {
    let interceptors = faults
        .map(|f| vec![SharedInterceptor::new(Shared(f))])
        .unwrap_or_default();
    AwsProvider::new(settings, interceptors, None).await
}

async fn make_thing(s: &Setup, name: &str, spec: serde_json::Value) -> Thing {
    thing(name).spec(spec).create(&s.things()).await
}

fn request<'a>(client: &Client, t: &'a Thing, ns: &'a str, name: &'a str) -> DeviceRequest<'a> {
    DeviceRequest {
        thing: t,
        namespace: ns,
        name,
        backend_name: t.spec.backend_name(ns, name),
        secret: DeviceSecret::for_thing(client.clone(), t, ns, t.spec.secret_name(name)),
    }
}

fn converged(s: &ThingStatus) -> bool {
    ["Provisioned", "CredentialsReady", "InSync"]
        .iter()
        .all(|c| s.conditions.is_true(c))
}

/// Runs reconciles like the controller would (retryable errors are retried) until every
/// condition is True. Returns the number of reconciles.
async fn converge(p: &AwsProvider, req: &DeviceRequest<'_>, status: &mut ThingStatus) -> usize {
    for i in 1..=40 {
        let mut outcome = DeviceOutcome::default();
        match p.reconcile(req, status, &mut outcome).await {
            Ok(()) if converged(status) => return i,
            Ok(()) => {}
            Err(e) => assert!(e.is_retryable(), "non-retryable error: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    panic!("{} did not converge: {:?}", req.name, status.conditions);
}

async fn cleanup(p: &AwsProvider, req: &DeviceRequest<'_>, status: &ThingStatus) {
    for _ in 0..20 {
        if p.cleanup(req, status, &mut DeviceOutcome::default())
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("cleanup of {} did not finish", req.name);
}

async fn assert_consistent(s: &Setup, name: &str, status: &ThingStatus) {
    let iot = iot(&s.env);
    let dev = status.device.as_ref().unwrap();
    let secret = secret_data(&s.client, &s.ns, &format!("{name}-device"))
        .await
        .unwrap();
    assert_eq!(secret.get("certificateId"), dev.certificate_id.as_ref());
    // In-cluster keys are PKCS#8 (checked here); moto's CloudIssued keys are PKCS#1 RSA, checked
    // with openssl in aws_idempotency.
    if secret["tls.key"].contains("BEGIN PRIVATE KEY") {
        assert!(pki::key_matches_certificate(&secret["tls.key"], &secret["tls.crt"]).unwrap());
    }
    let principals = thing_principals(&iot, dev.thing_name.as_deref().unwrap()).await;
    assert_eq!(principals, [dev.certificate_arn.clone().unwrap()]);
}

#[tokio::test]
async fn throttling_and_5xx_converge_without_a_retry_storm() {
    let setup = aws_support::setup("aws-throttle").await;
    let (env, client, ns) = (&setup.env, &setup.client, &setup.ns);
    const N: usize = 6;
    let spec = json!({"broker": "AWS", "attributes": {"k": "v"}, "desired": {"on": true}});

    // The floor: the same fleet without faults.
    let clean = provider(env, None).await;
    let mut things = Vec::new();
    for i in 0..N {
        things.push(make_thing(&setup, &format!("clean-{i}"), spec.clone()).await);
    }
    let names: Vec<String> = (0..N).map(|i| format!("clean-{i}")).collect();
    let reqs: Vec<_> = things
        .iter()
        .zip(&names)
        .map(|(t, n)| request(client, t, ns, n))
        .collect();
    let mut statuses = vec![ThingStatus::default(); N];
    futures::future::join_all(
        reqs.iter()
            .zip(statuses.iter_mut())
            .map(|(r, s)| converge(&clean, r, s)),
    )
    .await;
    let floor = clean.stats().attempts.load(Ordering::Relaxed);

    // Every 3rd answer throttled, every 7th a 503: about half of all answers fail.
    let faults = Faults::new(Box::new(|_op, n| {
        if n % 3 == 0 {
            Some((429, "ThrottlingException"))
        } else if n % 7 == 0 {
            Some((503, "ServiceUnavailableException"))
        } else {
            None
        }
    }));
    let faulty = provider(env, Some(faults.clone())).await;
    let mut fthings = Vec::new();
    for i in 0..N {
        fthings.push(make_thing(&setup, &format!("faulty-{i}"), spec.clone()).await);
    }
    let fnames: Vec<String> = (0..N).map(|i| format!("faulty-{i}")).collect();
    let freqs: Vec<_> = fthings
        .iter()
        .zip(&fnames)
        .map(|(t, n)| request(client, t, ns, n))
        .collect();
    let mut fstatuses = vec![ThingStatus::default(); N];
    futures::future::join_all(
        freqs
            .iter()
            .zip(fstatuses.iter_mut())
            .map(|(r, s)| converge(&faulty, r, s)),
    )
    .await;
    let stats = faulty.stats();
    let attempts = stats.attempts.load(Ordering::Relaxed);
    let throttled = stats.throttled.load(Ordering::Relaxed);
    println!(
        "floor: {floor} calls for {N} Things; with faults: {attempts} calls, {} injected, {throttled} throttled, {} retries",
        faults.injected.load(Ordering::Relaxed),
        stats.retries.load(Ordering::Relaxed)
    );
    assert!(throttled > 0 && faults.injected.load(Ordering::Relaxed) > 0);
    // With half the answers failing, twice the calls is expected; a storm would be far more.
    assert!(
        attempts <= floor * 3,
        "retry storm: {attempts} calls against a floor of {floor}"
    );

    for ((r, s), n) in freqs.iter().zip(&fstatuses).zip(&fnames) {
        assert_consistent(&setup, n, s).await;
        cleanup(&clean, r, s).await;
    }
    for (r, s) in reqs.iter().zip(&statuses) {
        cleanup(&clean, r, s).await;
    }
}

#[tokio::test]
async fn aws_answers_moto_does_not_give_are_handled() {
    let setup = aws_support::setup("aws-answers").await;
    let (env, client, ns) = (&setup.env, &setup.client, &setup.ns);
    let iot = iot(env);

    // 1. AWS answers 409 when a thing exists with other attributes (moto replaces it silently).
    //    2. The first RegisterCertificateWithoutCA answer is lost (500 after moto registered it):
    //    the retry gets ResourceAlreadyExists naming the certificate.
    let faults = Faults::new(Box::new(|op, n| match (op, n) {
        ("CreateThing", 1) => Some((409, "ResourceAlreadyExistsException")),
        ("RegisterCertificateWithoutCA", 1) => Some((500, "InternalFailureException")),
        _ => None,
    }));
    let p = provider_with(env, Some(faults.clone()), true).await;
    let t = make_thing(
        &setup,
        "existing",
        json!({"broker": "AWS", "attributes": {"model": "new"}}),
    )
    .await;
    let thing_name = t.spec.backend_name(ns, "existing");
    iot.create_thing()
        .thing_name(&thing_name)
        .attribute_payload(
            aws_sdk_iot::types::AttributePayload::builder()
                .attributes("model", "old")
                .attributes("extra", "x")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let req = request(client, &t, ns, "existing");
    let mut status = ThingStatus::default();
    // A thing without an owner record is not adopted unless the configuration says so: the
    // reconcile is refused and the thing keeps its attributes.
    let strict = provider(env, None).await;
    let refused = strict
        .reconcile(&req, &mut status, &mut DeviceOutcome::default())
        .await
        .expect_err("an unowned thing is a conflict");
    assert_eq!(refused.reason(), "Conflict");
    assert!(!refused.is_retryable());
    let untouched = iot
        .describe_thing()
        .thing_name(&thing_name)
        .send()
        .await
        .unwrap();
    assert_eq!(
        untouched
            .attributes()
            .unwrap()
            .get("model")
            .map(String::as_str),
        Some("old")
    );
    let mut status = ThingStatus::default();
    converge(&p, &req, &mut status).await;
    let d = iot
        .describe_thing()
        .thing_name(&thing_name)
        .send()
        .await
        .unwrap();
    let attrs: std::collections::BTreeMap<_, _> =
        d.attributes().unwrap().clone().into_iter().collect();
    let owner = format!(
        "{ns}/existing/{}",
        t.metadata.uid.clone().unwrap_or_default()
    );
    assert_eq!(
        attrs,
        [
            ("model".to_string(), "new".to_string()),
            ("thing-operator-owner".to_string(), owner)
        ]
        .into()
    );
    assert_consistent(&setup, "existing", &status).await;
    let seen = faults.seen.lock().unwrap().clone();
    assert_eq!(
        seen.get("RegisterCertificateWithoutCA"),
        Some(&2),
        "{seen:?}"
    );
    assert!(
        seen.contains_key("UpdateThing"),
        "the 409 was not answered with UpdateThing: {seen:?}"
    );
    cleanup(&p, &req, &status).await;
    assert!(!thing_exists(&iot, &thing_name).await);
}

/// Certificates AWS issued (CreateKeysAndCertificate: `CN=AWS IoT Certificate`) that are not in
/// `before`. The other tests here issue in-cluster certificates, which name their thing.
async fn aws_issued_since(iot: &aws_sdk_iot::Client, before: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for id in all_certificate_ids(iot)
        .await
        .into_iter()
        .filter(|id| !before.contains(id))
    {
        if certificate_subject(iot, &id)
            .await
            .is_some_and(|s| s.contains("AWS IoT Certificate"))
        {
            out.push(id);
        }
    }
    out
}

/// A certificate another tool created in the account: unattached, never the operator's.
async fn foreign_certificate(iot: &aws_sdk_iot::Client) -> String {
    iot.create_keys_and_certificate()
        .set_as_active(true)
        .send()
        .await
        .unwrap()
        .certificate_id()
        .unwrap()
        .to_string()
}

/// The orphan window recorded in the device Secret (one window).
async fn recorded_window(client: &Client, ns: &str, secret: &str) -> chrono::DateTime<chrono::Utc> {
    let data = secret_data(client, ns, secret).await.unwrap();
    let window = data
        .get("orphanWindow")
        .expect("an orphan window is recorded");
    let (_, end) = window.split_once('/').unwrap();
    chrono::DateTime::parse_from_rfc3339(end).unwrap().to_utc()
}

/// Full checks until `done` holds (the sweep runs in full checks only); returns the notices.
async fn sweep_until<F, Fut>(
    p: &AwsProvider,
    req: &DeviceRequest<'_>,
    status: &mut ThingStatus,
    what: &str,
    done: F,
) -> Vec<String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut notices = Vec::new();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut outcome = DeviceOutcome::default();
        // Make the provider run a full check: its memory says "not converged" when a condition is not True.
        status.conditions.0.retain(|c| c.type_ != "InSync");
        let _ = p.reconcile(req, status, &mut outcome).await;
        notices.extend(
            outcome
                .notices
                .iter()
                .map(|n| format!("{} {}", n.reason, n.message)),
        );
        if done().await {
            return notices;
        }
    }
    panic!("{what}: not reached; notices: {notices:?}");
}

#[tokio::test]
async fn a_lost_create_keys_answer_leaves_no_orphan() {
    let setup = aws_support::setup("aws-lostkeys").await;
    let (env, client, ns) = (&setup.env, &setup.client, &setup.ns);
    let iot = iot(env);
    let faults = Faults::new(Box::new(|op, n| {
        (op == "CreateKeysAndCertificate" && (n == 1 || n == 3))
            .then_some((500, "InternalFailureException"))
    }));
    let p = provider(env, Some(faults.clone())).await;
    let before = all_certificate_ids(&iot).await;
    let t = make_thing(
        &setup,
        "cloud",
        json!({"broker": "AWS", "credentials": {"source": "CloudIssued"}}),
    )
    .await;
    let req = request(client, &t, ns, "cloud");
    let mut status = ThingStatus::default();
    // The first answer is lost: the failed call's window is recorded, ending with the call.
    let lost_call = p
        .reconcile(&req, &mut status, &mut DeviceOutcome::default())
        .await
        .expect_err("the answer is lost");
    assert!(lost_call.is_retryable());
    // The certificate moto created for the lost answer: never recorded, never attached.
    let mut lost = aws_issued_since(&iot, &before).await;
    assert_eq!(
        lost.len(),
        1,
        "expected exactly one unrecorded certificate: {lost:?}"
    );
    let lost_id = lost.remove(0);
    let window_end = recorded_window(client, ns, "cloud-device").await;
    // Another tool creates a certificate after the window (the next reconcile comes late, as
    // after an API-server outage): the sweep must not take it.
    let wait = (window_end - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_secs(1)).await;
    let foreign = foreign_certificate(&iot).await;
    converge(&p, &req, &mut status).await;
    assert_ne!(
        status.device.as_ref().unwrap().certificate_id,
        Some(lost_id.clone())
    );
    assert_eq!(
        seen_count(&faults, "CreateKeysAndCertificate"),
        2,
        "the lost call must not be retried blindly"
    );
    // After the grace period a full check sweeps it (resync forces a full check here).
    sweep_until(
        &p,
        &req,
        &mut status,
        "the lost certificate swept",
        || async { cert_status(&iot, &lost_id).await.is_none() },
    )
    .await;
    assert_eq!(
        cert_status(&iot, &lost_id).await,
        None,
        "the lost call's certificate was not deleted"
    );
    assert_eq!(
        cert_status(&iot, &foreign).await.as_deref(),
        Some("ACTIVE"),
        "a certificate created outside the lost call's window was touched"
    );
    assert_consistent(&setup, "cloud", &status).await;
    let secret = secret_data(client, ns, "cloud-device").await.unwrap();
    assert!(
        !secret.contains_key("orphanWindow") && !secret.contains_key("pendingCertificateSince")
    );

    // A second lost answer, and another tool issues a certificate within the same window: the
    // operator cannot tell which one its call created, so it deletes neither and says so.
    let ambiguous_before = all_certificate_ids(&iot).await;
    let t2 = make_thing(
        &setup,
        "cloud2",
        json!({"broker": "AWS", "credentials": {"source": "CloudIssued"}}),
    )
    .await;
    let req2 = request(client, &t2, ns, "cloud2");
    let mut status2 = ThingStatus::default();
    p.reconcile(&req2, &mut status2, &mut DeviceOutcome::default())
        .await
        .expect_err("the answer is lost");
    let rival = foreign_certificate(&iot).await;
    converge(&p, &req2, &mut status2).await;
    let mine2 = status2
        .device
        .as_ref()
        .unwrap()
        .certificate_id
        .clone()
        .unwrap();
    let unrecorded: Vec<String> = aws_issued_since(&iot, &ambiguous_before)
        .await
        .into_iter()
        .filter(|id| *id != mine2)
        .collect();
    assert_eq!(unrecorded.len(), 2, "{unrecorded:?}");
    let notices = sweep_until(&p, &req2, &mut status2, "the window swept", || async {
        !secret_data(client, ns, "cloud2-device")
            .await
            .unwrap()
            .contains_key("orphanWindow")
    })
    .await;
    assert!(
        notices.iter().any(|n| n.starts_with("OrphanUnattributed")),
        "{notices:?}"
    );
    for id in &unrecorded {
        assert_eq!(
            cert_status(&iot, id).await.as_deref(),
            Some("ACTIVE"),
            "{id} was deleted though it could not be attributed"
        );
    }
    assert!(unrecorded.contains(&rival));
    cleanup(&p, &req, &status).await;
    cleanup(&p, &req2, &status2).await;
    for id in [foreign, rival] {
        let _ = iot
            .update_certificate()
            .certificate_id(&id)
            .new_status(aws_sdk_iot::types::CertificateStatus::Inactive)
            .send()
            .await;
        let _ = iot.delete_certificate().certificate_id(&id).send().await;
    }
}

/// A rotation whose new certificate cannot be registered (AWS answers AccessDenied until an
/// operator fixes the IAM policy) leaves the device's working key and certificate in place, says
/// what is wrong, and completes once the permission is back, without a spec change.
#[tokio::test]
async fn a_failed_rotation_keeps_the_working_key_until_access_is_fixed() {
    let setup = aws_support::setup("aws-rotkeep").await;
    let (env, client, ns) = (&setup.env, &setup.client, &setup.ns);
    let iot = iot(env);
    let denied = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = denied.clone();
    let faults = Faults::new(Box::new(move |op, _| {
        (d.load(Ordering::SeqCst) && op == "RegisterCertificateWithoutCA")
            .then_some((403, "AccessDeniedException"))
    }));
    let p = provider(env, Some(faults.clone())).await;
    let t = make_thing(
        &setup,
        "rot",
        json!({"broker": "AWS", "credentials": {"rotationOverlap": "1h"}}),
    )
    .await;
    let req = request(client, &t, ns, "rot");
    let mut status = ThingStatus::default();
    converge(&p, &req, &mut status).await;
    let before = secret_data(client, ns, "rot-device").await.unwrap();
    let old_arn = status
        .device
        .as_ref()
        .unwrap()
        .certificate_arn
        .clone()
        .unwrap();

    // Ask for a rotation (the annotation the controller would see).
    let mut rotated = t.clone();
    rotated.metadata.annotations =
        Some([("iot.thing-operator.dev/rotate".to_string(), "1".to_string())].into());
    let req = request(client, &rotated, ns, "rot");
    denied.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let e = p
            .reconcile(&req, &mut status, &mut DeviceOutcome::default())
            .await
            .expect_err("registration is denied");
        assert!(e.is_retryable(), "{e}");
        assert_eq!(e.reason(), "AccessDenied");
        let c = status.conditions.get("CredentialsReady").unwrap();
        assert_eq!(c.reason, "AccessDenied");
        assert!(c.message.contains("IAM"), "{}", c.message);
        // The device still holds a working pair: the Secret's key and certificate are the old
        // ones, registered, active and attached; the new pair waits beside them.
        let during = secret_data(client, ns, "rot-device").await.unwrap();
        for k in ["tls.key", "tls.crt", "certificateId"] {
            assert_eq!(
                during[k], before[k],
                "{k} changed before the new certificate was active"
            );
        }
        assert!(during.contains_key("next.key") && during.contains_key("next.crt"));
        assert_eq!(
            cert_status(&iot, &before["certificateId"]).await.as_deref(),
            Some("ACTIVE")
        );
        let thing_name = status.device.as_ref().unwrap().thing_name.clone().unwrap();
        assert_eq!(
            thing_principals(&iot, &thing_name).await,
            std::slice::from_ref(&old_arn)
        );
    }
    // The IAM policy is fixed: the next retry completes the rotation with the key it recorded.
    let next_key = secret_data(client, ns, "rot-device").await.unwrap()["next.key"].clone();
    denied.store(false, Ordering::SeqCst);
    converge(&p, &req, &mut status).await;
    let after = secret_data(client, ns, "rot-device").await.unwrap();
    assert_eq!(after["tls.key"], next_key);
    assert_ne!(after["certificateId"], before["certificateId"]);
    assert_eq!(after["previousCertificateId"], before["certificateId"]);
    assert!(!after.contains_key("next.key") && !after.contains_key("next.crt"));
    assert!(pki::key_matches_certificate(&after["tls.key"], &after["tls.crt"]).unwrap());
    // Both stay attached for the overlap: the new one and the old one.
    let dev = status.device.as_ref().unwrap();
    let mut principals = thing_principals(&iot, dev.thing_name.as_deref().unwrap()).await;
    principals.sort();
    let mut expected = vec![old_arn, dev.certificate_arn.clone().unwrap()];
    expected.sort();
    assert_eq!(principals, expected);
    cleanup(&p, &req, &status).await;
    assert!(cert_status(&iot, &before["certificateId"]).await.is_none());
}

/// AWS's transient 4xx answers: a conflicting update is retried within the call; a 404 right
/// after a create (eventual consistency) fails the reconcile with a retryable error that says
/// so, and the next attempt succeeds, without a spec change.
#[tokio::test]
async fn transient_4xx_answers_are_retried() {
    let setup = aws_support::setup("aws-transient").await;
    let (env, client, ns) = (&setup.env, &setup.client, &setup.ns);
    let faults = Faults::new(Box::new(|op, n| match (op, n) {
        ("AttachPolicy", 1) => Some((409, "ConflictingResourceUpdateException")),
        ("AttachThingPrincipal", 1) => Some((404, "ResourceNotFoundException")),
        _ => None,
    }));
    let p = provider(env, Some(faults.clone())).await;
    let t = make_thing(&setup, "busy", json!({"broker": "AWS"})).await;
    let req = request(client, &t, ns, "busy");
    let mut status = ThingStatus::default();
    let e = p
        .reconcile(&req, &mut status, &mut DeviceOutcome::default())
        .await
        .expect_err("the thing is not visible yet");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(e.reason(), "NotFound");
    assert!(e.to_string().contains("AttachThingPrincipal"), "{e}");
    assert_eq!(
        status.conditions.get("Provisioned").unwrap().reason,
        "NotFound"
    );
    // The conflicting update was repeated within the same reconcile.
    assert_eq!(seen_count(&faults, "AttachPolicy"), 2);
    converge(&p, &req, &mut status).await;
    assert_consistent(&setup, "busy", &status).await;
    cleanup(&p, &req, &status).await;
}

fn seen_count(f: &Faults, op: &str) -> u64 {
    f.seen.lock().unwrap().get(op).copied().unwrap_or(0)
}
