//! One task per Subscriber: takes the messages routed to its queue, checks them, coalesces the
//! accepted ones and writes them into the target Thing at most every [`WRITE_INTERVAL`], and
//! keeps its counters in the Subscriber's status (at most every [`STATUS_INTERVAL`]).
//!
//! Coalescing makes a telemetry storm cost at most one API write per interval per Subscriber
//! while the latest state always lands. A failed write keeps its messages (under anything
//! newer) and backs off, unless it can never succeed: then they are dropped and counted as
//! rejected, so a misconfigured target never becomes a retry loop.
//!
//! Senders are answered (HTTP) or acknowledged (MQTT) only after the write that holds their
//! message succeeded (see [`super::receipt`]). The broker lets only a few unacknowledged
//! messages be in flight to one session (Mosquitto: `max_inflight_messages`, 20 by default), so
//! when [`ACK_BATCH`] messages wait for their acknowledgement the write happens early, at most
//! every [`EARLY_WRITE_SPACING`]: throughput without an unbounded write rate.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    message::{DEFAULT_MAX_MESSAGE, Inbound, Rejection, add_to_pending, parse_message},
    receipt::Receipt,
    write::TargetWriter,
};
use crate::forwarding::provenance::{Provenance, ProvenanceBook};
use crate::forwarding::status_budget::TaskStatusBudget;
use crate::{
    api::{Subscriber, subscriber::SubscriberSpec},
    forwarding::{json::coalesce, tasks::write_task_status},
    metrics::Metrics,
};

/// Pending messages are written to the target at most this often.
const WRITE_INTERVAL: Duration = Duration::from_millis(500);
/// Counters go to the Subscriber's status at most this often.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// Longest wait between attempts of a failing write.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// This many senders waiting for their answer make the write happen before the interval ends.
const ACK_BATCH: usize = 16;
/// Early writes are at least this far apart.
const EARLY_WRITE_SPACING: Duration = Duration::from_millis(100);

pub struct SubscriberTask {
    namespace: String,
    name: String,
    spec: SubscriberSpec,
    api: Api<Subscriber>,
    target: TargetWriter,
    metrics: Arc<Metrics>,
    /// Turns for status writes, shared by every Observer and Subscriber task.
    status_budget: TaskStatusBudget,
    cancel: CancellationToken,
    received: i64,
    rejected: i64,
    last_received_time: Option<DateTime<Utc>>,
    last_error: Option<String>,
    /// Merged, not yet written messages.
    pending: Option<Value>,
    /// Whom to answer once `pending` is written.
    waiting: Vec<Receipt>,
    /// The longest chain of events among the pending messages (Observers' CloudEvents): what
    /// the write continues (see [`crate::forwarding::provenance`]).
    provenance: Option<Provenance>,
    book: ProvenanceBook,
    /// When the last write was attempted.
    last_write: tokio::time::Instant,
    /// Counters changed since the last status write.
    dirty: bool,
    /// While a failed write backs off: no write before this instant.
    retry_at: Option<tokio::time::Instant>,
    retry_delay: Duration,
}

impl SubscriberTask {
    /// The task of `subscriber`, counting on from the counters its status holds.
    pub fn new(
        subscriber: &Subscriber,
        target: TargetWriter,
        client: Client,
        book: ProvenanceBook,
        metrics: Arc<Metrics>,
        status_budget: TaskStatusBudget,
        cancel: CancellationToken,
    ) -> Self {
        let namespace = subscriber.namespace().unwrap_or_default();
        let status = subscriber.status.clone().unwrap_or_default();
        Self {
            api: Api::namespaced(client, &namespace),
            namespace,
            name: subscriber.name_any(),
            spec: subscriber.spec.clone(),
            target,
            metrics,
            status_budget,
            cancel,
            received: status.received.unwrap_or(0),
            rejected: status.rejected.unwrap_or(0),
            last_received_time: status.last_received_time,
            // Not carried over: the first status write of this task clears the previous one's.
            last_error: None,
            pending: None,
            waiting: Vec::new(),
            provenance: None,
            book,
            last_write: tokio::time::Instant::now(),
            dirty: false,
            retry_at: None,
            retry_delay: WRITE_INTERVAL,
        }
    }

    fn max_bytes(&self) -> usize {
        self.spec
            .max_message_bytes
            .map(|b| b as usize)
            .unwrap_or(DEFAULT_MAX_MESSAGE)
    }

