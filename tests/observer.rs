//! Observers against the real API server: filters with memory that survives a restart, and the
//! HTTP (CloudEvents), Thing and MQTT sinks.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use common::{OperatorProcess, TestEnv, create_namespace, delete_namespace, free_port, wait_for};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use thing_operator::api::{Observer, Thing};

const WAIT: Duration = Duration::from_secs(60);

type Received = Arc<Mutex<Vec<Value>>>;

/// A local HTTP endpoint that records every CloudEvent POSTed to it.
async fn http_receiver() -> (String, Received) {
    let received: Received = Arc::default();
    async fn collect(State(r): State<Received>, Json(body): Json<Value>) -> &'static str {
        r.lock().unwrap().push(body);
        "ok"
    }
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let app = Router::new()
        .route("/events", post(collect))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://127.0.0.1:{port}/events"), received)
}

fn thing(name: &str, desired: Value) -> Thing {
    // Azure is not configured in these operators: the Thing's desired state still flows to
    // Observers, and no backend is needed.
    common::resource(
        "Thing",
        name,
        json!({"broker": "Azure", "desired": desired}),
    )
}

fn observer(name: &str, spec: Value) -> Observer {
    common::resource("Observer", name, spec)
}

async fn set_temp(api: &Api<Thing>, name: &str, temp: f64) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"desired": {"temp": temp}}})),
    )
    .await
    .unwrap();
}

async fn wait_count(received: &Received, n: usize) -> Vec<Value> {
    wait_for(&format!("{n} events"), WAIT, || async {
        let r = received.lock().unwrap().clone();
        (r.len() >= n).then_some(r)
    })
    .await
}

fn temp_of(event: &Value) -> f64 {
    event["data"]["state"]["temp"]
        .as_f64()
        .expect("temp in event")
}

