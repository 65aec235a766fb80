//! Every metric the chart's Grafana dashboard queries is one the operator exposes on /metrics,
//! with the labels the queries group and filter by: a renamed metric or label fails here rather
//! than showing an empty panel. The operator under test is driven so that every panel's metric
//! has samples, and the metrics behind the fleet panels (Things by Ready reason, dead letters,
//! MQTT connection state) are checked for their values too; the connection state also through
//! a loss of the connection.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use axum::{Router, http::StatusCode, routing::post};
use common::{Relay, Setup, create_resource, free_port, thing};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::{Value, json};
use thing_operator::api::Observer;

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/thing-operator/dashboards/thing-operator.json"
);

/// Labels Prometheus adds itself (`job`, `instance`) or the histogram encoding adds (`le`).
const SCRAPE_LABELS: [&str; 3] = ["job", "instance", "le"];

/// Sample names /metrics exposes, from its `# TYPE` lines (OpenMetrics: a counter `x` is sampled
/// as `x_total`, a histogram as `x_bucket`, `x_sum`, `x_count`).
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = rest.split_once(' ').expect("# TYPE name type");
        match kind {
            "counter" => names.insert(format!("{family}_total")),
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{family}{suffix}"));
                }
                true
            }
            _ => names.insert(family.to_string()),
        };
    }
    names
}

/// The label names of the samples of each name present in /metrics.
fn sample_labels(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let set = labels.entry(name.to_string()).or_default();
        for pair in rest.split("\",") {
            if let Some((key, _)) = pair.split_once("=\"") {
                set.insert(key.trim_start_matches(',').to_string());
            }
        }
    }
    labels
}

/// Every PromQL expression of the dashboard's panels.
fn expressions(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_string())
        .collect()
}

/// The metric names an expression reads (`thing_operator_...` identifiers).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("thing_operator_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The label names an expression groups by (`by (a, b)`) or matches on (`{a="x"}`).
fn label_names(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for part in expr.split("by (").skip(1) {
        let inner = part.split(')').next().unwrap_or_default();
        labels.extend(inner.split(',').map(|l| l.trim().to_string()));
    }
    for part in expr.split('{').skip(1) {
        let inner = part.split('}').next().unwrap_or_default();
        for matcher in inner.split(',') {
            let key: String = matcher
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !key.is_empty() {
                labels.insert(key);
            }
        }
    }
    labels.retain(|l| !l.is_empty());
    labels
}

