//! Shared reconcile for kinds whose work runs in in-memory tasks (Observer, Subscriber): the
//! finalizer, spec validation, starting/stopping the task, the `Ready` condition and its Events.
//!
//! The reconcile owns only `conditions` and `observedGeneration` of the status (server-side
//! apply); the task owns its counters (merge patches). Neither overwrites the other.

use std::sync::Arc;

use chrono::Utc;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        controller::Action,
        finalizer::{Event as FinalizerEvent, finalizer},
    },
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{Context, kube_events, object_key, status::apply_if_changed};
use crate::{
    api::{
        Condition, ConditionStatus, FINALIZER,
        conditions::{Conditions, reasons, types},
        validation::InvalidSpec,
    },
    error::{Error, Result},
    provider::Notice,
};

/// The part of a task kind's status the reconcile writes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusCore {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub conditions: Conditions,
}

/// What the shared reconcile needs to know about a kind.
#[async_trait::async_trait]
pub trait TaskKind:
    Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn validate(&self) -> Result<(), InvalidSpec>;
    fn status_core(&self) -> StatusCore;
    /// Starts (or keeps) the task for a valid spec; returns the Ready condition.
    async fn start(&self, ctx: &Context) -> Condition;
    /// Stops the task (invalid spec or deletion).
    fn stop(&self, ctx: &Context);
}

pub async fn reconcile<K: TaskKind>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let ns = obj
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let kind = K::kind(&()).into_owned();
    let key = object_key(obj.as_ref());
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            FinalizerEvent::Apply(obj) => apply(obj, &ctx, &api).await,
            FinalizerEvent::Cleanup(obj) => {
                obj.stop(&ctx);
                ctx.status_memory.forget(&object_key(obj.as_ref()));
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .count_reconcile(&kind, if result.is_ok() { "ok" } else { "error" });
    if result.is_ok() {
        ctx.backoff.reset(&key);
    }
    result
}

async fn apply<K: TaskKind>(obj: Arc<K>, ctx: &Context, api: &Api<K>) -> Result<Action> {
    let old = obj.status_core();
    let mut status = old.clone();
    let generation = obj.meta().generation;
    let ready = match obj.validate() {
        Ok(()) => obj.start(ctx).await,
        Err(invalid) => {
            tracing::info!(object = %object_key(obj.as_ref()), problems = %invalid, "invalid spec");
            obj.stop(ctx);
            Condition::new(
                types::READY,
                ConditionStatus::False,
                reasons::INVALID_SPEC,
                invalid.to_string(),
            )
        }
    };
    let notice = Notice::for_ready(&ready);
    status.conditions.set(ready, Utc::now());
    status.conditions.stamp_generation(generation);
    status.observed_generation = generation;
    let retry = notice.warning && notice.reason != reasons::INVALID_SPEC;
    if apply_if_changed(
        api,
        obj.as_ref(),
        &old,
        &status,
        &ctx.metrics,
        &ctx.status_memory,
    )
    .await?
    {
        kube_events::publish(ctx, &K::kind(&()), &obj.object_ref(&()), &notice).await;
    }
    if retry {
        // E.g. a referenced Secret that does not exist yet: look again later, slowly.
        return Ok(Action::requeue(std::time::Duration::from_secs(60)));
    }
    Ok(Action::await_change())
}
