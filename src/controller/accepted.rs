//! Shared reconcile for kinds whose work runs in in-memory tasks (Observer, Subscriber): the
//! finalizer, spec validation, the `Ready` condition and its Events.

use std::sync::Arc;

use chrono::Utc;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        controller::Action,
        finalizer::{Event as FinalizerEvent, finalizer},
    },
};
use serde::{Serialize, de::DeserializeOwned};

use super::{Context, events, object_key, status::apply_if_changed};
use crate::{
    api::{
        Condition, ConditionStatus, FINALIZER,
        conditions::{Conditions, reasons, types},
        validation::InvalidSpec,
    },
    error::{Error, Result},
    provider::Notice,
};

/// What the shared reconcile needs to know about a kind.
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
    type Status: Default + Clone + PartialEq + Serialize + Send;
    fn validate(&self) -> Result<(), InvalidSpec>;
    fn current_status(&self) -> Self::Status;
    fn conditions_mut(status: &mut Self::Status) -> &mut Conditions;
    fn set_observed_generation(status: &mut Self::Status, generation: Option<i64>);
    /// The Ready condition for a valid spec.
    fn ready_condition(&self) -> Condition;
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
            // Nothing lives outside the process yet; the finalizer guarantees a later
            // implementation gets to stop its tasks and flush before the object goes.
            FinalizerEvent::Cleanup(_) => Ok(Action::await_change()),
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
    let old = obj.current_status();
    let mut status = old.clone();
    let generation = obj.meta().generation;
    let ready = match obj.validate() {
        Ok(()) => obj.ready_condition(),
        Err(invalid) => {
            tracing::info!(object = %object_key(obj.as_ref()), problems = %invalid, "invalid spec");
            Condition::new(
                types::READY,
                ConditionStatus::False,
                reasons::INVALID_SPEC,
                invalid.to_string(),
            )
        }
    };
    let notice = if ready.status == ConditionStatus::True {
        Notice::normal(&ready.reason, ready.message.clone())
    } else {
        Notice::warning(&ready.reason, ready.message.clone())
    };
    let conditions = K::conditions_mut(&mut status);
    conditions.set(ready, Utc::now());
    for c in conditions.0.iter_mut() {
        c.observed_generation = generation;
    }
    K::set_observed_generation(&mut status, generation);
    if apply_if_changed(api, &obj.name_any(), &old, &status, &ctx.metrics).await? {
        events::publish(ctx, &K::kind(&()), &obj.object_ref(&()), &notice).await;
    }
    Ok(Action::await_change())
}
