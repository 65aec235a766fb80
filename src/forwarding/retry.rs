//! An Observer's retry policy (`spec.retry`), resolved with its defaults: how many tries, how
//! long between them, and by when the last may start. Pure.

use std::time::Duration;

use crate::api::{observer::RetryPolicy, validation::parse_duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySchedule {
    pub attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub deadline: Duration,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
        }
    }
}

impl RetrySchedule {
    /// The spec's policy over the defaults (validation refuses values that do not parse).
    pub fn of(policy: Option<&RetryPolicy>) -> Self {
        let defaults = Self::default();
        let Some(p) = policy else { return defaults };
        let duration = |v: &Option<String>, d: Duration| {
            v.as_deref()
                .and_then(|v| parse_duration(v).ok())
                .unwrap_or(d)
        };
        Self {
            attempts: p.attempts.unwrap_or(defaults.attempts).clamp(1, 20),
            initial_backoff: duration(&p.initial_backoff, defaults.initial_backoff),
            max_backoff: duration(&p.max_backoff, defaults.max_backoff),
            deadline: duration(&p.deadline, defaults.deadline),
        }
    }

    /// The wait after try `attempt` (1-based) before the next, before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
        doubled.min(self.max_backoff)
    }

    /// Whether another try may start, `elapsed` after the first, having made `attempt` tries.
    pub fn may_retry(&self, attempt: u32, elapsed: Duration) -> bool {
        attempt < self.attempts && elapsed < self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_overrides_the_defaults_and_backoff_doubles_to_its_cap() {
        let s = RetrySchedule::of(Some(&RetryPolicy {
            attempts: Some(3),
            initial_backoff: Some("1s".into()),
            max_backoff: Some("3s".into()),
            deadline: Some("5s".into()),
        }));
        assert_eq!(s.attempts, 3);
        assert_eq!(
            [s.backoff(1), s.backoff(2), s.backoff(3)],
            [
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(3)
            ]
        );
        assert!(s.may_retry(2, Duration::from_secs(4)));
        assert!(!s.may_retry(3, Duration::from_secs(1)), "out of tries");
        assert!(!s.may_retry(1, Duration::from_secs(5)), "past the deadline");
        assert_eq!(RetrySchedule::of(None), RetrySchedule::default());
    }
}
