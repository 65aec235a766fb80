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
