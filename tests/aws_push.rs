//! The AWS push channel against real parts: moto is the control plane and the shadow REST API,
//! a Mosquitto of the test's own stands in for the AWS IoT MQTT endpoint (moto has no MQTT), and
//! the test plays AWS and the device: it updates the shadow through moto's data plane and
//! publishes the documents message AWS would publish for that update. The stand-in
//! authenticates nobody (TLS server authentication with the test CA, anonymous clients): it
//! cannot know moto's certificate registry, so what AWS would check at connect time is checked
//! against moto instead (the certificate is registered, ACTIVE, with the operator policy
//! attached). The operator reaches the stand-in through a TCP relay the test can cut.

mod aws_support;
mod common;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use aws_smithy_types::Blob;
use aws_support::*;
use common::{
    OperatorProcess, Received, Relay, Setup, create_resource, free_port, http_receiver, thing,
};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};
use thing_operator::api::{Observer, Thing};

/// How long pushed state may take to reach status and Observers: far below the poll interval
/// of the Things here ([`POLL`]), so only the push can meet it.
const PROMPT: Duration = Duration::from_secs(5);
const POLL: &str = "30s";

/// A Mosquitto of this test: a TLS listener (the test CA's server certificate, as AWS IoT's
/// endpoint serves its own) for the operator, a plain one for the test's publisher.
struct StandIn {
    child: Child,
    tls_port: u16,
    plain_port: u16,
}

