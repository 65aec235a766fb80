//! Publishing Events. A failed Event never fails a reconcile: it is logged and counted.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};

use super::Context;
use crate::provider::Notice;

/// Event notes are capped by the API at 1 KiB.
const MAX_NOTE: usize = 1000;

pub async fn publish(ctx: &Context, kind: &str, reference: &ObjectReference, notice: &Notice) {
    let mut note = notice.message.clone();
    if note.len() > MAX_NOTE {
        let mut cut = MAX_NOTE;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let event = Event {
        type_: if notice.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: notice.reason.clone(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    match ctx.recorder.publish(&event, reference).await {
        Ok(()) => ctx.metrics.count_event(kind, &notice.reason),
        Err(e) => {
            tracing::warn!(kind, reason = %notice.reason, error = %e, "could not publish event")
        }
    }
}
