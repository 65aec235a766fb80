//! The BrokerConnection reconciler: validation, the session's settings (Secrets, egress) and
//! its `Ready` condition here; the session itself runs in
//! [`BrokerConnections`](crate::forwarding::BrokerConnections).
//!
//! Ready follows the session: the session asks for a reconcile whenever its state changes, so a
//! broker that goes away turns Ready False (with an Event) and back. While Ready, the object is
//! looked at again every resync interval, which picks up a rotated Secret (a different login
//! or certificate restarts the session).

use std::sync::Arc;

use kube::{ResourceExt, runtime::controller::Action};

use super::{
    Context,
    task_kind::{self, HasStatusCore},
};
use crate::{
    api::{
        BrokerConnection, BrokerConnectionStatus, Condition, ConditionStatus,
        conditions::{Conditions, types},
        validation::{InvalidSpec, validate_broker_connection},
    },
    error::Result,
    forwarding::{
        broker_connections::{SessionState, reasons},
        connection_settings::session_settings,
    },
};

#[async_trait::async_trait]
impl task_kind::TaskKind for BrokerConnection {
    fn validate(&self, _ctx: &Context) -> Result<(), InvalidSpec> {
        // Where the URL points is the egress policy's question, asked in `start` for literal
        // addresses and names alike (reason DestinationRefused).
        validate_broker_connection(self)
    }

    fn core_status(&self) -> Option<&dyn HasStatusCore> {
        self.status.as_ref().map(|s| s as &dyn HasStatusCore)
    }

    async fn start(&self, ctx: &Context) -> Condition {
        let (namespace, name) = (self.namespace().unwrap_or_default(), self.name_any());
        let claim = ctx.connections.claims().check(self).await;
        if claim.held_by_older {
            // Connecting would take the older one's session (and what the broker kept in it).
            // Looked at again while not Ready: connects once the pair is free.
            ctx.connections.stop(&namespace, &name);
            return Condition::new(
                types::READY,
                ConditionStatus::False,
                reasons::CLIENT_ID_IN_USE,
                format!(
                    "client id {} is already used on this broker by an older BrokerConnection of \
                     this cluster; set spec.clientId to another",
                    self.client_id(&namespace, &name)
                ),
            );
        }
        // A newer one running with the same pair (this one's spec changed) stops now.
        for newer in claim.newer {
            ctx.connections.request_reconcile(newer);
        }
        let settings = match session_settings(
            &ctx.client,
            &ctx.config.egress,
            self,
            &namespace,
            &name,
        )
        .await
        {
            Ok(settings) => settings,
            // A name that does not resolve right now does not end a session that runs (a DNS
            // hiccup at a resync); its own state says how it is doing.
            Err(e)
                if e.reason == reasons::CONNECT_FAILED
                    && let Some(state) = ctx.connections.state(&namespace, &name) =>
            {
                tracing::info!(error = %e, "keeping the running session");
                return ready_of(&state, &self.spec.url);
            }
            Err(e) => {
                // Nothing to connect with (or to, or allowed to): no session, until the next
                // reconcile finds what was missing.
                ctx.connections.stop(&namespace, &name);
                return Condition::new(types::READY, ConditionStatus::False, e.reason, e.message);
            }
        };
        let endpoint = settings.address.endpoint();
        let state = ctx.connections.ensure(&namespace, &name, settings);
        ready_of(&state, &endpoint)
    }

    fn stop(&self, ctx: &Context) {
        ctx.connections
            .stop(&self.namespace().unwrap_or_default(), &self.name_any());
        // A newer BrokerConnection refused for this one's client id may connect now.
        for waiting in ctx.connections.claims().waiting_behind(self) {
            ctx.connections.request_reconcile(waiting);
        }
    }

    fn requeue_when_ready(&self, ctx: &Context) -> Option<std::time::Duration> {
        Some(ctx.config.resync_interval)
    }
}

pub async fn reconcile(obj: Arc<BrokerConnection>, ctx: Arc<Context>) -> Result<Action> {
    task_kind::reconcile(obj, ctx).await
}

impl HasStatusCore for BrokerConnectionStatus {
    fn observed_generation(&self) -> Option<i64> {
        self.observed_generation
    }

    fn conditions(&self) -> &Conditions {
        &self.conditions
    }
}

/// The Ready condition of a BrokerConnection whose session (to `endpoint`) is in `state`.
fn ready_of(state: &SessionState, endpoint: &str) -> Condition {
    match state {
        SessionState::Connected => Condition::new(
            types::READY,
            ConditionStatus::True,
            reasons::CONNECTED,
            format!("connected to {endpoint}"),
        ),
        state => Condition::new(
            types::READY,
            ConditionStatus::False,
            state.reason(),
            format!("{endpoint}: {}", state.message()),
        ),
    }
}