impl StandIn {
    fn start(s: &Setup) -> StandIn {
        let dir = std::path::PathBuf::from(s.env.var("TESTENV_DIR"));
        let certs = dir.join("mosquitto");
        let (tls_port, plain_port) = (free_port(), free_port());
        let conf = dir.join(format!("push-standin-{tls_port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\npersistence false\n\
                 listener {plain_port} 127.0.0.1\n\
                 listener {tls_port} 127.0.0.1\ncafile {c}/ca.crt\ncertfile {c}/server.crt\nkeyfile {c}/server.key\n",
                c = certs.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(
            dir.join("logs")
                .join(format!("push-standin-{tls_port}.log")),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("mosquitto starts");
        StandIn {
            child,
            tls_port,
            plain_port,
        }
    }

    /// A publisher on the plain listener, connected (its event loop driven in the background).
    async fn publisher(&self) -> AsyncClient {
        let mut options = MqttOptions::new(
            format!("aws-{}", self.plain_port),
            "127.0.0.1",
            self.plain_port,
        );
        options.set_keep_alive(Duration::from_secs(10));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .expect("the stand-in accepts the publisher")
            .unwrap();
        client
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster id of this test only: the operator's client id, policy and identity Secret, and
/// its Things' names, are all its own.
fn cluster_id() -> String {
    format!("p{:08x}", rand::random::<u32>())
}

fn push_operator(s: &Setup, cluster: &str, relay_port: u16) -> common::OperatorBuilder {
    s.operator().aws().args([
        "--aws-push".to_string(),
        "auto".into(),
        "--aws-push-url".into(),
        format!("mqtts://127.0.0.1:{relay_port}"),
        "--aws-push-ca-file".into(),
        s.env.var("MQTT_CA_FILE"),
        "--aws-push-secret".into(),
        format!("{cluster}-push"),
        "--aws-push-drift-interval".into(),
        "10m".into(),
        "--cluster-id".into(),
        cluster.to_string(),
        "--http-sink-allow-cidr".into(),
        "127.0.0.0/8".into(),
    ])
}

async fn push_connected(s: &Setup, op: &OperatorProcess, up: bool) {
    let want = if up { 1.0 } else { 0.0 };
    s.wait_for(&format!("aws-push connected = {want}"), || async {
        let v = op
            .metric(
                "thing_operator_mqtt_connected",
                &["connection=\"aws-push\""],
            )
            .await;
        (v == want).then_some(())
    })
    .await;
}

async fn identity_secret(s: &Setup, cluster: &str) -> std::collections::BTreeMap<String, String> {
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), "thing-operator-system");
    let secret = secrets
        .get(&format!("{cluster}-push"))
        .await
        .expect("identity Secret");
    secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect()
}

/// The device's shadow update through moto's data plane; returns the new version.
async fn device_reports(
    data: &aws_sdk_iotdataplane::Client,
    thing_name: &str,
    reported: Value,
) -> i64 {
    device_reports_to(data, thing_name, None, reported).await
}

async fn device_reports_to(
    data: &aws_sdk_iotdataplane::Client,
    thing_name: &str,
    shadow: Option<&str>,
    reported: Value,
) -> i64 {
    let out = data
        .update_thing_shadow()
        .thing_name(thing_name)
        .set_shadow_name(shadow.map(str::to_string))
        .payload(Blob::new(
            json!({"state": {"reported": reported}}).to_string(),
        ))
        .send()
        .await
        .expect("shadow update");
    let answer: Value = serde_json::from_slice(out.payload().unwrap().as_ref()).unwrap();
    answer["version"].as_i64().expect("version in the answer")
}

/// The documents message AWS publishes for an update that left the shadow at `version`.
async fn publish_documents(client: &AsyncClient, topic: String, reported: Value, version: i64) {
    let message = json!({
        "previous": {"state": {}, "version": version - 1},
        "current": {
            "state": {"desired": {"power": "on"}, "reported": reported},
            "metadata": {"reported": {}},
            "version": version
        },
        "timestamp": 1700000000
    });
    client
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            message.to_string().into_bytes(),
        )
        .await
        .unwrap();
}

fn documents_topic(thing_name: &str) -> String {
    format!("$aws/things/{thing_name}/shadow/update/documents")
}

async fn reported_temp(
    s: &Setup,
    api: &Api<Thing>,
    name: &str,
    temp: i64,
    within: Duration,
) -> Thing {
    common::wait_for(
        &format!("status.reported.temp = {temp}"),
        within,
        || async {
            let t = api.get(name).await.ok()?;
            let got = t
                .status
                .as_ref()?
                .reported
                .as_ref()?
                .0
                .get("temp")?
                .as_i64()?;
            (got == temp).then_some(t)
        },
    )
    .await;
    let _ = s;
    api.get(name).await.unwrap()
}

async fn observed_temp(received: &Received, temp: i64, within: Duration) {
    common::wait_for(
        &format!("an Observer event with temp {temp}"),
        within,
        || async {
            let r = received.lock().unwrap().clone();
            r.iter()
                .any(|e| e["data"]["state"]["temp"].as_i64() == Some(temp))
                .then_some(())
        },
    )
    .await
}

fn observed(received: &Received) -> Vec<i64> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| e["data"]["state"]["temp"].as_i64())
        .collect()
}

