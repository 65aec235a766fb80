//! The Observer reconciler: validation and conditions here; the forwarding runs in an
//! [`ObserverManager`](crate::forwarding::ObserverManager) task.

use std::sync::Arc;

use kube::{ResourceExt, runtime::controller::Action};

use super::{
    Context,
    broker_connection::connections_not_ready,
    task_kind::{self, HasStatusCore},
};
use crate::{
    api::{
        Condition, ConditionStatus, Observer, ObserverStatus,
        conditions::{Conditions, types},
        validation::{InvalidSpec, validate_observer},
    },
    error::Result,
    forwarding::broker_connections::User,
};

#[async_trait::async_trait]
impl task_kind::TaskKind for Observer {
    fn validate(&self, ctx: &Context) -> Result<(), InvalidSpec> {
        validate_observer(self, &ctx.config.topics)?;
        // A URL whose literal address is refused never becomes a task; names are checked again
        // at every connect. The same for the dead-letter destination.
        let urls = [
            ("sink.http.url", self.spec.sink.http.as_ref()),
            (
                "deadLetter.http.url",
                self.spec.dead_letter.as_ref().and_then(|d| d.http.as_ref()),
            ),
        ];
        for (field, http) in urls {
            if let Some(Ok(url)) = http.map(|h| url::Url::parse(&h.url)) {
                ctx.config.egress.check_url(&url).map_err(|e| InvalidSpec {
                    problems: vec![format!("{field}: {e}")],
                })?;
            }
        }
        Ok(())
    }

    fn core_status(&self) -> Option<&dyn HasStatusCore> {
        self.status.as_ref().map(|s| s as &dyn HasStatusCore)
    }

    async fn start(&self, ctx: &Context) -> Condition {
        let (namespace, name) = (self.namespace().unwrap_or_default(), self.name_any());
        let connections = self.broker_connections();
        // Told when a connection it names changes, so Ready follows it.
        ctx.connections
            .set_uses(&namespace, User::Observer(name.clone()), &connections);
        let on_operator_broker = self
            .spec
            .sink
            .mqtt
            .as_ref()
            .is_some_and(|m| m.connection.is_none());
        if on_operator_broker && !ctx.observers.has_mqtt() {
            self.stop(ctx);
            return Condition::new(
                types::READY,
                ConditionStatus::False,
                "SinkNotConfigured",
                "sink.mqtt needs the operator's MQTT broker (--mqtt-url), which is not configured",
            );
        }
        ctx.observers.ensure(self);
        if let Some(refusal) = ctx.observers.refusal(&namespace, &name) {
            // The task keeps running: a later delivery that succeeds (the name resolves
            // elsewhere) clears this.
            return Condition::new(
                types::READY,
                ConditionStatus::False,
                "DestinationRefused",
                refusal,
            );
        }
        // The task runs meanwhile: it delivers once the connection is up.
        if let Some(not_ready) = connections_not_ready(ctx, &namespace, &connections) {
            return not_ready;
        }
        Condition::new(
            types::READY,
            ConditionStatus::True,
            "Running",
            "forwarding task running",
        )
    }

    fn stop(&self, ctx: &Context) {
        let (namespace, name) = (self.namespace().unwrap_or_default(), self.name_any());
        ctx.connections
            .set_uses(&namespace, User::Observer(name.clone()), &[]);
        ctx.observers.stop(&namespace, &name);
    }
}

trait NamesConnections {
    /// The BrokerConnections the spec names (sink and dead-letter destination).
    fn broker_connections(&self) -> Vec<&str>;
}

impl NamesConnections for Observer {
    fn broker_connections(&self) -> Vec<&str> {
        let sink = self.spec.sink.mqtt.as_ref();
        let dead_letter = self.spec.dead_letter.as_ref().and_then(|d| d.mqtt.as_ref());
        let mut names: Vec<&str> = [sink, dead_letter]
            .into_iter()
            .flatten()
            .filter_map(|m| m.connection.as_deref())
            .collect();
        names.dedup();
        names
    }
}

pub async fn reconcile(obj: Arc<Observer>, ctx: Arc<Context>) -> Result<Action> {
    task_kind::reconcile(obj, ctx).await
}

impl HasStatusCore for ObserverStatus {
    fn observed_generation(&self) -> Option<i64> {
        self.observed_generation
    }

    fn conditions(&self) -> &Conditions {
        &self.conditions
    }
}
