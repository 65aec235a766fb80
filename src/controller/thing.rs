//! The Thing reconciler: validation, finalizer (added in the reconcile that provisions),
//! backend work through the provider, conditions, status and Events.

use std::sync::Arc;

use chrono::Utc;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        finalizer::{Event as FinalizerEvent, finalizer},
    },
};

use super::{
    Context,
    instrument::instrumented,
    kube_events, object_key,
    ready::{next_step, ready_condition, ready_event},
    status::apply_if_changed,
    write_budget::only_reported_changed,
};
use crate::{
    api::{
        Condition, ConditionStatus, FINALIZER, Thing, ThingStatus,
        conditions::{reasons, types},
        thing::{Broker, DeletionPolicy, summarize},
        validation::{InvalidSpec, validate_thing},
    },
    credentials::DeviceSecret,
    error::{Error, KubeContext, Result},
    provider::{DeviceOutcome, DeviceRequest, Notice},
};

const KIND: &str = "Thing";
/// Width of the REPORTED printer column.
const SUMMARY_CHARS: usize = 40;

pub async fn reconcile(thing: Arc<Thing>, ctx: Arc<Context>) -> Result<Action> {
    instrumented(thing, ctx, |thing, ctx| async move {
        let ns = thing
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let api: Api<Thing> = Api::namespaced(ctx.client.clone(), &ns);
        let thing = with_finalizer(&api, thing).await?;
        finalizer(&api, FINALIZER, thing, |event| async {
            match event {
                FinalizerEvent::Apply(thing) => apply(thing, &ctx, &api).await,
                FinalizerEvent::Cleanup(thing) => cleanup(thing, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    })
    .await
}

/// Adds the finalizer, if missing, and hands back the object as stored with it, so that the
/// same reconcile goes on to provision (kube's `finalizer` helper stops after adding it, which
/// costs every new Thing one more reconcile and a trip through the queue). Crash safety is
/// the same: the patch is durable before any backend call, and a failed patch fails the
/// reconcile before one. The object's `resourceVersion` in the patch makes the API server
/// refuse it (409) when another writer changed the finalizers meanwhile, as the helper's
/// `test` operation does; the retry starts from the fresh object.
async fn with_finalizer(api: &Api<Thing>, thing: Arc<Thing>) -> Result<Arc<Thing>> {
    let has_it = thing.finalizers().iter().any(|f| f == FINALIZER);
    if has_it || thing.meta().deletion_timestamp.is_some() {
        return Ok(thing);
    }
    let mut finalizers = thing.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": thing.resource_version(),
        }
    });
    let name = thing.name_any();
    let stored = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .kube_context(|| format!("adding the finalizer to Thing {name}"))?;
    Ok(Arc::new(stored))
}

/// Rules that need the recorded status, not just the spec.
fn check_against_status(thing: &Thing) -> Result<(), InvalidSpec> {
    let recorded = thing
        .status
        .as_ref()
        .and_then(|s| s.device.as_ref())
        .and_then(|d| d.broker);
    match recorded {
        Some(b) if b != thing.spec.broker => Err(InvalidSpec {
            problems: vec![format!(
                "broker is immutable: this Thing was provisioned in {b}, the spec now says {}",
                thing.spec.broker
            )],
        }),
        _ => Ok(()),
    }
}

fn device_request<'a>(
    thing: &'a Thing,
    ctx: &Context,
    ns: &'a str,
    name: &'a str,
) -> DeviceRequest<'a> {
    let backend_name = thing
        .spec
        .backend_name_in(ctx.config.cluster_id.as_deref(), ns, name);
    let secret_name = thing.spec.secret_name(name);
    DeviceRequest {
        thing,
        namespace: ns,
        name,
        backend_name,
        secret: DeviceSecret::for_thing(ctx.client.clone(), thing, ns, secret_name),
    }
}

fn stamp_generation(status: &mut ThingStatus, generation: Option<i64>) {
    status.observed_generation = generation;
    status.conditions.stamp_generation(generation);
}

async fn write_and_announce(
    thing: &Thing,
    ctx: &Context,
    api: &Api<Thing>,
    old: &ThingStatus,
    new: &ThingStatus,
    notices: &[Notice],
) -> Result<()> {
    let changed = apply_if_changed(api, thing, old, new, &ctx.metrics, &ctx.status_memory).await?;
    let reference = thing.object_ref(&());
    if changed && let Some(notice) = ready_event(old, new) {
        kube_events::publish(ctx, KIND, &reference, &notice).await;
    }
    for notice in notices {
        kube_events::publish(ctx, KIND, &reference, notice).await;
    }
    Ok(())
}