/// Provisioning of the operator's own identity, then pushed state in status and in an Observer
/// well before any poll could bring it; stale documents and documents of things the operator
/// does not manage change nothing; with the connection cut, the poll brings state again; the
/// channel comes back by itself.
#[tokio::test]
async fn pushed_shadow_documents_reach_status_and_observers_and_polling_takes_over_when_cut() {
    let s = setup("aws-push").await;
    let ns = s.ns.name().to_string();
    let cluster = cluster_id();
    let iot = iot(&s.env);
    let data = data(&s.env);
    let standin = StandIn::start(&s);
    let publisher = standin.publisher().await;
    let mut relay = Relay::open(format!("127.0.0.1:{}", standin.tls_port)).await;
    let op = push_operator(&s, &cluster, relay.port).ready().await;
    push_connected(&s, &op, true).await;

    // The operator's identity, as AWS would check it at connect time.
    let policy_name = format!("thing-operator.{cluster}.push@policy");
    let client_id = format!("thing-operator.{cluster}.push");
    let identity = identity_secret(&s, &cluster).await;
    let cert_id = identity["certificate-id"].clone();
    assert!(
        thing_operator::credentials::pki::key_matches_certificate(
            &identity["tls.key"],
            &identity["tls.crt"]
        )
        .unwrap(),
        "the Secret holds the key of its certificate"
    );
    assert!(!identity.contains_key("next.crt"), "no rotation pending");
    assert_eq!(cert_status(&iot, &cert_id).await.as_deref(), Some("ACTIVE"));
    let cert_arn = iot
        .describe_certificate()
        .certificate_id(&cert_id)
        .send()
        .await
        .unwrap()
        .certificate_description()
        .unwrap()
        .certificate_arn()
        .unwrap()
        .to_string();
    let attached = iot
        .list_attached_policies()
        .target(&cert_arn)
        .send()
        .await
        .unwrap();
    let names: Vec<&str> = attached
        .policies()
        .iter()
        .filter_map(|p| p.policy_name())
        .collect();
    assert_eq!(names, [policy_name.as_str()]);
    let policy = iot
        .get_policy()
        .policy_name(&policy_name)
        .send()
        .await
        .unwrap();
    let document: Value = serde_json::from_str(policy.policy_document().unwrap()).unwrap();
    let text = document.to_string();
    assert!(text.contains(&format!(":client/{client_id}\"")), "{text}");
    assert!(
        text.contains(&format!(
            "topic/$aws/things/{cluster}:*/shadow/update/documents"
        )),
        "{text}"
    );
    assert!(!text.contains("iot:Publish"), "{text}");

    // A Thing polled every 30 s, and an Observer of its reported state.
    let api = s.things();
    let (url, received) = http_receiver().await;
    thing("lamp")
        .spec(
            json!({"broker": "AWS", "desired": {"power": "on"}, "shadow": {"pollInterval": POLL}}),
        )
        .create(&api)
        .await;
    let observers: Api<Observer> = s.api();
    create_resource(
        &observers,
        "watch",
        json!({
            "source": {"thingName": "lamp"},
            "filter": {"section": "Reported"},
            "sink": {"http": {"url": url}},
        }),
    )
    .await;
    s.wait_ready(&api, "lamp").await;
    let thing_name = format!("{cluster}:{ns}_lamp");

    // The device reports; AWS publishes the documents message: status and the Observer see it
    // well within the poll interval.
    let v1 = device_reports(&data, &thing_name, json!({"temp": 21})).await;
    publish_documents(
        &publisher,
        documents_topic(&thing_name),
        json!({"temp": 21}),
        v1,
    )
    .await;
    let t = reported_temp(&s, &api, "lamp", 21, PROMPT).await;
    assert_eq!(t.status.unwrap().version, Some(v1));
    observed_temp(&received, 21, PROMPT).await;

    // An older document (redelivered, or overtaken) arrives before the next one: it never
    // replaces newer state. Documents of things this operator does not manage (another
    // namespace's name, another cluster's, a named shadow the Thing does not use) change
    // nothing. MQTT keeps the order of one publisher's messages, so once the last one shows,
    // all of them were handled.
    let v2 = device_reports(&data, &thing_name, json!({"temp": 23})).await;
    publish_documents(
        &publisher,
        documents_topic(&thing_name),
        json!({"temp": 5}),
        v1 - 1,
    )
    .await;
    for other in [
        format!("{cluster}:other-ns_lamp"),
        format!("x{cluster}:{ns}_lamp"),
        format!("{ns}_lamp"),
    ] {
        publish_documents(
            &publisher,
            documents_topic(&other),
            json!({"temp": 99}),
            v2 + 100,
        )
        .await;
    }
    publish_documents(
        &publisher,
        format!("$aws/things/{thing_name}/shadow/name/cfg/update/documents"),
        json!({"temp": 98}),
        v2 + 100,
    )
    .await;
    publish_documents(
        &publisher,
        documents_topic(&thing_name),
        json!({"temp": 23}),
        v2,
    )
    .await;
    let t = reported_temp(&s, &api, "lamp", 23, PROMPT).await;
    assert_eq!(t.status.unwrap().version, Some(v2));
    observed_temp(&received, 23, PROMPT).await;
    let seen = observed(&received);
    for never in [5, 98, 99] {
        assert!(
            !seen.contains(&never),
            "{never} reached an Observer: {seen:?}"
        );
    }

    // A Thing on a named shadow gets the documents of that shadow.
    thing("gauge")
        .spec(json!({"broker": "AWS", "desired": {"power": "on"}, "shadow": {"name": "cfg", "pollInterval": POLL}}))
        .create(&api)
        .await;
    s.wait_ready(&api, "gauge").await;
    let gauge_name = format!("{cluster}:{ns}_gauge");
    let g1 = device_reports_to(&data, &gauge_name, Some("cfg"), json!({"temp": 40})).await;
    publish_documents(
        &publisher,
        format!("$aws/things/{gauge_name}/shadow/name/cfg/update/documents"),
        json!({"temp": 40}),
        g1,
    )
    .await;
    let t = reported_temp(&s, &api, "gauge", 40, PROMPT).await;
    assert_eq!(t.status.unwrap().version, Some(g1));

    // A report whose documents message is lost: the Thing's state stays as pushed while the
    // channel is up (the next drift read is 10 minutes away). Cutting the connection makes the
    // poll take over at once, and it reads what the device reported.
    let v3 = device_reports(&data, &thing_name, json!({"temp": 30})).await;
    relay.cut();
    push_connected(&s, &op, false).await;
    let t = reported_temp(&s, &api, "lamp", 30, s.timeout).await;
    assert_eq!(t.status.unwrap().version, Some(v3));
    observed_temp(&received, 30, s.timeout).await;

    // The channel reconnects by itself, and pushed state is prompt again.
    relay.reopen().await;
    push_connected(&s, &op, true).await;
    let v4 = device_reports(&data, &thing_name, json!({"temp": 31})).await;
    publish_documents(
        &publisher,
        documents_topic(&thing_name),
        json!({"temp": 31}),
        v4,
    )
    .await;
    reported_temp(&s, &api, "lamp", 31, PROMPT).await;
    observed_temp(&received, 31, PROMPT).await;

    // The key never leaves the Secret.
    let key_body: String = identity["tls.key"]
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!op.logs().contains(&key_body[..40]));
}

