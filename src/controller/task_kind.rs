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

use super::{Context, instrument::instrumented, kube_events, object_key, status::apply_if_changed};
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

/// A task kind's status type: the fields [`StatusCore`] mirrors.
pub trait HasStatusCore {
    fn observed_generation(&self) -> Option<i64>;
    fn conditions(&self) -> &Conditions;
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
    fn validate(&self, ctx: &Context) -> Result<(), InvalidSpec>;
    /// The kind's status, as far as the shared reconcile reads it.
    fn core_status(&self) -> Option<&dyn HasStatusCore>;

    /// Only the two fields the reconcile owns: the task's counters and memory stay put.
    fn status_core(&self) -> StatusCore {
        self.core_status()
            .map(|s| StatusCore {
                observed_generation: s.observed_generation(),
                conditions: s.conditions().clone(),
            })
            .unwrap_or_default()
    }
    /// Starts (or keeps) the task for a valid spec; returns the Ready condition.
    async fn start(&self, ctx: &Context) -> Condition;
    /// Stops the task (invalid spec or deletion).
    fn stop(&self, ctx: &Context);
    /// When to look again while Ready is True; `None`: only on a change (the default).
    fn requeue_when_ready(&self, _ctx: &Context) -> Option<std::time::Duration> {
        None
    }
}

pub async fn reconcile<K: TaskKind>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    instrumented(obj, ctx, |obj, ctx| async move {
        let ns = obj
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
        finalizer(&api, FINALIZER, obj, |event| async {
            match event {
                FinalizerEvent::Apply(obj) => apply(obj, &ctx, &api).await,
                FinalizerEvent::Cleanup(obj) => {
                    obj.stop(&ctx);
                    ctx.status_memory.forget(&object_key(obj.as_ref()));
                    ctx.valid_specs.forget(obj.uid().as_deref());
                    Ok(Action::await_change())
                }
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    })
    .await
}

async fn apply<K: TaskKind>(obj: Arc<K>, ctx: &Context, api: &Api<K>) -> Result<Action> {
    let old = obj.status_core();
    let mut status = old.clone();
    let generation = obj.meta().generation;
    let validated = ctx
        .valid_specs
        .check(obj.uid().as_deref(), obj.meta().generation, || {
            obj.validate(ctx)
        });
    let ready = match validated {
        Ok(()) => obj.start(ctx).await,
        Err(invalid) => {
            tracing::info!(problems = %invalid, "invalid spec");
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
    if !notice.warning
        && let Some(after) = obj.requeue_when_ready(ctx)
    {
        return Ok(Action::requeue(after));
    }
    Ok(Action::await_change())
}
