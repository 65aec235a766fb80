//! What an Observer task hands one delivery to: the sink, the retry policy and the dead-letter
//! destination. Each delivery runs as its own tokio task, so a delivery waiting on a slow
//! destination or backing off between tries holds up nothing but its Thing's lane.

use std::sync::Arc;

use rand::Rng;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{
    DeliveryError,
    cloud_event::{cloud_event, dead_letter_event},
    filter::Memory,
    provenance::Provenance,
    retry::RetrySchedule,
    sink::Sink,
};
use crate::{
    api::{ThingUpdate, observer::StateSection},
    metrics::Metrics,
};

/// An update that passed the filter, on its way out.
pub struct Delivery {
    pub update: Arc<ThingUpdate>,
    pub section: StateSection,
    pub data: Value,
    pub provenance: Provenance,
    /// The Thing's filter memory once this update counts as forwarded.
    pub memory: Memory,
}

/// How a delivery ended.
pub struct Delivered {
    pub thing: String,
    pub memory: Memory,
    pub result: Result<(), DeliveryError>,
}

/// Shared by every delivery of one Observer task.
#[derive(Clone)]
pub struct Outbox {
    pub sink: Arc<Sink>,
    pub dead_letter: Option<Arc<Sink>>,
    pub retry: RetrySchedule,
    pub metrics: Arc<Metrics>,
    /// The task's: a cancelled task's deliveries stop backing off.
    pub cancel: CancellationToken,
}

impl Outbox {
    /// Delivers with the tries the retry policy allows, then, when every try failed, hands the
    /// update to the dead-letter destination with the reason.
    pub async fn send(self, delivery: Delivery) -> Delivered {
        let result = self.deliver_with_retries(&delivery).await;
        if let Err(e) = &result {
            self.send_to_dead_letter(&delivery, e).await;
        }
        Delivered {
            thing: delivery.update.name.clone(),
            memory: delivery.memory,
            result,
        }
    }

    /// Backs off with jitter between tries, so that many Things (or Observers) of one failing
    /// sink do not retry in step.
    async fn deliver_with_retries(&self, d: &Delivery) -> Result<(), DeliveryError> {
        let started = tokio::time::Instant::now();
        let mut attempt = 1;
        loop {
            match self
                .sink
                .deliver(&d.update, d.section, &d.data, &d.provenance)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.retryable && self.retry.may_retry(attempt, started.elapsed()) => {
                    let delay = self.retry.backoff(attempt);
                    let jittered =
                        delay / 2 + rand::rng().random_range(std::time::Duration::ZERO..=delay / 2);
                    tokio::select! {
                        _ = tokio::time::sleep(jittered) => {}
                        _ = self.cancel.cancelled() => return Err(e),
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn send_to_dead_letter(&self, d: &Delivery, error: &DeliveryError) {
        let Some(dead_letter) = &self.dead_letter else {
            return;
        };
        let event = dead_letter_event(
            &cloud_event(&d.update, d.section, &d.data, &d.provenance),
            &error.message,
        );
        match dead_letter.deliver_event(&event).await {
            Ok(()) => self.metrics.count_event("Observer", "dead_lettered"),
            Err(e) => {
                tracing::warn!(error = %e, "dead-letter destination failed too");
                self.metrics.count_event("Observer", "dead_letter_failed");
            }
        }
    }
}
