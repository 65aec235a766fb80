//! Faults moto cannot produce, injected with an SDK interceptor into an in-process provider:
//! throttling and 5xx on a fleet (converges, bounded number of calls), AWS's 409 on an existing
//! thing, a lost RegisterCertificateWithoutCA answer, a lost CreateKeysAndCertificate answer
//! (the certificate it created is found and deleted).

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
    let moto = moto_url(env);
    let settings = AwsSettings {
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
    };
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

#[tokio::test]
async fn a_lost_create_keys_answer_leaves_no_orphan() {
    let setup = aws_support::setup("aws-lostkeys").await;
    let (env, client, ns) = (&setup.env, &setup.client, &setup.ns);
    let iot = iot(env);
    let faults = Faults::new(Box::new(|op, n| {
        (op == "CreateKeysAndCertificate" && n == 1).then_some((500, "InternalFailureException"))
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
    converge(&p, &req, &mut status).await;
    // The certificate moto created for the lost answer: never recorded, never attached. The
    // answer's body is not readable in the interceptor, so find it: new since the start, issued
    // by "AWS" (the other tests here issue in-cluster certificates), not the recorded one.
    let mut lost = Vec::new();
    for id in all_certificate_ids(&iot)
        .await
        .into_iter()
        .filter(|id| !before.contains(id))
    {
        let Some(subject) = certificate_subject(&iot, &id).await else {
            continue;
        };
        if subject.contains("AWS IoT Certificate")
            && Some(&id) != status.device.as_ref().unwrap().certificate_id.as_ref()
        {
            lost.push(id);
        }
    }
    assert_eq!(
        lost.len(),
        1,
        "expected exactly one unrecorded certificate: {lost:?}"
    );
    let lost_id = lost.remove(0);
    assert_ne!(
        Some(&lost_id),
        status.device.as_ref().unwrap().certificate_id.as_ref()
    );
    assert_eq!(
        seen_count(&faults, "CreateKeysAndCertificate"),
        2,
        "the lost call must not be retried blindly"
    );
    // After the grace period a full check sweeps it (resync forces a full check here).
    let mut swept = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut outcome = DeviceOutcome::default();
        // Make the provider run a full check: its memory says "not converged" when a condition is not True.
        status.conditions.0.retain(|c| c.type_ != "InSync");
        let _ = p.reconcile(&req, &mut status, &mut outcome).await;
        if cert_status(&iot, &lost_id).await.is_none() {
            swept = true;
            break;
        }
    }
    assert!(
        swept,
        "the unrecorded certificate {lost_id} was not deleted"
    );
    assert_consistent(&setup, "cloud", &status).await;
    let secret = secret_data(client, ns, "cloud-device").await.unwrap();
    assert!(
        !secret.contains_key("orphanWindow") && !secret.contains_key("pendingCertificateSince")
    );
    cleanup(&p, &req, &status).await;
}

fn seen_count(f: &Faults, op: &str) -> u64 {
    f.seen.lock().unwrap().get(op).copied().unwrap_or(0)
}
