//! The Thing reconciler's pure rules: what `Ready` says, when a change of it is worth an Event,
//! and when to look at the Thing again. No I/O, so every rule is a table test.

use std::time::Duration;

use kube::runtime::controller::Action;

use super::jittered;
use crate::{
    api::{
        Condition, ConditionStatus, ThingStatus,
        conditions::{reasons, types},
    },
    error::{Error, Result},
    provider::{Notice, ProviderError},
};

/// Ready is the conjunction of the three backend conditions; its reason is the first that fails.
pub fn ready_condition(status: &ThingStatus) -> Condition {
    for t in [types::PROVISIONED, types::CREDENTIALS_READY, types::IN_SYNC] {
        match status.conditions.get(t) {
            Some(c) if c.status == ConditionStatus::True => {}
            Some(c) => {
                return Condition::new(
                    types::READY,
                    ConditionStatus::False,
                    &c.reason,
                    c.message.clone(),
                );
            }
            None => {
                return Condition::new(
                    types::READY,
                    ConditionStatus::False,
                    reasons::PROVISIONING,
                    format!("waiting for {t}"),
                );
            }
        }
    }
    Condition::new(
        types::READY,
        ConditionStatus::True,
        reasons::RECONCILED,
        "device provisioned and in sync",
    )
}

/// The Event announcing `Ready` after a status write: only when Ready appeared or changed its
/// status, reason or message (an unchanged Ready is no news; repeating it would spam).
pub fn ready_event(old: &ThingStatus, new: &ThingStatus) -> Option<Notice> {
    let ready = new.conditions.get(types::READY)?;
    let unchanged = old.conditions.get(types::READY).is_some_and(|o| {
        o.status == ready.status && o.reason == ready.reason && o.message == ready.message
    });
    (!unchanged).then(|| Notice::for_ready(ready))
}

/// What the controller does after a backend reconcile.
#[derive(Debug)]
pub enum Next {
    /// Look again after this long (already jittered).
    Requeue(Duration),
    /// Only a spec change can help: no requeue, no hot loop.
    AwaitChange,
    /// Hand the failure to the error policy (counted, per-object backoff).
    Backoff(ProviderError),
}

/// On success, look again when the backend asked (polling, a pending rotation) or at the resync
/// interval, jittered so a fleet spreads out; a failure that only a spec change can fix waits
/// for that change; any other failure backs off.
pub fn next_step(
    result: Result<(), ProviderError>,
    requeue_after: Option<Duration>,
    resync: Duration,
) -> Next {
    match result {
        Ok(()) => Next::Requeue(jittered(requeue_after.unwrap_or(resync))),
        Err(e) if !e.is_retryable() => Next::AwaitChange,
        Err(e) => Next::Backoff(e),
    }
}

impl Next {
    pub fn into_action(self) -> Result<Action> {
        match self {
            Next::Requeue(after) => Ok(Action::requeue(after)),
            Next::AwaitChange => Ok(Action::await_change()),
            Next::Backoff(e) => Err(Error::Provider(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::provider::BackendError;

    fn status(conditions: &[(&str, bool, &str)]) -> ThingStatus {
        let mut s = ThingStatus::default();
        for (t, ok, reason) in conditions {
            let st = if *ok {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            };
            s.conditions.set(
                Condition::new(t, st, reason, format!("{t} {reason}")),
                Utc::now(),
            );
        }
        s
    }

    /// Backend conditions (type, true?, reason) -> Ready's status and reason.
    type ReadyCase = (
        &'static [(&'static str, bool, &'static str)],
        ConditionStatus,
        &'static str,
    );

    #[test]
    fn ready_is_the_first_failing_backend_condition() {
        use types::{CREDENTIALS_READY as C, IN_SYNC as S, PROVISIONED as P};
        let table: &[ReadyCase] = &[
            (&[], ConditionStatus::False, reasons::PROVISIONING),
            (
                &[(P, true, "Ok")],
                ConditionStatus::False,
                reasons::PROVISIONING,
            ),
            (
                &[(P, false, "Throttled"), (C, false, "SecretError")],
                ConditionStatus::False,
                "Throttled",
            ),
            (
                &[
                    (P, true, "Ok"),
                    (C, false, "SecretError"),
                    (S, false, "Drift"),
                ],
                ConditionStatus::False,
                "SecretError",
            ),
            (
                &[(P, true, "Ok"), (C, true, "Ok"), (S, false, "Pending")],
                ConditionStatus::False,
                "Pending",
            ),
            (
                &[(P, true, "Ok"), (C, true, "Ok"), (S, true, "Ok")],
                ConditionStatus::True,
                reasons::RECONCILED,
            ),
        ];
        for (conditions, want_status, want_reason) in table {
            let ready = ready_condition(&status(conditions));
            assert_eq!(ready.type_, types::READY);
            assert_eq!(&ready.status, want_status, "{conditions:?}");
            assert_eq!(ready.reason, *want_reason, "{conditions:?}");
        }
    }

    #[test]
    fn ready_event_fires_only_on_change() {
        let none = status(&[]);
        let ready = status(&[(types::READY, true, reasons::RECONCILED)]);
        let failing = status(&[(types::READY, false, "Throttled")]);
        let other_failure = status(&[(types::READY, false, "BackendError")]);

        let first = ready_event(&none, &ready).expect("first Ready is news");
        assert!(!first.warning);
        assert_eq!(first.reason, reasons::RECONCILED);
        assert!(ready_event(&ready, &ready).is_none(), "unchanged Ready");
        let broke = ready_event(&ready, &failing).expect("Ready turned False");
        assert!(broke.warning);
        assert_eq!(broke.reason, "Throttled");
        assert!(
            ready_event(&failing, &other_failure).is_some(),
            "new reason"
        );
        assert!(ready_event(&ready, &none).is_none(), "no Ready, no Event");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("test failure")]
    struct Failure {
        retryable: bool,
    }

    impl BackendError for Failure {
        fn is_retryable(&self) -> bool {
            self.retryable
        }
        fn reason(&self) -> &'static str {
            "TestFailure"
        }
    }

    #[test]
    fn requeue_decisions() {
        let resync = Duration::from_secs(300);
        let asked = Duration::from_secs(10);
        let within_jitter = |d: Duration, of: Duration| d >= of * 9 / 10 && d <= of * 11 / 10;
        match next_step(Ok(()), Some(asked), resync) {
            Next::Requeue(d) => assert!(within_jitter(d, asked), "{d:?}"),
            other => panic!("success requeues at the backend's interval, got {other:?}"),
        }
        match next_step(Ok(()), None, resync) {
            Next::Requeue(d) => assert!(within_jitter(d, resync), "{d:?}"),
            other => panic!("success requeues at the resync interval, got {other:?}"),
        }
        let permanent = next_step(Err(Failure { retryable: false }.into()), None, resync);
        assert!(matches!(permanent, Next::AwaitChange), "{permanent:?}");
        assert_eq!(permanent.into_action().ok(), Some(Action::await_change()));
        match next_step(Err(Failure { retryable: true }.into()), Some(asked), resync) {
            Next::Backoff(e) => {
                assert_eq!(e.reason(), "TestFailure");
                let err = Next::Backoff(e).into_action().expect_err("backs off");
                assert_eq!(err.reason(), "TestFailure");
            }
            other => panic!("a retryable failure backs off, got {other:?}"),
        }
    }
}