/// The certificates in moto issued to `client_id` (the subject's CN): the operator's own.
async fn operator_certificates(iot: &aws_sdk_iot::Client, client_id: &str) -> Vec<String> {
    let mut ours = Vec::new();
    for id in all_certificate_ids(iot).await {
        if certificate_subject(iot, &id)
            .await
            .is_some_and(|s| s.contains(&format!("CN={client_id}")))
        {
            ours.push(id);
        }
    }
    ours
}

/// The identity survives a crash between registering a new certificate and making it current
/// (the same certificate is carried on, nothing is left behind), a restart changes nothing, and
/// a rotation leaves exactly the new certificate, ACTIVE with the policy, the old one deleted.
#[tokio::test]
async fn the_operator_identity_is_crash_safe_idempotent_and_rotates() {
    let s = setup("aws-push-id").await;
    let cluster = cluster_id();
    let client_id = format!("thing-operator.{cluster}.push");
    let policy_name = format!("{client_id}@policy");
    let iot = iot(&s.env);
    let standin = StandIn::start(&s);
    let relay = Relay::open(format!("127.0.0.1:{}", standin.tls_port)).await;

    // A crash after the new certificate is registered and allowed, before it is current.
    let mut op = push_operator(&s, &cluster, relay.port)
        .failpoint("aws-push-before-promote=return")
        .start();
    op.wait_exit("the operator to crash before promoting", s.timeout)
        .await;
    let identity = identity_secret(&s, &cluster).await;
    let pending = identity["next.crt"].clone();
    assert!(!identity.contains_key("certificate-id"));
    drop(op);

    let op = push_operator(&s, &cluster, relay.port).ready().await;
    push_connected(&s, &op, true).await;
    let identity = identity_secret(&s, &cluster).await;
    assert_eq!(
        identity["tls.crt"], pending,
        "the interrupted certificate was carried on"
    );
    assert!(!identity.contains_key("next.crt"));
    let first = identity["certificate-id"].clone();
    assert_eq!(
        operator_certificates(&iot, &client_id).await,
        std::slice::from_ref(&first)
    );
    drop(op);

    // A restart provisions nothing new.
    let op = push_operator(&s, &cluster, relay.port).ready().await;
    push_connected(&s, &op, true).await;
    assert_eq!(identity_secret(&s, &cluster).await["certificate-id"], first);
    assert_eq!(
        operator_certificates(&iot, &client_id).await,
        std::slice::from_ref(&first)
    );
    drop(op);

    // Rotation: the certificate is older than --aws-push-rotate-after (1 ms: whatever the
    // timing, it is due at start).
    let op = push_operator(&s, &cluster, relay.port)
        .args(["--aws-push-rotate-after", "1ms"])
        .ready()
        .await;
    let second = s
        .wait_for("the old certificate removed after the rotation", || async {
            let identity = identity_secret(&s, &cluster).await;
            let current = identity.get("certificate-id")?.clone();
            let ours = operator_certificates(&iot, &client_id).await;
            (current != first
                && ours == [current.clone()]
                && !identity.contains_key("retired-certificate-id"))
            .then_some(current)
        })
        .await;
    push_connected(&s, &op, true).await;
    assert_eq!(cert_status(&iot, &second).await.as_deref(), Some("ACTIVE"));
    let arn = iot
        .describe_certificate()
        .certificate_id(&second)
        .send()
        .await
        .unwrap()
        .certificate_description()
        .unwrap()
        .certificate_arn()
        .unwrap()
        .to_string();
    let attached = iot
        .list_attached_policies()
        .target(&arn)
        .send()
        .await
        .unwrap();
    assert_eq!(
        attached
            .policies()
            .iter()
            .filter_map(|p| p.policy_name())
            .collect::<Vec<_>>(),
        [policy_name.as_str()]
    );
    drop(op);

    // Rotation while connected: the identity check (every second here, beside the connection)
    // finds the certificate due (3 s old), reconnects with a new one, and the old one goes
    // once the new one is connected. Never more than the one in use and the one replacing it.
    let op = push_operator(&s, &cluster, relay.port)
        .args([
            "--aws-push-rotate-after",
            "3s",
            "--aws-push-identity-check",
            "1s",
        ])
        .ready()
        .await;
    let deadline = tokio::time::Instant::now() + s.timeout * 2;
    let mut seen = vec![second.clone()];
    while seen.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "two rotations by the running operator; saw {seen:?}"
        );
        if let Some(current) = identity_secret(&s, &cluster).await.get("certificate-id")
            && !seen.contains(current)
        {
            seen.push(current.clone());
        }
        let ours = operator_certificates(&iot, &client_id).await;
        assert!(ours.len() <= 2, "certificates piling up: {ours:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    push_connected(&s, &op, true).await;
    drop(op);
    // Stopped mid-way or not, the next run leaves exactly the current certificate.
    let _op = push_operator(&s, &cluster, relay.port).ready().await;
    s.wait_for(
        "one certificate left after rotating while connected",
        || async {
            let identity = identity_secret(&s, &cluster).await;
            let current = identity.get("certificate-id")?.clone();
            (!identity.contains_key("retired-certificate-id")
                && operator_certificates(&iot, &client_id).await == [current])
            .then_some(())
        },
    )
    .await;
}

