//! What happens around every reconcile, whatever the kind: one tracing span naming the object,
//! the duration and outcome metrics, the backoff reset on success, and the error policy that
//! counts a failure by kind and reason and retries with per-object backoff.

use std::{future::Future, sync::Arc, time::Instant};

use kube::{Resource, ResourceExt, runtime::controller::Action};
use tracing::Instrument;

use super::{Context, object_key};
use crate::error::{Error, Result};

/// Runs `reconcile` for `obj` inside a span carrying the object (every log line of the
/// reconcile names it; nothing formats `ns/name` by hand) and records its duration and outcome.
pub async fn instrumented<K, Fut>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    reconcile: impl FnOnce(Arc<K>, Arc<Context>) -> Fut,
) -> Result<Action>
where
    K: Resource<DynamicType = ()>,
    Fut: Future<Output = Result<Action>>,
{
    let kind = K::kind(&());
    let span = tracing::info_span!(
        "reconcile",
        kind = %kind,
        namespace = obj.namespace().unwrap_or_default(),
        name = obj.name_any(),
        generation = obj.meta().generation,
    );
    let key = object_key(obj.as_ref());
    let started = Instant::now();
    let result = reconcile(obj, ctx.clone()).instrument(span).await;
    ctx.metrics
        .observe_reconcile(&kind, started.elapsed().as_secs_f64());
    ctx.metrics
        .count_reconcile(&kind, if result.is_ok() { "ok" } else { "error" });
    if result.is_ok() {
        ctx.backoff.reset(&key);
    }
    result
}

/// Counts the failure by kind and reason and retries the object with exponential backoff and
/// jitter.
pub fn error_policy<K>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&());
    ctx.metrics.count_failure(&kind, error.reason());
    let delay = ctx.backoff.next_delay(&object_key(obj.as_ref()));
    tracing::warn!(
        kind = %kind,
        namespace = obj.namespace().unwrap_or_default(),
        name = obj.name_any(),
        reason = error.reason(),
        error = %error,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}
