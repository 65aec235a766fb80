//! The fleet-wide budget of Observer and Subscriber status writes (their counters, last error
//! and filter memory). Each task writes at most every few seconds, which bounds one task, not
//! the cluster: a thousand busy Observers would ask the API server for 500 writes a second. So
//! every such write also needs a turn from one rate shared by all tasks. A task asks at its
//! flush tick and never waits: without a turn it keeps its changes and writes them, merged, at a
//! later tick (tasks tick at their own phases, so the turns spread over them). A task's last
//! write (when it stops for a spec change or shutdown) takes no turn: what it counted must not
//! be lost, and the next task counts on from it.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Turns for task status writes; clones share them.
#[derive(Clone)]
pub struct TaskStatusBudget(Option<Arc<DefaultDirectRateLimiter>>);

impl TaskStatusBudget {
    /// `qps` writes a second across all tasks (at least 1), with bursts of up to one second's
    /// worth.
    pub fn new(qps: f64) -> Self {
        let qps = if qps.is_finite() { qps.max(1.0) } else { 1.0 };
        let burst = NonZeroU32::new(qps.ceil() as u32).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(Duration::from_secs_f64(1.0 / qps))
            .map(|q| q.allow_burst(burst))
            .unwrap_or_else(|| Quota::per_second(burst));
        Self(Some(Arc::new(RateLimiter::direct(quota))))
    }

    /// No limit (tests of a single task).
    pub fn unlimited() -> Self {
        Self(None)
    }

    /// A write's turn now, if one is free.
    pub fn try_turn(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|limiter| limiter.check().is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_shared_and_refill_at_the_rate() {
        let budget = TaskStatusBudget::new(2.0);
        let other_task = budget.clone();
        // A burst of one second's worth, shared by every clone.
        assert!(budget.try_turn());
        assert!(other_task.try_turn());
        assert!(!budget.try_turn());
        assert!(!other_task.try_turn());
        assert!(TaskStatusBudget::unlimited().try_turn());
    }

    #[test]
    fn turns_come_back_at_the_rate() {
        let budget = TaskStatusBudget::new(50.0);
        while budget.try_turn() {}
        // One turn every 20 ms: bounded wait, not a timing assertion.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !budget.try_turn() {
            assert!(std::time::Instant::now() < deadline, "no turn came back");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