#[tokio::test]
async fn changed_by_filter_forwards_cloud_events_and_remembers_across_restarts() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "obs-http").await;
    let (url, received) = http_receiver().await;
    let mut op = OperatorProcess::start(&env, &ns, &["--http-sink-allow-cidr", "127.0.0.0/8"], &[]);
    op.wait_ready().await;
    let things: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let observers: Api<Observer> = Api::namespaced(client.clone(), &ns);
    things
        .create(
            &PostParams::default(),
            &thing("t1", json!({"temp": 20, "mode": "eco"})),
        )
        .await
        .unwrap();
    observers
        .create(
            &PostParams::default(),
            &observer(
                "o1",
                json!({
                    "source": {"thingName": "t1"},
                    "filter": {"section": "Desired", "fields": ["/temp"], "changedBy": 2},
                    "sink": {"http": {"url": url}},
                }),
            ),
        )
        .await
        .unwrap();

    let events = wait_count(&received, 1).await;
    let first = &events[0];
    assert_eq!(first["specversion"], "1.0");
    assert_eq!(first["type"], "dev.thing-operator.thing.desired");
    assert_eq!(
        first["source"],
        format!("/apis/iot.thing-operator.dev/v1alpha1/namespaces/{ns}/things/t1")
    );
    assert_eq!(first["data"]["state"], json!({"temp": 20}));

    // 21 is within 2 of the last forwarded 20: skipped. 23 is not: forwarded.
    set_temp(&things, "t1", 21.0).await;
    things
        .patch(
            "t1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"desired": {"mode": "boost"}}})),
        )
        .await
        .unwrap();
    set_temp(&things, "t1", 23.0).await;
    let events = wait_count(&received, 2).await;
    assert_eq!(
        temp_of(&events[1]),
        23.0,
        "21 must have been filtered out: {events:?}"
    );

    // The memory reaches the Observer's status.
    wait_for("filter memory in status", WAIT, || async {
        let s = observers.get("o1").await.ok()?.status?;
        (s.forwarded == Some(2) && s.last_forwarded?.get("t1")?.0.get("/temp")?.as_f64()? == 23.0)
            .then_some(())
    })
    .await;

    // A crash and a restart: the replayed state (23) and a small move (24) stay filtered,
    // because the memory came back from status; 25.5 passes.
    op.kill();
    let op = OperatorProcess::start(&env, &ns, &["--http-sink-allow-cidr", "127.0.0.0/8"], &[]);
    op.wait_ready().await;
    set_temp(&things, "t1", 24.0).await;
    set_temp(&things, "t1", 25.5).await;
    let events = wait_count(&received, 3).await;
    assert_eq!(
        temp_of(&events[2]),
        25.5,
        "replay or 24 leaked through: {events:?}"
    );
    assert_eq!(received.lock().unwrap().len(), 3);
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn thing_sink_mirrors_state_and_unconfigured_mqtt_sink_is_reported() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "obs-thing").await;
    let op = OperatorProcess::start(&env, &ns, &[], &[]);
    op.wait_ready().await;
    let things: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let observers: Api<Observer> = Api::namespaced(client.clone(), &ns);
    things
        .create(
            &PostParams::default(),
            &thing("source", json!({"temp": 18})),
        )
        .await
        .unwrap();
    things
        .create(
            &PostParams::default(),
            &thing("display", json!({"brightness": 3})),
        )
        .await
        .unwrap();
    observers
        .create(
            &PostParams::default(),
            &observer(
                "mirror",
                json!({
                    "source": {"thingName": "source"},
                    "filter": {"section": "Desired"},
                    "sink": {"thing": {"name": "display", "path": "/kitchen"}},
                }),
            ),
        )
        .await
        .unwrap();
    wait_for("mirrored desired state", WAIT, || async {
        let d = things.get("display").await.ok()?.spec.desired?;
        (d.0.get("kitchen")? == &json!({"temp": 18}) && d.0.get("brightness")? == &json!(3))
            .then_some(())
    })
    .await;
    set_temp(&things, "source", 19.5).await;
    wait_for("mirrored update", WAIT, || async {
        let d = things.get("display").await.ok()?.spec.desired?;
        (d.0.get("kitchen")?.get("temp")?.as_f64()? == 19.5).then_some(())
    })
    .await;

    observers
        .create(
            &PostParams::default(),
            &observer(
                "to-mqtt",
                json!({
                    "source": {"matchLabels": {"room": "kitchen"}},
                    "sink": {"mqtt": {"topic": format!("things/namespaces/{ns}/alerts/kitchen")}},
                }),
            ),
        )
        .await
        .unwrap();
    let cond = wait_for("SinkNotConfigured", WAIT, || async {
        observers
            .get("to-mqtt")
            .await
            .ok()?
            .status?
            .conditions
            .get("Ready")
            .cloned()
    })
    .await;
    assert_eq!(cond.reason, "SinkNotConfigured");
    let mirror = observers.get("mirror").await.unwrap().status.unwrap();
    assert_eq!(mirror.conditions.get("Ready").unwrap().reason, "Running");
    drop(op);
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn mqtt_sink_publishes_to_the_broker() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "obs-mqtt").await;
    let password_file = env.var("MQTT_ADMIN_PASSWORD_FILE");
    let password = std::fs::read_to_string(&password_file).unwrap();
    let op = OperatorProcess::start(
        &env,
        &ns,
        &[
            "--mqtt-url",
            &env.var("MQTT_URL"),
            "--mqtt-username",
            &env.var("MQTT_ADMIN_USER"),
            "--mqtt-password-file",
            &password_file,
            "--mqtt-topic-prefix",
            &format!("t-{ns}"),
        ],
        &[],
    );
    op.wait_ready().await;

    // A listener on the sink topic, with the broker's admin account.
    let topic = format!("t-{ns}/namespaces/{ns}/alerts");
    let mut options = rumqttc::MqttOptions::new(
        format!("listener-{ns}"),
        "127.0.0.1",
        env.var("MQTT_PORT").parse().unwrap(),
    );
    options.set_credentials(env.var("MQTT_ADMIN_USER"), password.trim());
    let (listener, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
    listener
        .subscribe(&topic, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev
                && let Ok(v) = serde_json::from_slice::<Value>(&p.payload)
            {
                sink.lock().unwrap().push(v);
            }
        }
    });

    let things: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let observers: Api<Observer> = Api::namespaced(client.clone(), &ns);
    let mut t = thing("lamp", json!({"on": true}));
    t.metadata.labels = Some([("room".to_string(), "hall".to_string())].into());
    things.create(&PostParams::default(), &t).await.unwrap();
    // Give the listener's subscription a moment to be acknowledged before anything is sent:
    // wait for the operator to have the Thing's state, then create the Observer.
    wait_for("Thing reconciled", WAIT, || async {
        things
            .get("lamp")
            .await
            .ok()?
            .status?
            .conditions
            .get("Ready")
            .map(|_| ())
    })
    .await;
    observers
        .create(
            &PostParams::default(),
            &observer(
                "lamp-feed",
                json!({
                    "source": {"matchLabels": {"room": "hall"}},
                    "filter": {"section": "Desired"},
                    "sink": {"mqtt": {"topic": topic, "retain": true}},
                }),
            ),
        )
        .await
        .unwrap();
    let msg = wait_for("MQTT message", WAIT, || async {
        got.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(msg["data"]["thing"], "lamp");
    assert_eq!(msg["data"]["state"], json!({"on": true}));
    drop(op);
    delete_namespace(&client, &ns).await;
}