/// A crash at each step of a rotation: the restarted operator finishes it, and exactly one
/// certificate of the operator is left, the Secret's, ACTIVE, with nothing pending.
#[tokio::test]
async fn a_rotation_interrupted_at_any_step_is_finished_after_a_restart() {
    let s = setup("aws-push-rot").await;
    let cluster = cluster_id();
    let client_id = format!("thing-operator.{cluster}.push");
    let iot = iot(&s.env);
    let standin = StandIn::start(&s);
    let relay = Relay::open(format!("127.0.0.1:{}", standin.tls_port)).await;
    let op = push_operator(&s, &cluster, relay.port).ready().await;
    push_connected(&s, &op, true).await;
    drop(op);
    for step in [
        "aws-push-after-new-key",
        "aws-push-before-attach-policy",
        "aws-push-before-promote",
        "aws-push-after-retire",
    ] {
        let before = identity_secret(&s, &cluster).await["certificate-id"].clone();
        let mut op = push_operator(&s, &cluster, relay.port)
            .args(["--aws-push-rotate-after", "1ms"])
            .failpoint(&format!("{step}=return"))
            .start();
        op.wait_exit(&format!("the operator to crash at {step}"), s.timeout)
            .await;
        assert!(op.logs().contains("failpoint reached"), "{step}");
        drop(op);
        let op = push_operator(&s, &cluster, relay.port).ready().await;
        push_connected(&s, &op, true).await;
        let current = s
            .wait_for(
                &format!("one certificate left after a crash at {step}"),
                || async {
                    let identity = identity_secret(&s, &cluster).await;
                    let current = identity.get("certificate-id")?.clone();
                    let settled = ["next.crt", "next.key", "retired-certificate-id"]
                        .iter()
                        .all(|k| !identity.contains_key(*k));
                    (settled && operator_certificates(&iot, &client_id).await == [current.clone()])
                        .then_some(current)
                },
            )
            .await;
        // Every step is reached after the new key is in the Secret: the restart carries it on.
        assert_ne!(current, before, "{step}: the rotation was finished");
        assert_eq!(
            cert_status(&iot, &current).await.as_deref(),
            Some("ACTIVE"),
            "{step}"
        );
        let identity = identity_secret(&s, &cluster).await;
        assert!(
            thing_operator::credentials::pki::key_matches_certificate(
                &identity["tls.key"],
                &identity["tls.crt"]
            )
            .unwrap(),
            "{step}"
        );
    }
}