/// The Ready condition of an Observer or Subscriber that names `connections`: `None` when all
/// are connected, otherwise `ConnectionNotReady` naming the first that is not.
pub fn connections_not_ready(
    ctx: &Context,
    namespace: &str,
    connections: &[&str],
) -> Option<Condition> {
    connections.iter().find_map(|connection| {
        let why = match ctx.connections.state(namespace, connection) {
            Some(SessionState::Connected) => return None,
            Some(state) => format!("{}: {}", state.reason(), state.message()),
            None => "no session (missing, invalid, or its Secrets or destination refused)".into(),
        };
        Some(Condition::new(
            types::READY,
            ConditionStatus::False,
            reasons::CONNECTION_NOT_READY,
            format!("BrokerConnection {connection} is not connected: {why}"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kube::runtime::reflector::ObjectRef;
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        api::thing::Broker,
        controller::{
            ControllerConfig,
            fixtures::{self, ApiServer},
        },
        egress::EgressPolicy,
        provider::debug::DebugProvider,
    };

    const PATH: &str =
        "/apis/iot.thing-operator.dev/v1alpha1/namespaces/team-a/brokerconnections/plant";
    const SECRET: &str = "/api/v1/namespaces/team-a/secrets/login";

    fn setup() -> (Arc<Context>, ApiServer, u16) {
        // A loopback port nobody listens on: connecting is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let config = ControllerConfig {
            egress: Arc::new(EgressPolicy {
                allowed: vec!["127.0.0.0/8".parse().expect("cidr")],
                ..EgressPolicy::default()
            }),
            ..ControllerConfig::default()
        };
        let (ctx, server) =
            fixtures::context_with(Arc::new(DebugProvider::new(Broker::Mosquitto)), config);
        server.seed_at(
            PATH,
            json!({
                "apiVersion": "iot.thing-operator.dev/v1alpha1", "kind": "BrokerConnection",
                "metadata": {"name": "plant", "namespace": "team-a", "uid": "uid-plant",
                             "generation": 1, "resourceVersion": "1",
                             "finalizers": [crate::api::FINALIZER]},
                "spec": {"url": format!("mqtt://127.0.0.1:{port}"),
                         "auth": {"usernamePasswordSecret": "login"}},
            }),
        );
        (ctx, server, port)
    }

    async fn reconcile_stored(ctx: &Arc<Context>, server: &ApiServer) {
        let stored: BrokerConnection =
            serde_json::from_value(server.object_at(PATH).expect("stored")).expect("decodes");
        reconcile(Arc::new(stored), ctx.clone())
            .await
            .expect("reconciles");
    }

    fn ready(server: &ApiServer) -> (String, String, String) {
        let stored = server.object_at(PATH).expect("stored");
        let ready = stored["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .unwrap_or(Value::Null);
        let text = |k: &str| ready[k].as_str().unwrap_or_default().to_string();
        (text("status"), text("reason"), text("message"))
    }

    fn events(server: &ApiServer) -> Vec<(String, String)> {
        server.requests().iter().filter_map(|r| r.event()).collect()
    }

    #[tokio::test]
    async fn the_condition_follows_secrets_and_the_session_and_deletion_ends_it() {
        let (ctx, server, port) = setup();
        let mut triggers = ctx.connections.take_triggers().expect("triggers");

        // No Secret: SecretMissing, a Warning Event, no session.
        reconcile_stored(&ctx, &server).await;
        assert_eq!(ready(&server).1, reasons::SECRET_MISSING);
        assert_eq!(
            events(&server),
            [(reasons::SECRET_MISSING.to_string(), "Warning".to_string())]
        );
        assert!(ctx.connections.state("team-a", "plant").is_none());
        // Idempotent: the same again writes nothing and publishes nothing.
        server.clear();
        reconcile_stored(&ctx, &server).await;
        assert!(
            server
                .requests()
                .iter()
                .all(|r| !r.is_status_write() && !r.is_event())
        );

        // A Secret that did not opt in is not sent: SecretInvalid.
        let mut secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "login", "namespace": "team-a"},
            "data": {"username": "dGVuYW50", "password": "czNjcjN0LXB3"},
        });
        server.seed_at(SECRET, secret.clone());
        reconcile_stored(&ctx, &server).await;
        let (_, reason, message) = ready(&server);
        assert_eq!(reason, reasons::SECRET_INVALID);
        assert!(!message.contains("s3cr3t-pw"), "{message}");

        // Opted in: a session starts; its refused connection reconciles the object again.
        secret["metadata"]["labels"] = json!({"iot.thing-operator.dev/broker-credentials": "true"});
        server.seed_at(SECRET, secret);
        reconcile_stored(&ctx, &server).await;
        assert_eq!(
            ready(&server),
            (
                "False".to_string(),
                reasons::CONNECTING.to_string(),
                format!("127.0.0.1:{port}: connecting")
            )
        );
        let asked = tokio::time::timeout(Duration::from_secs(10), triggers.connections.recv())
            .await
            .expect("the session's state change asks for a reconcile");
        assert_eq!(asked, Some(ObjectRef::new("plant").within("team-a")));
        reconcile_stored(&ctx, &server).await;
        let (status, reason, message) = ready(&server);
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", reasons::CONNECT_FAILED)
        );
        assert!(!message.contains("s3cr3t-pw"), "{message}");

        // Deleted: the session ends and the finalizer goes.
        let mut stored = server.object_at(PATH).expect("stored");
        stored["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        server.seed_at(PATH, stored);
        reconcile_stored(&ctx, &server).await;
        assert!(ctx.connections.state("team-a", "plant").is_none());
        assert_eq!(
            server.object_at(PATH).expect("stored")["metadata"]["finalizers"],
            json!([])
        );
    }
}