/// An HTTP sink that answers every delivery with 400, a final answer: each update an Observer
/// sends it becomes a dead letter at once (no retries).
async fn refusing_receiver() -> String {
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let app = Router::new().route("/events", post(|| async { StatusCode::BAD_REQUEST }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://127.0.0.1:{port}/events")
}

#[test]
fn expression_parsing() {
    let expr = r#"sum by (kind, outcome) (rate(thing_operator_reconciles_total{job=~"$job",outcome="error"}[5m]))"#;
    assert_eq!(metric_names(expr), ["thing_operator_reconciles_total"]);
    let labels: Vec<String> = label_names(expr).into_iter().collect();
    assert_eq!(labels, ["job", "kind", "outcome"]);
    let text = "# TYPE thing_operator_reconciles counter\nthing_operator_reconciles_total{kind=\"Thing\",outcome=\"ok\"} 1\n";
    assert!(exposed_names(text).contains("thing_operator_reconciles_total"));
    assert_eq!(
        sample_labels(text)["thing_operator_reconciles_total"],
        ["kind".to_string(), "outcome".to_string()].into()
    );
}

#[tokio::test]
async fn every_dashboard_metric_is_exposed() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let s = Setup::new("dash").await;
    let ns = &s.ns;
    let op = s
        .operator()
        .mqtt("dash")
        // The refusing sink below is on loopback, which HTTP sinks may not reach by default.
        .args(["--http-sink-allow-cidr", "127.0.0.0/8"])
        .ready()
        .await;
    // One Thing through its whole life, so reconcile, backend, status and Event metrics have
    // samples whose labels can be checked too.
    thing("lamp")
        .broker("Mosquitto")
        .desired(json!({"on": true}))
        .create(&s.things())
        .await;
    s.wait_ready(&s.things(), "lamp").await;
    // And one that fails (its Secret name is taken by a Secret that is not its own), for the
    // failure metric.
    let mut taken = Secret::default();
    taken.metadata.name = Some("taken".into());
    s.api::<Secret>()
        .create(&PostParams::default(), &taken)
        .await
        .unwrap();
    thing("squatter")
        .broker("Mosquitto")
        .field("credentials", json!({"secretName": "taken"}))
        .create(&s.things())
        .await;
    s.wait_for("a failed reconcile counted", || async {
        (op.metric(
            "thing_operator_reconcile_failures_total",
            &["SecretConflict"],
        )
        .await
            > 0.0)
            .then_some(())
    })
    .await;
    // An Observer whose every delivery is refused, for the dead-letter metric.
    let observers: Api<Observer> = s.api();
    create_resource(
        &observers,
        "refused",
        json!({
            "source": {"thingName": "lamp"},
            "sink": {"http": {"url": refusing_receiver().await}},
        }),
    )
    .await;
    let dead_letters = format!("namespace=\"{ns}\"");
    s.wait_for("a dead letter counted", || async {
        (op.metric(
            "thing_operator_observer_dead_letters_total",
            &[&dead_letters],
        )
        .await
            > 0.0)
            .then_some(())
    })
    .await;
    // The Things gauge counts both Things by backend and Ready reason (recomputed every 10 s).
    let things_with = |reason: &'static str| {
        let op = &op;
        async move {
            op.metric(
                "thing_operator_things",
                &["backend=\"Mosquitto\"", &format!("reason=\"{reason}\"")],
            )
            .await
        }
    };
    s.wait_for("both Things in the gauge", || async {
        (things_with("Reconciled").await == 1.0 && things_with("SecretConflict").await == 1.0)
            .then_some(())
    })
    .await;
    // Every kind of MQTT connection reports itself up: the operator's admin connection, the
    // one Subscribers write through, and the namespace's own (made for an MQTT sink).
    create_resource(
        &observers,
        "to-mqtt",
        json!({
            "source": {"thingName": "lamp"},
            "sink": {"mqtt": {"topic": format!("dash/namespaces/{ns}/lamp")}},
        }),
    )
    .await;
    for connection in [
        "backend".to_string(),
        "events".into(),
        format!("namespace/{ns}"),
    ] {
        let filter = format!("connection=\"{connection}\"");
        s.wait_for(&format!("MQTT connection {connection} up"), || async {
            (op.metric("thing_operator_mqtt_connected", &[&filter]).await == 1.0).then_some(())
        })
        .await;
    }
    let (_, text) = op.get("/metrics").await.expect("metrics served");
    let exposed = exposed_names(&text);
    let samples = sample_labels(&text);

    let exprs = expressions(&dashboard);
    assert!(exprs.len() >= 10, "dashboard has {} queries", exprs.len());
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "query reads no operator metric: {expr}");
        for name in names {
            assert!(
                exposed.contains(&name),
                "{name} (in {expr}) is not on /metrics; exposed: {exposed:?}"
            );
            // Where the metric has samples, the labels the query uses are theirs.
            if let Some(have) = samples.get(&name) {
                for label in label_names(expr) {
                    assert!(
                        have.contains(&label) || SCRAPE_LABELS.contains(&label.as_str()),
                        "{name} has no label {label} (in {expr}); it has {have:?}"
                    );
                }
            }
        }
    }
    // The queries with samples to check labels against are most of them.
    let checked = exprs
        .iter()
        .filter(|e| metric_names(e).iter().all(|n| samples.contains_key(n)))
        .count();
    assert!(
        checked * 2 >= exprs.len(),
        "only {checked} of {} queries had samples",
        exprs.len()
    );

    // A deleted Thing leaves the gauge: no sample is left at a stale count.
    s.things()
        .delete("squatter", &DeleteParams::default())
        .await
        .unwrap();
    s.wait_gone(&s.things(), "squatter").await;
    s.wait_for("the deleted Thing gone from the gauge", || async {
        let (_, text) = op.get("/metrics").await?;
        let stale = text.lines().any(|l| {
            l.starts_with("thing_operator_things{") && l.contains("reason=\"SecretConflict\"")
        });
        (!stale).then_some(())
    })
    .await;
    assert_eq!(things_with("Reconciled").await, 1.0);
}

/// `thing_operator_mqtt_connected` is 1 while the connection is up, 0 from its loss until the
/// operator is back on the broker.
#[tokio::test]
async fn mqtt_connection_state_follows_the_connection() {
    let s = Setup::new("dash-mqtt").await;
    let broker = s.env.var("MQTT_URL");
    let upstream = broker
        .strip_prefix("mqtt://")
        .expect("plain MQTT in the test env")
        .to_string();
    let mut relay = Relay::open(upstream).await;
    let op = s
        .operator()
        .args([
            "--mqtt-url",
            &format!("mqtt://127.0.0.1:{}", relay.port),
            "--mqtt-username",
            &s.env.var("MQTT_ADMIN_USER"),
            "--mqtt-password-file",
            &s.env.var("MQTT_ADMIN_PASSWORD_FILE"),
            "--mqtt-topic-prefix",
            "dash-mqtt",
        ])
        .ready()
        .await;
    let backend_is = |want: f64, what: &'static str| {
        let op = &op;
        let s = &s;
        async move {
            s.wait_for(what, || async {
                (op.metric("thing_operator_mqtt_connected", &["connection=\"backend\""])
                    .await
                    == want)
                    .then_some(())
            })
            .await
        }
    };
    backend_is(1.0, "the backend connection up").await;
    relay.cut();
    backend_is(0.0, "the backend connection reported down").await;
    relay.reopen().await;
    backend_is(1.0, "the backend connection up again").await;
}