    fn accept(&mut self, msg: Inbound) {
        self.last_received_time = Some(Utc::now());
        let parsed = match parse_message(&msg.payload, self.max_bytes()) {
            Ok(parsed) => parsed,
            Err(e) => return self.refuse(msg.receipt, e),
        };
        if let Some(chain) = &parsed.provenance {
            let target = self
                .book
                .place()
                .key(&self.namespace, &self.target.thing_name);
            match chain.into_thing(&target) {
                Ok(next) => {
                    if self.provenance.as_ref().is_none_or(|p| next.hops > p.hops) {
                        self.provenance = Some(next);
                    }
                }
                Err(stop) => {
                    // The graph settles here: handled (acknowledged), not written.
                    tracing::debug!(%stop, "event not written");
                    self.metrics.count_event("Subscriber", "dropped_loop");
                    msg.receipt.settle(Ok(()));
                    return;
                }
            }
        }
        add_to_pending(
            &mut self.pending,
            self.spec.target.path.as_deref(),
            parsed.doc,
        );
        self.received += 1;
        self.metrics.count_event("Subscriber", "received");
        self.dirty = true;
        // Answered once written.
        self.waiting.push(msg.receipt);
    }

    /// A message refused for good: counted, and its sender told (an MQTT message is
    /// acknowledged: redelivering it cannot change the verdict).
    fn refuse(&mut self, receipt: Receipt, e: Rejection) {
        self.rejected += 1;
        self.last_error = Some(e.to_string());
        self.metrics.count_event("Subscriber", "rejected");
        self.dirty = true;
        receipt.settle(Err(e));
    }

    /// Whether enough senders wait for their answer to write before the interval ends.
    fn write_early(&self) -> bool {
        self.waiting.len() >= ACK_BATCH
            && self.last_write.elapsed() >= EARLY_WRITE_SPACING
            && self.retry_at.is_none()
    }

    /// Writes the merged pending messages into the target Thing, unless a failed write is
    /// still backing off.
    async fn write(&mut self) {
        if self
            .retry_at
            .is_some_and(|at| tokio::time::Instant::now() < at)
        {
            return;
        }
        let Some(doc) = self.pending.take() else {
            return;
        };
        self.last_write = tokio::time::Instant::now();
        // The senders of what this write holds; whoever arrives meanwhile waits for the next.
        let written = std::mem::take(&mut self.waiting);
        match self.target.write(&doc).await {
            Ok(desired) => {
                if let (Some(provenance), Some(desired)) = (self.provenance.take(), desired) {
                    self.book.record(
                        &self.namespace,
                        &self.target.thing_name,
                        provenance,
                        desired,
                    );
                }
                self.retry_at = None;
                self.retry_delay = WRITE_INTERVAL;
                for receipt in written {
                    receipt.settle(Ok(()));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.message, retryable = e.retryable, "write failed");
                self.last_error = Some(e.message.clone());
                self.dirty = true;
                if e.retryable {
                    // What arrived meanwhile is newer: it goes on top.
                    let mut retry = doc;
                    if let Some(newer) = self.pending.take() {
                        coalesce(&mut retry, &newer);
                    }
                    self.pending = Some(retry);
                    // Still unanswered: they are answered with the write that succeeds.
                    let newer = std::mem::replace(&mut self.waiting, written);
                    self.waiting.extend(newer);
                    self.retry_at = Some(tokio::time::Instant::now() + self.retry_delay);
                    self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY_DELAY);
                } else {
                    self.rejected += 1;
                    for receipt in written {
                        receipt.settle(Err(Rejection::NotWritable(e.message.clone())));
                    }
                }
            }
        }
    }

    /// Writes the counters if they changed; `budgeted`: only with a turn of the fleet-wide
    /// [`TaskStatusBudget`] (otherwise they wait for a later tick). The task's last write is not
    /// budgeted: the next task counts on from it.
    async fn flush_status(&mut self, budgeted: bool) {
        if !self.dirty || (budgeted && !self.status_budget.try_turn()) {
            return;
        }
        let status = json!({
            "received": self.received,
            "rejected": self.rejected,
            "lastReceivedTime": self.last_received_time,
            "lastError": self.last_error,
        });
        if write_task_status(&self.api, &self.name, status, &self.metrics).await {
            self.dirty = false;
        }
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Inbound>) {
        let mut write = tokio::time::interval(WRITE_INTERVAL);
        write.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status = tokio::time::interval(STATUS_INTERVAL);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(m) => {
                        self.accept(m);
                        if self.write_early() {
                            self.write().await;
                        }
                    }
                    None => break,
                },
                _ = write.tick() => self.write().await,
                _ = status.tick() => self.flush_status(true).await,
            }
        }
        // Deliver what is pending before going away (spec change or shutdown).
        while let Ok(m) = rx.try_recv() {
            self.accept(m);
        }
        self.write().await;
        self.flush_status(false).await;
        // Whatever is still unwritten is not answered: HTTP callers get 503, MQTT messages stay
        // unacknowledged and come again to the next session.
    }
}
