//! Status conditions shared by all kinds: a list-map keyed by `type`, each with the
//! `observedGeneration` it was computed for.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Condition types used across kinds.
pub mod types {
    pub const READY: &str = "Ready";
    pub const PROVISIONED: &str = "Provisioned";
    pub const CREDENTIALS_READY: &str = "CredentialsReady";
    pub const IN_SYNC: &str = "InSync";
    pub const CONNECTED: &str = "Connected";
}

/// Reasons used across kinds.
pub mod reasons {
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const RECONCILED: &str = "Reconciled";
    pub const PROVISIONING: &str = "Provisioning";
    pub const BACKEND_NOT_CONFIGURED: &str = "BackendNotConfigured";
    pub const BACKEND_ERROR: &str = "BackendError";
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn from_bool(b: bool) -> Self {
        if b { Self::True } else { Self::False }
    }
}

/// One observation about an object, in the shape of `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason.
    pub reason: String,
    /// Human-readable explanation. Never carries secret material.
    pub message: String,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<DateTime<Utc>>,
    /// The `metadata.generation` this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    pub fn new(
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.into(),
            last_transition_time: None,
            observed_generation: None,
        }
    }

    /// Equal in everything a reader cares about (the transition time is bookkeeping).
    pub fn same_observation(&self, other: &Condition) -> bool {
        self.type_ == other.type_
            && self.status == other.status
            && self.reason == other.reason
            && self.message == other.message
            && self.observed_generation == other.observed_generation
    }
}

/// A list of conditions, serialized as a Kubernetes list-map keyed by `type`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(transparent)]
pub struct Conditions(pub Vec<Condition>);

impl JsonSchema for Conditions {
    fn schema_name() -> Cow<'static, str> {
        "Conditions".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let item = generator.subschema_for::<Condition>();
        json_schema!({
            "type": "array",
            "items": item,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

impl Conditions {
    pub fn get(&self, type_: &str) -> Option<&Condition> {
        self.0.iter().find(|c| c.type_ == type_)
    }

    pub fn is_true(&self, type_: &str) -> bool {
        self.get(type_)
            .is_some_and(|c| c.status == ConditionStatus::True)
    }

    /// Sets a condition, keeping its transition time when the status did not change,
    /// so that re-running a reconcile produces an identical status (no spurious writes).
    pub fn set(&mut self, mut condition: Condition, now: DateTime<Utc>) {
        match self.0.iter_mut().find(|c| c.type_ == condition.type_) {
            Some(existing) => {
                condition.last_transition_time = if existing.status == condition.status {
                    existing.last_transition_time.or(Some(now))
                } else {
                    Some(now)
                };
                *existing = condition;
            }
            None => {
                condition.last_transition_time = Some(now);
                self.0.push(condition);
            }
        }
    }

    /// Records the generation every condition was computed for.
    pub fn stamp_generation(&mut self, generation: Option<i64>) {
        for c in self.0.iter_mut() {
            c.observed_generation = generation;
        }
    }

    /// True when both hold the same observations, ignoring transition times and order.
    pub fn same_observations(&self, other: &Conditions) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .all(|c| other.get(&c.type_).is_some_and(|o| o.same_observation(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_keeps_transition_time_when_status_unchanged() {
        let t0 = DateTime::from_timestamp(1_000, 0).unwrap();
        let t1 = DateTime::from_timestamp(2_000, 0).unwrap();
        let mut c = Conditions::default();
        c.set(
            Condition::new("Ready", ConditionStatus::False, "A", "x"),
            t0,
        );
        c.set(
            Condition::new("Ready", ConditionStatus::False, "B", "y"),
            t1,
        );
        assert_eq!(c.get("Ready").unwrap().last_transition_time, Some(t0));
        assert_eq!(c.get("Ready").unwrap().reason, "B");
        c.set(Condition::new("Ready", ConditionStatus::True, "B", "y"), t1);
        assert_eq!(c.get("Ready").unwrap().last_transition_time, Some(t1));
        assert_eq!(c.0.len(), 1);
    }

    #[test]
    fn same_observations_ignores_order_and_time() {
        let t0 = DateTime::from_timestamp(1_000, 0).unwrap();
        let t1 = DateTime::from_timestamp(2_000, 0).unwrap();
        let mut a = Conditions::default();
        a.set(Condition::new("A", ConditionStatus::True, "R", ""), t0);
        a.set(Condition::new("B", ConditionStatus::True, "R", ""), t0);
        let mut b = Conditions::default();
        b.set(Condition::new("B", ConditionStatus::True, "R", ""), t1);
        b.set(Condition::new("A", ConditionStatus::True, "R", ""), t1);
        assert!(a.same_observations(&b));
        b.set(Condition::new("A", ConditionStatus::False, "R", ""), t1);
        assert!(!a.same_observations(&b));
    }
}