/// A policy of the operator policy's name that existed before the operator's identity Secret
/// was made by someone else: the operator leaves it alone and the channel stays down.
#[tokio::test]
async fn a_policy_the_operator_did_not_create_is_never_taken_over() {
    let s = setup("aws-push-own").await;
    let cluster = cluster_id();
    let policy_name = format!("thing-operator.{cluster}.push@policy");
    let iot = iot(&s.env);
    let foreign = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}).to_string();
    iot.create_policy()
        .policy_name(&policy_name)
        .policy_document(&foreign)
        .send()
        .await
        .unwrap();
    // Creation times have whole seconds and the owner rule allows 5 s of clock skew: the
    // foreign policy must be measurably older than the Secret the operator is about to make.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let standin = StandIn::start(&s);
    let relay = Relay::open(format!("127.0.0.1:{}", standin.tls_port)).await;
    let op = push_operator(&s, &cluster, relay.port).ready().await;
    s.wait_for("the operator to refuse the policy", || async {
        op.logs()
            .contains(&format!("policy {policy_name}"))
            .then_some(())
    })
    .await;
    assert!(op.logs().contains("existed before"), "{}", op.logs());
    assert_eq!(
        op.metric(
            "thing_operator_mqtt_connected",
            &["connection=\"aws-push\""]
        )
        .await,
        0.0
    );
    let policy = iot
        .get_policy()
        .policy_name(&policy_name)
        .send()
        .await
        .unwrap();
    let document: Value = serde_json::from_str(policy.policy_document().unwrap()).unwrap();
    assert_eq!(
        document.to_string(),
        serde_json::from_str::<Value>(&foreign).unwrap().to_string()
    );
    let versions = iot
        .list_policy_versions()
        .policy_name(&policy_name)
        .send()
        .await
        .unwrap();
    assert_eq!(versions.policy_versions().len(), 1, "no version added");
}
