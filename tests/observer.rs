//! Observers against the real API server: filters with memory that survives a restart, and the
//! HTTP (CloudEvents), Thing and MQTT sinks.

mod common;

use std::sync::{Arc, Mutex};

use common::{
    Received, Setup, ThingBuilder, create_resource, http_receiver, merge_patch, serve_webhook,
    thing,
};
use kube::Api;
use serde_json::{Value, json};
use thing_operator::api::{Observer, Thing};

/// Azure is not configured in these operators: the Thing's desired state still flows to
/// Observers, and no backend is needed.
fn azure_thing(name: &str, desired: Value) -> ThingBuilder {
    thing(name).broker("Azure").desired(desired)
}

async fn set_temp(api: &Api<Thing>, name: &str, temp: f64) {
    merge_patch(api, name, json!({"spec": {"desired": {"temp": temp}}})).await;
}

async fn wait_count(s: &Setup, received: &Received, n: usize) -> Vec<Value> {
    s.wait_for(&format!("{n} events"), || async {
        let r = received.lock().unwrap().clone();
        (r.len() >= n).then_some(r)
    })
    .await
}

/// Observers `o0`..`o{n-1}` of the Thing `hub`'s desired `/temp`, each POSTing to `url`.
async fn hub_observers(observers: &Api<Observer>, n: usize, url: &str) {
    for i in 0..n {
        create_resource(
            observers,
            &format!("o{i}"),
            json!({"source": {"thingName": "hub"}, "filter": {"section": "Desired", "fields": ["/temp"]},
                   "sink": {"http": {"url": url}}}),
        )
        .await;
    }
}

fn temp_of(event: &Value) -> f64 {
    event["data"]["state"]["temp"]
        .as_f64()
        .expect("temp in event")
}

