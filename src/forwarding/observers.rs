//! One task per Observer: subscribes to the state bus, filters, delivers to the sink with
//! retries, and records its counters and filter memory in the Observer's status (coalesced,
//! at most one write per flush interval), so the memory of "changed by more than X" survives a
//! restart of the operator.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::{sync::broadcast::error::RecvError, task::JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    DeliveryError, SharedByTasks, StateBus,
    broker_connections::BrokerConnections,
    filter::{
        Context as FilterContext, Decision, Memory, evaluate, memories_from_status,
        memories_to_status, selects,
    },
    lanes::{Lanes, Offer},
    mqtt::MqttAccess,
    outbox::{Delivered, Delivery, Outbox},
    provenance::ProvenanceBook,
    retry::RetrySchedule,
    sink::Sink,
    status_budget::TaskStatusBudget,
    tasks::{TaskRegistry, write_task_status},
};
use crate::{
    api::{
        Observer, ThingUpdate,
        filter_expression::FilterExpression,
        object_key,
        observer::{DeliveryMode, ObserverSpec, SinkSpec, StateSection},
    },
    egress::EgressPolicy,
    metrics::Metrics,
};

/// Status counters and filter memory are written at most this often per Observer (and only
/// with a turn of the fleet-wide [`TaskStatusBudget`]).
const FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// Deliveries of one Observer in flight at once, unless `spec.maxInFlight` says otherwise.
pub const DEFAULT_MAX_IN_FLIGHT: u16 = 32;
/// Updates of one Thing waiting behind its running delivery under `Every`; beyond it the
/// oldest is dropped and counted (`thing_operator_observer_overflow_total`).
const EVERY_LANE_CAPACITY: usize = 256;
/// Updates waiting in all lanes of one Observer before it stops reading the state bus (whose
/// own bounded ring then takes the backlog).
const QUEUED_CAPACITY: usize = 4096;

/// Observers whose destination the egress policy refused, by `namespace/name`, with the
/// message. Known only to the task (a name resolves at connect time); the reconciler, woken by
/// the task's status write, turns it into `Ready=False`, reason `DestinationRefused`.
#[derive(Clone, Default)]
struct Refusals(Arc<Mutex<HashMap<String, String>>>);

impl Refusals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, key: &str, message: &str) {
        self.lock().insert(key.to_string(), message.to_string());
    }

    fn clear(&self, key: &str) {
        self.lock().remove(key);
    }

    fn get(&self, key: &str) -> Option<String> {
        self.lock().get(key).cloned()
    }
}

/// Where MQTT sinks publish: the operator's broker (each namespace with its own account), or a
/// broker a BrokerConnection names.
pub struct MqttBrokers {
    pub mqtt: MqttAccess,
    pub connections: BrokerConnections,
}

/// Starts, restarts and stops Observer tasks.
pub struct ObserverManager {
    bus: StateBus,
    client: Client,
    mqtt: MqttAccess,
    /// Sessions with the brokers BrokerConnections name.
    connections: BrokerConnections,
    /// Where HTTP sinks may connect.
    egress: Arc<EgressPolicy>,
    metrics: Arc<Metrics>,
    /// Turns for status writes, shared with the Subscribers.
    status_budget: TaskStatusBudget,
    shutdown: CancellationToken,
    tasks: TaskRegistry,
    refusals: Refusals,
    /// Shared with the Subscribers: what the operator's own writes into Things caused.
    provenance: ProvenanceBook,
}

