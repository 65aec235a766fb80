//! Test fixtures for the reconcilers: a [`Context`] around a mocked API server (kube's
//! `tower-test` pattern, as in controller-rs) and the debug backend, so reconcilers run in
//! `cargo test` without a cluster. The mock keeps the objects a test seeds, answers the calls
//! the reconcilers make the way the API server would (JSON patches, server-side-apply of
//! status, Event creation) and records every request for the test to assert on.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use http::{Request, Response};
use kube::{
    Client, Resource, ResourceExt,
    client::Body,
    runtime::events::{Recorder, Reporter},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Context, ContextParts, ControllerConfig, ThingTrigger};
use crate::{
    api::Thing,
    feed::NoFeed,
    forwarding::{
        BrokerConnections, MqttBrokers, ObserverManager, SharedByTasks, StateBus,
        SubscriberManager, status_budget::TaskStatusBudget,
    },
    metrics::Metrics,
    provider::{ProviderRegistry, debug::DebugProvider},
};

/// One request the controller made.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: Value,
}

impl Recorded {
    pub fn is_status_write(&self) -> bool {
        self.method == "PATCH" && self.path.ends_with("/status")
    }

    pub fn is_event(&self) -> bool {
        self.method == "POST" && self.path.contains("/events")
    }

    /// An Event's reason and type.
    pub fn event(&self) -> Option<(String, String)> {
        self.is_event().then(|| {
            (
                self.body["reason"].as_str().unwrap_or_default().to_string(),
                self.body["type"].as_str().unwrap_or_default().to_string(),
            )
        })
    }
}

#[derive(Default)]
struct State {
    /// Objects by their API path (without `/status`).
    objects: HashMap<String, Value>,
    requests: Vec<Recorded>,
}

/// The mocked API server's shared state.
#[derive(Clone, Default)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
}

impl ApiServer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `thing` as the API server would return it.
    pub fn seed(&self, thing: &Thing) {
        let value = serde_json::to_value(thing).expect("a Thing serializes");
        self.lock().objects.insert(thing_path(thing), value);
    }

    /// Stores any object at its API path (e.g. `/api/v1/namespaces/team-a/secrets/login`).
    pub fn seed_at(&self, path: &str, value: Value) {
        self.lock().objects.insert(path.to_string(), value);
    }

    /// The object stored at `path` now.
    pub fn object_at(&self, path: &str) -> Option<Value> {
        self.lock().objects.get(path).cloned()
    }

    /// The Thing as stored now (after the controller's patches).
    pub fn thing(&self, thing: &Thing) -> Thing {
        let value = self.lock().objects[&thing_path(thing)].clone();
        serde_json::from_value(value).expect("the stored Thing deserializes")
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Forgets the requests seen so far.
    pub fn clear(&self) {
        self.lock().requests.clear();
    }

    fn answer(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let mut state = self.lock();
        state.requests.push(Recorded {
            method: method.to_string(),
            path: path.to_string(),
            body: body.clone(),
        });
        let object_path = path.trim_end_matches("/status");
        match method {
            "POST" if path.contains("/events") => (201, body),
            "PATCH" => {
                let Some(object) = state.objects.get_mut(object_path) else {
                    return (404, not_found());
                };
                if path.ends_with("/status") {
                    // Server-side apply by the only status manager: its status replaces ours.
                    object["status"] = body["status"].clone();
                } else if body.is_array() {
                    if apply_json_patch(object, body).is_err() {
                        return (422, json!({"kind": "Status", "code": 422}));
                    }
                } else {
                    json_patch::merge(object, &body);
                }
                (200, object.clone())
            }
            "GET" => match state.objects.get(object_path) {
                Some(object) => (200, object.clone()),
                None => (404, not_found()),
            },
            _ => (404, not_found()),
        }
    }
}

/// RFC 6902 as the API server applies it: a `test` for `null` passes on a missing field (the
/// finalizer helper tests that `metadata.finalizers` is still absent before adding it).
fn apply_json_patch(object: &mut Value, mut ops: Value) -> Result<(), String> {
    if let Some(ops) = ops.as_array_mut() {
        ops.retain(|op| {
            let absent_null_test = op["op"] == "test"
                && op["value"].is_null()
                && op["path"]
                    .as_str()
                    .is_some_and(|p| object.pointer(p).is_none());
            !absent_null_test
        });
    }
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(|e| e.to_string())?;
    json_patch::patch(object, &patch).map_err(|e| e.to_string())
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
}

fn thing_path(thing: &Thing) -> String {
    format!(
        "/apis/{}/namespaces/{}/things/{}",
        Thing::api_version(&()),
        thing.namespace().unwrap_or_default(),
        thing.name_any()
    )
}

/// A client whose requests the returned [`ApiServer`] answers.
fn mock_client() -> (Client, ApiServer) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = ApiServer::default();
    let answering = server.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (code, answer) = answering.answer(parts.method.as_str(), parts.uri.path(), body);
            let response = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&answer).unwrap_or_default()))
                .expect("a valid response");
            send.send_response(response);
        }
    });
    (Client::new(service, "default"), server)
}

/// A Context whose only backend is `provider`, talking to a mocked API server.
pub fn context(provider: Arc<DebugProvider>) -> (Arc<Context>, ApiServer) {
    context_with(provider, ControllerConfig::default())
}

/// [`context`] with the given settings (e.g. an egress policy).
pub fn context_with(
    provider: Arc<DebugProvider>,
    config: ControllerConfig,
) -> (Arc<Context>, ApiServer) {
    let (client, server) = mock_client();
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let mut providers = ProviderRegistry::default();
    providers.register(provider);
    let (_trigger, thing_triggers) = ThingTrigger::channel();
    let reporter = Reporter {
        controller: "thing-operator-test".into(),
        instance: None,
    };
    let connections = BrokerConnections::new(metrics.clone(), shutdown.clone());
    let shared_by_tasks = SharedByTasks {
        provenance: Default::default(),
        status_budget: TaskStatusBudget::unlimited(),
    };
    let ctx = Context::new(ContextParts {
        recorder: Recorder::new(client.clone(), reporter),
        observers: ObserverManager::new(
            StateBus::default(),
            client.clone(),
            MqttBrokers {
                mqtt: Default::default(),
                connections: connections.clone(),
            },
            Arc::default(),
            shared_by_tasks.clone(),
            metrics.clone(),
            shutdown.clone(),
        ),
        subscribers: Arc::new(SubscriberManager::new(
            client.clone(),
            Default::default(),
            connections.clone(),
            Arc::new(NoFeed),
            shared_by_tasks,
            metrics.clone(),
            shutdown,
        )),
        client,
        metrics,
        providers,
        config,
        feed: Arc::new(NoFeed),
        thing_triggers,
        connections,
    });
    (Arc::new(ctx), server)
}

/// A Thing as a test needs it: named, namespaced, with a uid and generation.
pub fn thing(name: &str, spec: Value) -> Thing {
    let mut thing: Thing = serde_json::from_value(json!({
        "apiVersion": Thing::api_version(&()),
        "kind": "Thing",
        "metadata": {"name": name, "namespace": "team-a", "uid": format!("uid-{name}"), "generation": 1},
        "spec": spec,
    }))
    .expect("a valid Thing");
    thing.meta_mut().resource_version = Some("1".into());
    thing
}

/// `thing` with the operator's finalizer in place (past the first reconcile).
pub fn finalized(mut thing: Thing) -> Thing {
    thing.meta_mut().finalizers = Some(vec![crate::api::FINALIZER.to_string()]);
    thing
}
