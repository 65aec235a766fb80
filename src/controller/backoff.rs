//! Per-object retry backoff with jitter: a failing object is retried ever more slowly, and a
//! fleet failing at once is spread out instead of retrying in lock-step.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use rand::Rng;

pub struct RetryBackoff {
    base: Duration,
    max: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl RetryBackoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn next_delay(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let exp = self.base.saturating_mul(1u32 << (*n - 1).min(16));
        let capped = exp.min(self.max);
        // "Equal jitter": half fixed, half random, so delays never collapse to zero.
        let half = capped / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    pub fn reset(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// Spreads a periodic requeue by up to ±10% so objects created together do not poll together.
pub fn jittered(d: Duration) -> Duration {
    let spread = d / 10;
    if spread.is_zero() {
        return d;
    }
    d - spread + rand::rng().random_range(Duration::ZERO..=spread * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_resets() {
        let b = RetryBackoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let d1 = b.next_delay("a");
        assert!(d1 >= Duration::from_millis(500) && d1 <= Duration::from_secs(1));
        for _ in 0..10 {
            b.next_delay("a");
        }
        let capped = b.next_delay("a");
        assert!(capped >= Duration::from_secs(4) && capped <= Duration::from_secs(8));
        b.reset("a");
        assert!(b.next_delay("a") <= Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(100));
            assert!(d >= Duration::from_secs(90) && d <= Duration::from_secs(110));
        }
    }
}