async fn apply(thing: Arc<Thing>, ctx: &Context, api: &Api<Thing>) -> Result<Action> {
    let ns = thing
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = thing.name_any();
    // A reconcile queued by our own last write can read the object from a cache that has not
    // seen that write: start from what was written.
    let old = ctx
        .status_memory
        .unseen_own_write(
            &object_key(thing.as_ref()),
            thing
                .metadata
                .resource_version
                .as_deref()
                .unwrap_or_default(),
        )
        .unwrap_or_else(|| thing.status.clone().unwrap_or_default());
    let mut status = old.clone();
    let now = Utc::now();
    let generation = thing.metadata.generation;

    if let Err(invalid) = ctx
        .valid_specs
        .check(thing.uid().as_deref(), generation, || {
            validate_thing(&thing, &ctx.config.limits)
        })
        .and_then(|()| check_against_status(&thing))
    {
        tracing::info!(problems = %invalid, "invalid spec");
        status.conditions.set(
            Condition::new(
                types::READY,
                ConditionStatus::False,
                reasons::INVALID_SPEC,
                invalid.to_string(),
            ),
            now,
        );
        stamp_generation(&mut status, generation);
        write_and_announce(&thing, ctx, api, &old, &status, &[]).await?;
        // Nothing will change until the spec does.
        return Ok(Action::await_change());
    }

    let provider = match ctx.providers.get(thing.spec.broker) {
        Ok(p) => p,
        Err(e) => {
            let message = format!("{e}; configured: {:?}", ctx.providers.brokers());
            status.conditions.set(
                Condition::new(
                    types::PROVISIONED,
                    ConditionStatus::False,
                    e.reason(),
                    message,
                ),
                now,
            );
            status.conditions.set(ready_condition(&status), now);
            stamp_generation(&mut status, generation);
            write_and_announce(&thing, ctx, api, &old, &status, &[]).await?;
            ctx.feed.thing_state(&thing, &status);
            // Configuration only changes with a restart, which reconciles everything anyway.
            return Ok(Action::await_change());
        }
    };

    let req = device_request(&thing, ctx, &ns, &name);
    let mut outcome = DeviceOutcome::default();
    let result = provider.reconcile(&req, &mut status, &mut outcome).await;
    if let Err(e) = &result {
        let condition = Condition::new(
            types::READY,
            ConditionStatus::False,
            e.reason(),
            e.to_string(),
        );
        status.conditions.set(condition, now);
    } else {
        status.conditions.set(ready_condition(&status), now);
    }
    status.reported_summary = status
        .reported
        .as_ref()
        .map(|r| summarize(r, SUMMARY_CHARS));
    stamp_generation(&mut status, generation);
    // Reported state alone is written only with a grant of the fleet-wide budget; without one
    // nothing is written now and the Thing queues for a grant (the granted reconcile reads the
    // state afresh). Any other change is written at once, reported state with it.
    if let Some(budget) = &ctx.write_budget
        && only_reported_changed(&old, &status)
        && !budget.take_grant(&ns, &name)
    {
        budget.request(&ns, &name);
        status = old.clone();
    }
    // The status is written even after an error: identifiers recorded so far must survive.
    write_and_announce(&thing, ctx, api, &old, &status, &outcome.notices).await?;
    // Observers' state bus and the REST message broker's retained state topic (any backend).
    // Non-blocking and de-duplicated.
    ctx.feed.thing_state(&thing, &status);

    next_step(result, outcome.requeue_after, ctx.config.resync_interval).into_action()
}

async fn cleanup(thing: Arc<Thing>, ctx: &Context) -> Result<Action> {
    let ns = thing
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = thing.name_any();
    ctx.feed.thing_removed(&ns, &name);
    ctx.status_memory.forget(&object_key(thing.as_ref()));
    ctx.valid_specs.forget(thing.uid().as_deref());
    let status = thing.status.clone().unwrap_or_default();
    let reference = thing.object_ref(&());
    let recorded = status.device.is_some();
    if thing.spec.deletion_policy == DeletionPolicy::Orphan {
        if let Ok(provider) = ctx.providers.get(broker_of(&thing, &status)) {
            provider.release(&device_request(&thing, ctx, &ns, &name), &status);
        }
        if recorded {
            let notice =
                Notice::normal("Orphaned", "deletionPolicy Orphan: backend resources kept");
            kube_events::publish(ctx, KIND, &reference, &notice).await;
        }
        return Ok(Action::await_change());
    }
    let provider = match ctx.providers.get(broker_of(&thing, &status)) {
        Ok(p) => p,
        // Nothing recorded and no backend to ask: nothing was ever created.
        Err(_) if !recorded => return Ok(Action::await_change()),
        Err(e) => return Err(Error::Provider(e)),
    };
    // Even with nothing recorded in status the backend may hold resources: the operator can
    // crash after creating them and before its first status write. The provider's cleanup
    // works from the derived names and the Secret and tolerates what does not exist. Only a
    // spec that never passed validation is known to have created nothing.
    if !recorded && validate_thing(&thing, &ctx.config.limits).is_err() {
        return Ok(Action::await_change());
    }
    let req = device_request(&thing, ctx, &ns, &name);
    let mut outcome = DeviceOutcome::default();
    let result = provider.cleanup(&req, &status, &mut outcome).await;
    for notice in &outcome.notices {
        kube_events::publish(ctx, KIND, &reference, notice).await;
    }
    if let Err(e) = result {
        let notice = Notice::warning("CleanupFailed", e.to_string());
        kube_events::publish(ctx, KIND, &reference, &notice).await;
        return Err(Error::Provider(e));
    }
    kube_events::publish(
        ctx,
        KIND,
        &reference,
        &Notice::normal("Deprovisioned", "backend resources removed"),
    )
    .await;
    Ok(Action::await_change())
}

/// The backend that holds the Thing's device: the one recorded, else the spec's.
fn broker_of(thing: &Thing, status: &ThingStatus) -> Broker {
    status
        .device
        .as_ref()
        .and_then(|d| d.broker)
        .unwrap_or(thing.spec.broker)
}

#[cfg(test)]
#[path = "thing_tests.rs"]
mod tests;