impl ObserverManager {
    pub fn new(
        bus: StateBus,
        client: Client,
        MqttBrokers { mqtt, connections }: MqttBrokers,
        egress: Arc<EgressPolicy>,
        SharedByTasks {
            provenance,
            status_budget,
        }: SharedByTasks,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            bus,
            client,
            mqtt,
            connections,
            provenance,
            egress,
            metrics,
            status_budget,
            shutdown,
            tasks: TaskRegistry::default(),
            refusals: Refusals::default(),
        }
    }

    /// Why the Observer's destination was refused, if its task found it so.
    pub fn refusal(&self, namespace: &str, name: &str) -> Option<String> {
        self.refusals.get(&object_key(namespace, name))
    }

    pub fn bus(&self) -> &StateBus {
        &self.bus
    }

    /// Whether an MQTT sink can be served.
    pub fn has_mqtt(&self) -> bool {
        self.mqtt.is_configured()
    }

    /// Makes sure a task runs for this generation of the Observer (restarting it on spec change).
    pub fn ensure(&self, observer: &Observer) {
        let ns = observer.namespace().unwrap_or_default();
        let name = observer.name_any();
        let generation = observer.metadata.generation;
        if self.tasks.is_current(&ns, &name, generation) {
            return;
        }
        // The old generation stops before the new one starts: never two tasks delivering.
        self.tasks.stop(&ns, &name);
        self.refusals.clear(&object_key(&ns, &name));
        let status = observer.status.clone().unwrap_or_default();
        let cancel = self.shutdown.child_token();
        let task = ObserverTask {
            namespace: ns.clone(),
            name: name.clone(),
            spec: observer.spec.clone(),
            forwarded: status.forwarded.unwrap_or(0),
            failed: status.failed.unwrap_or(0),
            memory: memories_from_status(status.last_forwarded.unwrap_or_default()),
            expression: None,
            previous: HashMap::new(),
            versions: HashMap::new(),
            lanes: lanes_for(&observer.spec),
            api: Api::namespaced(self.client.clone(), &ns),
            client: self.client.clone(),
            mqtt: self.mqtt.clone(),
            connections: self.connections.clone(),
            egress: self.egress.clone(),
            bus: self.bus.clone(),
            metrics: self.metrics.clone(),
            status_budget: self.status_budget.clone(),
            refusals: self.refusals.clone(),
            provenance: self.provenance.clone(),
            cancel: cancel.clone(),
            dirty: false,
            forgotten: BTreeSet::new(),
            last_forwarded_time: None,
            last_error: None,
        };
        // Every log line of the task names its Observer through this span.
        let span = tracing::info_span!("observer", namespace = %ns, name = %name);
        tokio::spawn(tracing::Instrument::instrument(task.run(), span));
        self.tasks.insert(&ns, &name, generation, cancel);
    }

    pub fn stop(&self, namespace: &str, name: &str) {
        self.tasks.stop(namespace, name);
        self.refusals.clear(&object_key(namespace, name));
    }
}

struct ObserverTask {
    namespace: String,
    name: String,
    spec: ObserverSpec,
    forwarded: i64,
    failed: i64,
    memory: BTreeMap<String, Memory>,
    /// `filter.expression`, compiled once when the task starts.
    expression: Option<FilterExpression>,
    /// Each watched Thing's section at its previous update (`previous` of the expression).
    previous: HashMap<String, Value>,
    /// The newest state version seen per Thing: reported state never goes backwards (a paced
    /// snapshot of an older version, re-published after a newer report, is not delivered).
    versions: HashMap<String, i64>,
    /// One lane per Thing: in order per Thing, Things side by side.
    lanes: Lanes<Arc<ThingUpdate>>,
    api: Api<Observer>,
    client: Client,
    /// Where an MQTT sink gets its connection: the one that acts for this namespace.
    mqtt: MqttAccess,
    connections: BrokerConnections,
    egress: Arc<EgressPolicy>,
    bus: StateBus,
    metrics: Arc<Metrics>,
    status_budget: TaskStatusBudget,
    refusals: Refusals,
    provenance: ProvenanceBook,
    cancel: CancellationToken,
    dirty: bool,
    /// Deleted Things whose filter memory the status still holds: the merge patch of the next
    /// status write removes them (`null`), since leaving a key out of a merge patch keeps it.
    forgotten: BTreeSet<String>,
    last_forwarded_time: Option<DateTime<Utc>>,
    last_error: Option<String>,
}

/// How a background status write ended, with the removals it carried.
struct Flushed {
    written: bool,
    forgotten: BTreeSet<String>,
}

/// The lanes of an Observer with this spec: `Latest` keeps one waiting update per Thing.
fn lanes_for(spec: &ObserverSpec) -> Lanes<Arc<ThingUpdate>> {
    let in_flight = usize::from(spec.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT));
    let lane_capacity = match spec.delivery {
        DeliveryMode::Every => EVERY_LANE_CAPACITY,
        DeliveryMode::Latest => 1,
    };
    Lanes::new(in_flight, lane_capacity, QUEUED_CAPACITY)
}

