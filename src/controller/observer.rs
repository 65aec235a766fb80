//! The Observer reconciler: validation and conditions here; the forwarding runs in an
//! [`ObserverManager`](crate::forwarding::ObserverManager) task.

use std::sync::Arc;

use kube::{ResourceExt, runtime::controller::Action};

use super::{
    Context,
    task_kind::{self, HasStatusCore},
};
use crate::{
    api::{
        Condition, ConditionStatus, Observer, ObserverStatus,
        conditions::{Conditions, types},
        validation::{InvalidSpec, validate_observer},
    },
    error::Result,
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
        if self.spec.sink.mqtt.is_some() && !ctx.observers.has_mqtt() {
            self.stop(ctx);
            return Condition::new(
                types::READY,
                ConditionStatus::False,
                "SinkNotConfigured",
                "sink.mqtt needs the operator's MQTT broker (--mqtt-url), which is not configured",
            );
        }
        ctx.observers.ensure(self);
        let (namespace, name) = (self.namespace().unwrap_or_default(), self.name_any());
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
        Condition::new(
            types::READY,
            ConditionStatus::True,
            "Running",
            "forwarding task running",
        )
    }

    fn stop(&self, ctx: &Context) {
        ctx.observers
            .stop(&self.namespace().unwrap_or_default(), &self.name_any());
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