#[tokio::test]
async fn changed_by_filter_forwards_cloud_events_and_remembers_across_restarts() {
    let s = Setup::new("obs-http").await;
    let ns = &s.ns;
    let (url, received) = http_receiver().await;
    // The sink is on loopback, which HTTP sinks may not reach by default.
    let operator = s.operator().args(["--http-sink-allow-cidr", "127.0.0.0/8"]);
    let mut op = operator.ready().await;
    let things = s.things();
    let observers: Api<Observer> = s.api();
    azure_thing("t1", json!({"temp": 20, "mode": "eco"}))
        .create(&things)
        .await;
    create_resource(
        &observers,
        "o1",
        json!({
            "source": {"thingName": "t1"},
            "filter": {"section": "Desired", "fields": ["/temp"], "changedBy": 2},
            "sink": {"http": {"url": url}},
        }),
    )
    .await;

    let events = wait_count(&s, &received, 1).await;
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
    merge_patch(
        &things,
        "t1",
        json!({"spec": {"desired": {"mode": "boost"}}}),
    )
    .await;
    set_temp(&things, "t1", 23.0).await;
    let events = wait_count(&s, &received, 2).await;
    assert_eq!(
        temp_of(&events[1]),
        23.0,
        "21 must have been filtered out: {events:?}"
    );

    // The memory reaches the Observer's status.
    s.wait_for("filter memory in status", || async {
        let st = observers.get("o1").await.ok()?.status?;
        (st.forwarded == Some(2) && st.last_forwarded?.get("t1")?.0.get("/temp")?.as_f64()? == 23.0)
            .then_some(())
    })
    .await;

    // A crash and a restart: the replayed state (23) and a small move (24) stay filtered,
    // because the memory came back from status; 25.5 passes.
    op.kill();
    let _op = operator.ready().await;
    set_temp(&things, "t1", 24.0).await;
    set_temp(&things, "t1", 25.5).await;
    let events = wait_count(&s, &received, 3).await;
    assert_eq!(
        temp_of(&events[2]),
        25.5,
        "replay or 24 leaked through: {events:?}"
    );
    assert_eq!(received.lock().unwrap().len(), 3);

    // The memory goes with the Thing: the status stays as large as the fleet is.
    things
        .delete("t1", &Default::default())
        .await
        .expect("delete t1");
    s.wait_for("t1's filter memory pruned from status", || async {
        let st = observers.get("o1").await.ok()?.status?;
        (!st.last_forwarded.unwrap_or_default().contains_key("t1")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn thing_sink_mirrors_state_and_unconfigured_mqtt_sink_is_reported() {
    let s = Setup::new("obs-thing").await;
    let ns = &s.ns;
    let op = s.operator().ready().await;
    let things = s.things();
    let observers: Api<Observer> = s.api();
    azure_thing("source", json!({"temp": 18}))
        .create(&things)
        .await;
    azure_thing("display", json!({"brightness": 3}))
        .create(&things)
        .await;
    create_resource(
        &observers,
        "mirror",
        json!({
            "source": {"thingName": "source"},
            "filter": {"section": "Desired"},
            "sink": {"thing": {"name": "display", "path": "/kitchen"}},
        }),
    )
    .await;
    s.wait_for("mirrored desired state", || async {
        let d = things.get("display").await.ok()?.spec.desired?;
        (d.0.get("kitchen")? == &json!({"temp": 18}) && d.0.get("brightness")? == &json!(3))
            .then_some(())
    })
    .await;
    set_temp(&things, "source", 19.5).await;
    s.wait_for("mirrored update", || async {
        let d = things.get("display").await.ok()?.spec.desired?;
        (d.0.get("kitchen")?.get("temp")?.as_f64()? == 19.5).then_some(())
    })
    .await;

    create_resource(
        &observers,
        "to-mqtt",
        json!({
            "source": {"matchLabels": {"room": "kitchen"}},
            "sink": {"mqtt": {"topic": format!("things/namespaces/{ns}/alerts/kitchen")}},
        }),
    )
    .await;
    let cond = s
        .wait_condition(&observers, "to-mqtt", "Ready", |_| true)
        .await;
    assert_eq!(cond.reason, "SinkNotConfigured");
    let mirror = observers.get("mirror").await.unwrap().status.unwrap();
    assert_eq!(mirror.conditions.get("Ready").unwrap().reason, "Running");
    drop(op);
}

#[tokio::test]
async fn mqtt_sink_publishes_to_the_broker() {
    let s = Setup::new("obs-mqtt").await;
    let ns = &s.ns;
    let op = s
        .operator()
        .mqtt(&format!("t-{ns}"))
        .args(["--mqtt-idle-sweep", "500ms"])
        .ready()
        .await;

    // A listener on the sink topic, with the broker's admin account.
    let topic = format!("t-{ns}/namespaces/{ns}/alerts");
    let mut options = rumqttc::MqttOptions::new(
        format!("listener-{ns}"),
        "127.0.0.1",
        s.env.var("MQTT_PORT").parse().unwrap(),
    );
    options.set_credentials(s.env.var("MQTT_ADMIN_USER"), s.env.mqtt_admin_password());
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

    let things = s.things();
    let observers: Api<Observer> = s.api();
    azure_thing("lamp", json!({"on": true}))
        .label("room", "hall")
        .create(&things)
        .await;
    // Give the listener's subscription a moment to be acknowledged before anything is sent:
    // wait for the operator to have the Thing's state, then create the Observer.
    s.wait_condition(&things, "lamp", "Ready", |_| true).await;
    create_resource(
        &observers,
        "lamp-feed",
        json!({
            "source": {"matchLabels": {"room": "hall"}},
            "filter": {"section": "Desired"},
            "sink": {"mqtt": {"topic": topic, "retain": true}},
        }),
    )
    .await;
    let msg = s
        .wait_for("MQTT message", || async {
            got.lock().unwrap().first().cloned()
        })
        .await;
    assert_eq!(msg["data"]["thing"], "lamp");
    assert_eq!(msg["data"]["state"], json!({"on": true}));

    // The namespace's connection is held by the sink; with the Observer gone, nobody holds it
    // and the idle sweep closes it (its gauge series goes with it).
    let series = format!("connection=\"namespace/{ns}\"");
    let connected = op
        .metric("thing_operator_mqtt_connected", &[series.as_str()])
        .await;
    assert_eq!(connected, 1.0, "the sink's namespace connection is up");
    observers
        .delete("lamp-feed", &Default::default())
        .await
        .expect("Observer deleted");
    s.wait_for("the unused namespace connection closed", || async {
        let (_, body) = op.get("/metrics").await?;
        (!body.contains(&series)).then_some(())
    })
    .await;
    drop(op);
}

/// A sink whose name resolves to an address sinks may not reach (here the machine's own host
/// name, which /etc/hosts maps to loopback) passes validation (only literal addresses are
/// known then) and is refused when it resolves: the Observer says so in its Ready condition
/// (reason `DestinationRefused`) and an Event, and no request is ever made.
#[tokio::test]
async fn a_name_resolving_inward_is_destination_refused() {
    let s = Setup::new("obs-refused").await;
    let hostname = String::from_utf8(
        std::process::Command::new("hostname")
            .output()
            .expect("hostname runs")
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let addresses: Vec<_> = tokio::net::lookup_host((hostname.as_str(), 80))
        .await
        .expect("the host name resolves")
        .collect();
    assert!(
        !addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback()),
        "this test needs the host name to resolve to loopback (as Debian's /etc/hosts does): {addresses:?}"
    );
    let (url, received) = http_receiver().await;
    let url = url.replace("127.0.0.1", &hostname);
    let _op = s.operator().ready().await;
    let things = s.things();
    let observers: Api<Observer> = s.api();
    azure_thing("t1", json!({"temp": 20})).create(&things).await;
    create_resource(
        &observers,
        "inward",
        json!({"source": {"thingName": "t1"}, "sink": {"http": {"url": url}}}),
    )
    .await;
    let ready = s
        .wait_condition(&observers, "inward", "Ready", |c| {
            c.reason == "DestinationRefused"
        })
        .await;
    assert!(
        ready.message.contains("destination refused"),
        "{}",
        ready.message
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = s.api();
    s.wait_for("a DestinationRefused Event", || async {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("DestinationRefused")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("inward")
            })
            .then_some(())
    })
    .await;
    assert!(
        received.lock().unwrap().is_empty(),
        "no request reaches a refused destination"
    );
}

/// `filter.expression` ("temperature too high" in one line): only updates for which it holds are
/// forwarded, in order; an expression that does not compile is `InvalidSpec` with its position.
#[tokio::test]
async fn an_expression_filter_forwards_only_what_it_accepts() {
    let s = Setup::new("obs-expr").await;
    let (url, received) = http_receiver().await;
    let _op = s
        .operator()
        .args(["--http-sink-allow-cidr", "127.0.0.0/8"])
        .ready()
        .await;
    let things = s.things();
    let observers: Api<Observer> = s.api();
    azure_thing("oven", json!({"temp": 25.0}))
        .create(&things)
        .await;
    create_resource(
        &observers,
        "too-hot",
        json!({
            "source": {"thingName": "oven"},
            "filter": {"section": "Desired", "expression": "state.temp > 30.0"},
            "sink": {"http": {"url": url}},
        }),
    )
    .await;
    s.wait_ready(&observers, "too-hot").await;
    for temp in [31.0, 29.0, 35.0] {
        set_temp(&things, "oven", temp).await;
        // One change at a time: the Observer sees each (no coalescing between them).
        s.wait_for("the Observer to see the change", || async {
            let st = observers.get("too-hot").await.ok()?.status?;
            let seen = st.forwarded.unwrap_or(0);
            (seen >= if temp > 30.0 { 1 } else { 0 }).then_some(())
        })
        .await;
    }
    // Deliveries of one Observer are in order: once 35 has arrived, a forwarded 29 (or 25)
    // would have arrived before it.
    let events = s
        .wait_for("the update of 35", || async {
            let r = received.lock().unwrap().clone();
            r.iter().any(|e| temp_of(e) == 35.0).then_some(r)
        })
        .await;
    let temps: Vec<f64> = events.iter().map(temp_of).collect();
    assert_eq!(temps, [31.0, 35.0]);

    create_resource(
        &observers,
        "broken",
        json!({
            "source": {"thingName": "oven"},
            "filter": {"expression": "state.temp >"},
            "sink": {"http": {"url": url}},
        }),
    )
    .await;
    let ready = s
        .wait_condition(&observers, "broken", "Ready", |c| c.reason == "InvalidSpec")
        .await;
    assert!(
        ready.message.contains("filter.expression") && ready.message.contains(":1:"),
        "{}",
        ready.message
    );
}

/// A webhook that keeps failing: the Observer retries as `spec.retry` says, then hands the
/// update to its dead-letter destination with the reason.
#[tokio::test]
async fn failing_deliveries_are_retried_then_dead_lettered_with_the_reason() {
    let s = Setup::new("obs-dead").await;
    // A webhook answering 500 to everything, counting the tries.
    let tries = Arc::new(Mutex::new(0usize));
    let counter = tries.clone();
    let failing_url = serve_webhook(axum::routing::post(move || {
        let counter = counter.clone();
        async move {
            *counter.lock().unwrap() += 1;
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        }
    }))
    .await;
    let (dead_url, dead) = http_receiver().await;
    let _op = s
        .operator()
        .args(["--http-sink-allow-cidr", "127.0.0.0/8"])
        .ready()
        .await;
    let things = s.things();
    azure_thing("boiler", json!({"temp": 60}))
        .create(&things)
        .await;
    let observers: Api<Observer> = s.api();
    create_resource(
        &observers,
        "alerts",
        json!({
            "source": {"thingName": "boiler"},
            "filter": {"section": "Desired"},
            "sink": {"http": {"url": failing_url}},
            "retry": {"attempts": 3, "initialBackoff": "50ms", "maxBackoff": "100ms", "deadline": "30s"},
            "deadLetter": {"http": {"url": dead_url}},
        }),
    )
    .await;
    let letters = wait_count(&s, &dead, 1).await;
    let letter = &letters[0];
    assert_eq!(letter["type"], "dev.thing-operator.deadletter", "{letter}");
    assert!(
        letter["data"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("500"),
        "{letter}"
    );
    assert_eq!(
        letter["data"]["event"]["data"]["state"]["temp"],
        json!(60),
        "{letter}"
    );
    assert_eq!(
        *tries.lock().unwrap(),
        3,
        "the policy's three tries, no more"
    );
    let status = s
        .wait_for("the failure counted", || async {
            let st = observers.get("alerts").await.ok()?.status?;
            (st.failed >= Some(1)).then_some(st)
        })
        .await;
    assert_eq!(status.forwarded.unwrap_or(0), 0);
}

/// A slow destination delays nobody else: while one Observer's webhook holds its request,
/// another Observer of the same Thing delivers.
#[tokio::test]
async fn a_slow_webhook_does_not_delay_another_observer() {
    let s = Setup::new("obs-slow").await;
    // A webhook that answers only when the test lets it.
    let (release, released) = tokio::sync::watch::channel(false);
    let held = Arc::new(Mutex::new(0usize));
    let counter = held.clone();
    let slow_url = serve_webhook(axum::routing::post(move || {
        let (counter, mut released) = (counter.clone(), released.clone());
        async move {
            *counter.lock().unwrap() += 1;
            let _ = released.wait_for(|r| *r).await;
            "ok"
        }
    }))
    .await;
    let (fast_url, fast) = http_receiver().await;
    let _op = s
        .operator()
        .args(["--http-sink-allow-cidr", "127.0.0.0/8"])
        .ready()
        .await;
    let things = s.things();
    azure_thing("kettle", json!({"temp": 20}))
        .create(&things)
        .await;
    let observers: Api<Observer> = s.api();
    for (name, url) in [("slow", &slow_url), ("fast", &fast_url)] {
        create_resource(
            &observers,
            name,
            json!({"source": {"thingName": "kettle"}, "filter": {"section": "Desired"},
                   "sink": {"http": {"url": url}}}),
        )
        .await;
    }
    s.wait_for("the slow webhook holding a request", || async {
        (*held.lock().unwrap() >= 1).then_some(())
    })
    .await;
    set_temp(&things, "kettle", 90.0).await;
    s.wait_for("the fast Observer delivering meanwhile", || async {
        let r = fast.lock().unwrap().clone();
        r.iter().any(|e| temp_of(e) == 90.0).then_some(())
    })
    .await;
    assert_eq!(
        *held.lock().unwrap(),
        1,
        "the slow webhook still holds its first request"
    );
    let _ = release.send(true);
}

/// Within one Observer, a Thing whose deliveries hang holds up only itself: another Thing's
/// change goes out meanwhile, and the held Thing's updates follow in order once it is let go.
#[tokio::test]
async fn a_slow_thing_does_not_delay_another_thing_of_the_same_observer() {
    let s = Setup::new("obs-lanes").await;
    // A webhook that holds every request about `slowpoke` until the test lets it go.
    let (release, released) = tokio::sync::watch::channel(false);
    let held = Arc::new(Mutex::new(0usize));
    let received: Received = Arc::default();
    let (counter, record) = (held.clone(), received.clone());
    let url = serve_webhook(axum::routing::post(
        move |axum::Json(event): axum::Json<Value>| {
            let (counter, record, mut released) =
                (counter.clone(), record.clone(), released.clone());
            async move {
                if event["data"]["thing"] == "slowpoke" {
                    *counter.lock().unwrap() += 1;
                    let _ = released.wait_for(|r| *r).await;
                }
                record.lock().unwrap().push(event);
                "ok"
            }
        },
    ))
    .await;
    let _op = s
        .operator()
        .args(["--http-sink-allow-cidr", "127.0.0.0/8"])
        .ready()
        .await;
    let things = s.things();
    for name in ["slowpoke", "swift"] {
        azure_thing(name, json!({"temp": 0}))
            .label("lane", "test")
            .create(&things)
            .await;
    }
    let observers: Api<Observer> = s.api();
    create_resource(
        &observers,
        "both",
        json!({"source": {"matchLabels": {"lane": "test"}}, "filter": {"section": "Desired"},
               "delivery": "Every", "sink": {"http": {"url": url}}}),
    )
    .await;
    s.wait_for("slowpoke's first delivery held", || async {
        (*held.lock().unwrap() >= 1).then_some(())
    })
    .await;
    for temp in [1.0, 2.0, 3.0] {
        set_temp(&things, "slowpoke", temp).await;
    }
    set_temp(&things, "swift", 90.0).await;
    s.wait_for("swift delivering while slowpoke is held", || async {
        let r = received.lock().unwrap().clone();
        r.iter()
            .any(|e| e["data"]["thing"] == "swift" && temp_of(e) == 90.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        *held.lock().unwrap(),
        1,
        "slowpoke's later updates wait behind its first: one request at a time per Thing"
    );
    let _ = release.send(true);
    let slowpoke = s
        .wait_for("slowpoke's updates after the release", || async {
            let temps: Vec<f64> = received
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e["data"]["thing"] == "slowpoke")
                .map(temp_of)
                .collect();
            temps.contains(&3.0).then_some(temps)
        })
        .await;
    let mut in_order = slowpoke.clone();
    in_order.sort_by(f64::total_cmp);
    assert_eq!(slowpoke, in_order, "one Thing's updates arrive in order");
    assert_eq!(slowpoke.first(), Some(&0.0));
}

/// One Thing, a hundred Observers: each delivers the change.
#[tokio::test]
async fn a_hundred_observers_on_one_thing_each_deliver() {
    let s = Setup::new("obs-many").await;
    let (url, received) = http_receiver().await;
    let _op = s
        .operator()
        .args(["--http-sink-allow-cidr", "127.0.0.0/8"])
        .ready()
        .await;
    let things = s.things();
    azure_thing("hub", json!({"temp": 1})).create(&things).await;
    let observers: Api<Observer> = s.api();
    const OBSERVERS: usize = 100;
    hub_observers(&observers, OBSERVERS, &url).await;
    s.wait_for("every Observer's first delivery", || async {
        (received.lock().unwrap().len() >= OBSERVERS).then_some(())
    })
    .await;
    set_temp(&things, "hub", 2.0).await;
    s.wait_for("every Observer delivering the change", || async {
        let r = received.lock().unwrap().clone();
        (r.iter().filter(|e| temp_of(e) == 2.0).count() >= OBSERVERS).then_some(())
    })
    .await;
    let r = received.lock().unwrap().clone();
    assert_eq!(
        r.iter().filter(|e| temp_of(e) == 2.0).count(),
        OBSERVERS,
        "exactly one delivery of the change per Observer"
    );
    s.wait_for("the Observer's count of the Things it watches", || async {
        let st = observers.get("o0").await.ok()?.status?;
        (st.matched_things == Some(1)).then_some(())
    })
    .await;
}

/// `maxInFlight` is bounded by the schema: a namespace cannot ask for zero deliveries at a time
/// (a stalled Observer) or for an unbounded number of connections to its sink.
#[tokio::test]
async fn max_in_flight_outside_its_bounds_is_refused_by_the_api_server() {
    let s = Setup::new("obs-inflight").await;
    let observers: Api<Observer> = s.api();
    for (name, value) in [("zero", 0), ("above-256", 257)] {
        let observer: Observer = common::resource(
            "Observer",
            name,
            json!({"source": {"thingName": "t"}, "maxInFlight": value,
                   "sink": {"http": {"url": "https://example.com/hook"}}}),
        );
        let refused = observers
            .create(&Default::default(), &observer)
            .await
            .expect_err("maxInFlight out of bounds must be refused");
        assert!(
            refused.to_string().contains("maxInFlight"),
            "{name}: {refused}"
        );
    }
}

/// Observers' status writes share one fleet-wide budget (`--task-status-write-qps`): six busy
/// Observers, each wanting a write every 2 s (3 a second together), get no more than the
/// budget's one a second, and every Observer's counters still land once the traffic stops.
#[tokio::test]
async fn observer_status_writes_share_the_fleet_budget() {
    let s = Setup::new("obs-budget").await;
    let (url, received) = http_receiver().await;
    let op = s
        .operator()
        .args([
            "--http-sink-allow-cidr",
            "127.0.0.0/8",
            "--task-status-write-qps",
            "1",
        ])
        .ready()
        .await;
    let things = s.things();
    azure_thing("hub", json!({"temp": 0})).create(&things).await;
    let observers: Api<Observer> = s.api();
    const OBSERVERS: usize = 6;
    hub_observers(&observers, OBSERVERS, &url).await;
    wait_count(&s, &received, OBSERVERS).await;

    let writes = || op.metric("thing_operator_status_writes_total", &["kind=\"Observer\""]);
    let before = writes().await;
    let started = std::time::Instant::now();
    // The load: a change every 400 ms for 12 s, so every Observer has news at each 2 s flush.
    for temp in 1..=30 {
        set_temp(&things, "hub", f64::from(temp)).await;
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    let window = started.elapsed().as_secs_f64();
    let written = writes().await - before;
    assert!(
        written <= window + 2.0,
        "{written} Observer status writes in {window:.1} s against a budget of 1/s (burst 1)"
    );

    // Counted and delivered agree once the traffic stops: no Observer is starved of its turn.
    s.wait_for("every Observer's counters in status", || async {
        let delivered = received.lock().unwrap().len() as i64;
        let list = observers.list(&Default::default()).await.ok()?;
        let counted: i64 = list
            .items
            .iter()
            .map(|o| o.status.as_ref().and_then(|st| st.forwarded).unwrap_or(0))
            .sum();
        (delivered == (OBSERVERS * 31) as i64 && counted == delivered).then_some(())
    })
    .await;
}
