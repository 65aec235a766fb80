//! The Subscriber reconciler: validation and conditions here; receiving runs in a
//! [`SubscriberManager`](crate::forwarding::SubscriberManager) task.

use std::sync::Arc;

use kube::{ResourceExt, runtime::controller::Action};

use super::{
    Context,
    broker_connection::connections_not_ready,
    task_kind::{self, HasStatusCore},
};
use crate::{
    api::{
        Condition, ConditionStatus, Subscriber, SubscriberStatus,
        conditions::{Conditions, types},
        validation::{InvalidSpec, validate_subscriber},
    },
    error::Result,
    forwarding::broker_connections::User,
};

#[async_trait::async_trait]
impl task_kind::TaskKind for Subscriber {
    fn validate(&self, ctx: &Context) -> Result<(), InvalidSpec> {
        validate_subscriber(self, &ctx.config.topics)
    }

    fn core_status(&self) -> Option<&dyn HasStatusCore> {
        self.status.as_ref().map(|s| s as &dyn HasStatusCore)
    }

    async fn start(&self, ctx: &Context) -> Condition {
        let (namespace, name) = (self.namespace().unwrap_or_default(), self.name_any());
        let mqtt = self.spec.source.mqtt.as_ref();
        let connections: Vec<&str> = mqtt
            .and_then(|m| m.connection.as_deref())
            .into_iter()
            .collect();
        // Told when the connection it names changes, so Ready follows it.
        ctx.connections
            .set_uses(&namespace, User::Subscriber(name.clone()), &connections);
        if mqtt.is_some() && connections.is_empty() && !ctx.subscribers.has_mqtt() {
            self.stop(ctx);
            return Condition::new(
                types::READY,
                ConditionStatus::False,
                "SourceNotConfigured",
                "source.mqtt needs the operator's MQTT broker (--mqtt-url), which is not configured",
            );
        }
        match ctx.subscribers.ensure(self).await {
            // Receiving starts once the connection is up (its session subscribes then).
            Ok(())
                if let Some(not_ready) = connections_not_ready(ctx, &namespace, &connections) =>
            {
                not_ready
            }
            Ok(()) => Condition::new(
                types::READY,
                ConditionStatus::True,
                "Running",
                "receiving task running",
            ),
            Err(message) => {
                Condition::new(types::READY, ConditionStatus::False, "SourceError", message)
            }
        }
    }

    fn stop(&self, ctx: &Context) {
        let (namespace, name) = (self.namespace().unwrap_or_default(), self.name_any());
        ctx.connections
            .set_uses(&namespace, User::Subscriber(name.clone()), &[]);
        ctx.subscribers.stop(&namespace, &name);
    }
}

pub async fn reconcile(obj: Arc<Subscriber>, ctx: Arc<Context>) -> Result<Action> {
    task_kind::reconcile(obj, ctx).await
}

impl HasStatusCore for SubscriberStatus {
    fn observed_generation(&self) -> Option<i64> {
        self.observed_generation
    }

    fn conditions(&self) -> &Conditions {
        &self.conditions
    }
}