impl ObserverTask {
    /// Waits up to `d`, returning false when the task is cancelled meanwhile.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.cancel.cancelled() => false,
        }
    }

    /// The sink of `spec`, or of the dead-letter destination; retried while it may come.
    async fn build_sink(&mut self, spec: &SinkSpec) -> Option<Sink> {
        let mut delay = Duration::from_millis(500);
        loop {
            match Sink::build(
                spec,
                &self.namespace,
                &self.client,
                &self.mqtt,
                &self.connections,
                &self.egress,
                &self.provenance,
            )
            .await
            {
                Ok(sink) => return Some(sink),
                Err(e) => {
                    tracing::warn!(error = %e, "sink not ready");
                    self.note_refusal(&e);
                    self.last_error = Some(e.message.clone());
                    self.dirty = true;
                    self.flush_now().await;
                    if !e.retryable {
                        // Only a spec change (which restarts this task) can fix it.
                        self.cancel.cancelled().await;
                        return None;
                    }
                    if !self.pause(delay).await {
                        return None;
                    }
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// Takes an update from the bus into its Thing's lane, starting it when the lane is free.
    fn accept(
        &mut self,
        outbox: &Outbox,
        running: &mut JoinSet<Delivered>,
        update: Arc<ThingUpdate>,
    ) {
        if !selects(&self.spec.source, &self.namespace, &update) {
            return;
        }
        let thing = update.name.clone();
        match self.lanes.offer(&thing, update) {
            Offer::Start(update) => self.start(outbox, running, update),
            Offer::Queued => {}
            // `Latest`: the replaced update was older than the one now waiting.
            Offer::Replaced(_) => self.metrics.count_event("Observer", "coalesced"),
            Offer::Overflowed(_) => {
                self.metrics.count_observer_overflow(&self.namespace, 1);
                let why = format!(
                    "fell behind on Thing {thing}: its oldest waiting update was dropped (the sink is slower than its updates come)"
                );
                if self.last_error.as_deref() != Some(why.as_str()) {
                    self.last_error = Some(why);
                    self.dirty = true;
                }
            }
        }
    }

    /// Runs `update` of a lane that was given a slot: filters it and, when it passes, sends it
    /// off. An update that does not pass frees the slot at once for the next waiting one.
    fn start(
        &mut self,
        outbox: &Outbox,
        running: &mut JoinSet<Delivered>,
        update: Arc<ThingUpdate>,
    ) {
        let mut next = Some(update);
        while let Some(update) = next.take() {
            match self.prepare(&outbox.sink, update.clone()) {
                Some(delivery) => {
                    running.spawn(outbox.clone().send(delivery));
                }
                None => next = self.lanes.finish(&update.name).map(|(_, u)| u),
            }
        }
    }

    /// The filter and loop rules, in lane order: the delivery to make, or `None` to skip.
    fn prepare(&mut self, sink: &Sink, update: Arc<ThingUpdate>) -> Option<Delivery> {
        let filter = self.spec.filter.as_ref();
        let section = filter.map(|f| f.section).unwrap_or_default();
        if section != StateSection::Desired
            && let Some(version) = update.version
        {
            let newest = self.versions.entry(update.name.clone()).or_insert(version);
            if version < *newest {
                self.metrics.count_event("Observer", "skipped_older");
                return None;
            }
            *newest = version;
        }
        let memory = self.memory.get(&update.name).cloned().unwrap_or_default();
        let current = update.section(section);
        let previous = match &self.expression {
            // Only an expression reads it: without one, nothing is kept per Thing.
            Some(_) => self.previous.insert(
                update.name.clone(),
                Value::Object(current.map(|s| s.0.clone()).unwrap_or_default()),
            ),
            None => None,
        };
        let context = FilterContext {
            expression: self.expression.as_ref(),
            previous: previous.as_ref(),
        };
        let (data, memory) = match evaluate(filter, context, current, &memory) {
            Decision::Forward { data, memory } => (data, memory),
            Decision::Skip => return None,
            Decision::Failed(why) => {
                tracing::debug!(thing = %update.name, %why, "filter expression not evaluated");
                self.metrics.count_event("Observer", "filter_failed");
                if self.last_error.as_deref() != Some(why.as_str()) {
                    self.last_error = Some(why);
                    self.dirty = true;
                }
                return None;
            }
        };
        // Where this update's chain of events started: a loop back into it, or a chain too
        // long, ends here (not a failure: the graph settles).
        let provenance = match sink.hop(&self.provenance.of_update(&update, section)) {
            Ok(next) => next,
            Err(stop) => {
                tracing::debug!(thing = %update.name, %stop, "event not passed on");
                self.metrics.count_event("Observer", "dropped_loop");
                return None;
            }
        };
        Some(Delivery {
            update,
            section,
            data,
            provenance,
            memory,
        })
    }

    /// Records how a delivery ended and gives its slot to the next waiting update.
    fn complete(
        &mut self,
        outbox: &Outbox,
        running: &mut JoinSet<Delivered>,
        delivered: Delivered,
    ) {
        let kind = outbox.sink.kind();
        match delivered.result {
            Ok(()) => {
                self.refusals
                    .clear(&object_key(&self.namespace, &self.name));
                self.memory
                    .insert(delivered.thing.clone(), delivered.memory);
                self.forwarded += 1;
                self.last_forwarded_time = Some(Utc::now());
                self.last_error = None;
                self.metrics
                    .count_event("Observer", &format!("forwarded_{kind}"));
            }
            Err(e) => {
                // Dead letter: the update is dropped and counted; the next change (or a restart,
                // which replays the latest state) delivers the then-current state.
                tracing::warn!(thing = %delivered.thing, error = %e, "delivery failed, update dropped");
                self.note_refusal(&e);
                self.failed += 1;
                self.last_error = Some(e.message);
                self.metrics
                    .count_event("Observer", &format!("failed_{kind}"));
                self.metrics.count_dead_letter(&self.namespace);
            }
        }
        self.dirty = true;
        if let Some((_, update)) = self.lanes.finish(&delivered.thing) {
            self.start(outbox, running, update);
        }
    }

    /// A deleted Thing's filter memory and what else is kept for it go with it: the status stays
    /// as large as the fleet is, not as large as it ever was.
    fn forget(&mut self, thing: &str) {
        self.previous.remove(thing);
        self.versions.remove(thing);
        if self.memory.remove(thing).is_some() {
            self.forgotten.insert(thing.to_string());
            self.dirty = true;
        }
    }

    /// After missing removals: forgets every Thing the bus no longer has.
    fn forget_unmatched(&mut self) {
        let known: std::collections::HashSet<String> = self
            .bus
            .latest(&self.namespace)
            .iter()
            .map(|u| u.name.clone())
            .collect();
        let gone: Vec<String> = self
            .memory
            .keys()
            .filter(|name| !known.contains(*name))
            .cloned()
            .collect();
        for thing in gone {
            self.forget(&thing);
        }
    }

    /// Remembers a refused destination for the reconciler (see [`Refusals`]).
    fn note_refusal(&self, e: &DeliveryError) {
        if e.refused {
            self.refusals
                .set(&object_key(&self.namespace, &self.name), &e.message);
        }
    }

    /// The task's status fields now; prunes what is kept per Thing for Things that are gone.
    fn status(&mut self) -> Value {
        let latest = self.bus.latest(&self.namespace);
        let matched: std::collections::HashSet<&str> = latest
            .iter()
            .filter(|u| selects(&self.spec.source, &self.namespace, u))
            .map(|u| u.name.as_str())
            .collect();
        // What is kept per Thing only in memory goes with the Thing (the bus forgets deleted
        // Things); the filter memory goes when the Thing is deleted (`forget`), not when the bus
        // merely has not seen it yet: after a restart it is the baseline `changedBy` resumes from.
        self.previous
            .retain(|name, _| matched.contains(name.as_str()));
        self.versions
            .retain(|name, _| matched.contains(name.as_str()));
        let matched = matched.len();
        let mut last_forwarded = json!(memories_to_status(&self.memory));
        for thing in &self.forgotten {
            if !self.memory.contains_key(thing) {
                last_forwarded[thing.as_str()] = Value::Null;
            }
        }
        json!({
            "matchedThings": matched,
            "forwarded": self.forwarded,
            "failed": self.failed,
            "lastForwardedTime": self.last_forwarded_time,
            "lastError": self.last_error,
            "lastForwarded": last_forwarded,
        })
    }

    /// Writes the status now (before the task delivers, and when it ends).
    async fn flush_now(&mut self) {
        if !self.dirty {
            return;
        }
        let status = self.status();
        if write_task_status(&self.api, &self.name, status, &self.metrics).await {
            self.dirty = false;
            self.forgotten.clear();
        }
    }

    /// Starts a status write beside the deliveries (one at a time, with a turn of the
    /// fleet-wide [`TaskStatusBudget`]): a slow API server delays the counters, never an update.
    fn flush_in_background(&mut self, flushes: &mut JoinSet<Flushed>) {
        // Without a turn of the fleet-wide budget the changes wait for a later tick.
        if !self.dirty || !flushes.is_empty() || !self.status_budget.try_turn() {
            return;
        }
        let status = self.status();
        self.dirty = false;
        let forgotten = std::mem::take(&mut self.forgotten);
        let api = self.api.clone();
        let name = self.name.clone();
        let metrics = self.metrics.clone();
        flushes.spawn(async move {
            let written = write_task_status(&api, &name, status, &metrics).await;
            Flushed { written, forgotten }
        });
    }

    /// A background status write ended: a failed one is made again by the next flush.
    fn flushed(&mut self, flushed: Option<Flushed>) {
        match flushed {
            Some(Flushed {
                written: true,
                forgotten: _,
            }) => {}
            Some(Flushed { forgotten, .. }) => {
                self.forgotten.extend(forgotten);
                self.dirty = true;
            }
            None => self.dirty = true,
        }
    }

    async fn run(mut self) {
        if let Some(source) = self
            .spec
            .filter
            .as_ref()
            .and_then(|f| f.expression.as_deref())
        {
            match FilterExpression::compile(source) {
                Ok(expression) => self.expression = Some(expression),
                Err(e) => {
                    // Validation compiled it already; only a change of the parser could land
                    // here. Say so and wait for a spec change.
                    self.last_error = Some(e.to_string());
                    self.dirty = true;
                    self.flush_now().await;
                    self.cancel.cancelled().await;
                    return;
                }
            }
        }
        let Some(sink) = self.build_sink(&self.spec.sink.clone()).await else {
            return;
        };
        let dead_letter = match self.spec.dead_letter.clone() {
            Some(d) => {
                let spec = SinkSpec {
                    mqtt: d.mqtt,
                    http: d.http,
                    thing: None,
                };
                match self.build_sink(&spec).await {
                    Some(sink) => Some(Arc::new(sink)),
                    None => return,
                }
            }
            None => None,
        };
        let outbox = Outbox {
            sink: Arc::new(sink),
            dead_letter,
            retry: RetrySchedule::of(self.spec.retry.as_ref()),
            metrics: self.metrics.clone(),
            cancel: self.cancel.clone(),
        };
        // Dropped with the task: a cancelled task's deliveries and status write stop with it.
        let mut running: JoinSet<Delivered> = JoinSet::new();
        let mut flushes: JoinSet<Flushed> = JoinSet::new();
        let mut rx = self.bus.subscribe();
        let mut removals = self.bus.removals();
        // State, not events: start from the latest state of every matching Thing.
        for update in self.bus.latest(&self.namespace) {
            self.accept(&outbox, &mut running, update);
        }
        let mut flush = tokio::time::interval(FLUSH_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = flush.tick() => self.flush_in_background(&mut flushes),
                Some(flushed) = flushes.join_next() => self.flushed(flushed.ok()),
                Some(done) = running.join_next() => match done {
                    Ok(delivered) => self.complete(&outbox, &mut running, delivered),
                    // A delivery panicked (a bug): its lane would stay busy forever, so the task
                    // ends and the next reconcile starts a fresh one from the latest state.
                    Err(e) => {
                        tracing::error!(error = %e, "a delivery task failed; restarting the Observer task");
                        self.cancel.cancel();
                        break;
                    }
                },
                removed = removals.recv() => match removed {
                    Ok((namespace, thing)) if namespace == self.namespace => self.forget(&thing),
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => self.forget_unmatched(),
                    Err(RecvError::Closed) => break,
                },
                msg = rx.recv(), if self.lanes.has_room() => match msg {
                    Ok(update) => self.accept(&outbox, &mut running, update),
                    Err(RecvError::Lagged(missed)) => match self.spec.delivery {
                        DeliveryMode::Latest => {
                            tracing::debug!(missed, "fell behind; resuming from the latest state");
                            for update in self.bus.latest(&self.namespace) {
                                self.accept(&outbox, &mut running, update);
                            }
                        }
                        DeliveryMode::Every => {
                            // The oldest were dropped for this Observer (the bus keeps a bounded
                            // ring): counted and said, then on with what is buffered.
                            tracing::warn!(missed, "fell behind the state bus; oldest updates dropped");
                            self.metrics.count_observer_overflow(&self.namespace, missed);
                            self.last_error = Some(format!(
                                "fell behind: {missed} updates dropped (the sink is slower than the updates come)"
                            ));
                            self.dirty = true;
                        }
                    },
                    Err(RecvError::Closed) => break,
                },
            }
        }
        running.abort_all();
        flushes.abort_all();
        self.dirty = true;
        self.flush_now().await;
    }
}
