//! What every backend writes into a Thing's status the same way: where the device lives
//! (`status.device`) and the three conditions a backend owns (`Provisioned`,
//! `CredentialsReady`, `InSync`; the controller derives `Ready` from them).

use chrono::Utc;

use super::BackendError;
use crate::api::{Condition, ConditionStatus, ThingStatus, thing::Broker};

/// Where the device lives in its backend: identifiers only, never credentials.
pub struct DeviceIdentity<'a> {
    pub broker: Broker,
    pub thing_name: &'a str,
    pub client_id: &'a str,
    pub endpoint: &'a str,
    /// The Thing's MQTT topic tree.
    pub topic: &'a str,
    pub secret_name: &'a str,
    /// Only for backends with a policy object of their own (AWS); `None` leaves it alone.
    pub policy_name: Option<&'a str>,
}

/// Records the device's identity in `status.device` (a field keeps its value when unchanged, so
/// an idle Thing produces no status write).
pub fn record_device(status: &mut ThingStatus, id: DeviceIdentity<'_>) {
    fn assign(slot: &mut Option<String>, value: &str) {
        if slot.as_deref() != Some(value) {
            *slot = Some(value.to_string());
        }
    }
    let device = status.device.get_or_insert_with(Default::default);
    device.broker = Some(id.broker);
    assign(&mut device.thing_name, id.thing_name);
    assign(&mut device.client_id, id.client_id);
    assign(&mut device.endpoint, id.endpoint);
    assign(&mut device.topic, id.topic);
    assign(&mut device.secret_name, id.secret_name);
    if let Some(policy) = id.policy_name {
        assign(&mut device.policy_name, policy);
    }
}

/// Sets one of the backend's conditions.
pub fn set_condition(
    status: &mut ThingStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
) {
    status.conditions.set(
        Condition::new(type_, ConditionStatus::from_bool(ok), reason, message),
        Utc::now(),
    );
}

/// Records a failed step in its condition (reason from the error's classification, message
/// with its causes) and hands the error back, for `map_err`.
pub fn record_failure<E: BackendError>(status: &mut ThingStatus, type_: &str, error: E) -> E {
    set_condition(
        status,
        type_,
        false,
        error.reason(),
        super::error::chain(&error),
    );
    error
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::conditions::types;

    #[derive(Debug, thiserror::Error)]
    #[error("mosquitto ensureRole")]
    struct Failed(#[source] std::io::Error);

    impl BackendError for Failed {
        fn is_retryable(&self) -> bool {
            true
        }

        fn reason(&self) -> &'static str {
            "BackendUnreachable"
        }
    }

    #[test]
    fn device_identity_is_recorded_and_policy_left_alone_when_not_given() {
        let mut status = ThingStatus::default();
        status
            .device
            .get_or_insert_with(Default::default)
            .policy_name = Some("p".into());
        let id = || DeviceIdentity {
            broker: Broker::Mosquitto,
            thing_name: "ns_dev",
            client_id: "ns_dev",
            endpoint: "broker:1883",
            topic: "things/ns/dev",
            secret_name: "dev-device",
            policy_name: None,
        };
        record_device(&mut status, id());
        let d = status.device.clone().unwrap();
        assert_eq!(d.broker, Some(Broker::Mosquitto));
        assert_eq!(d.thing_name.as_deref(), Some("ns_dev"));
        assert_eq!(d.client_id.as_deref(), Some("ns_dev"));
        assert_eq!(d.topic.as_deref(), Some("things/ns/dev"));
        assert_eq!(d.secret_name.as_deref(), Some("dev-device"));
        assert_eq!(d.policy_name.as_deref(), Some("p"));
        let before = status.clone();
        record_device(&mut status, id());
        assert_eq!(status, before);
    }

    #[test]
    fn a_failure_sets_its_condition_with_reason_and_cause() {
        let mut status = ThingStatus::default();
        let e = record_failure(
            &mut status,
            types::PROVISIONED,
            Failed(std::io::Error::other("no answer")),
        );
        assert_eq!(e.reason(), "BackendUnreachable");
        let c = status.conditions.get(types::PROVISIONED).unwrap();
        assert_eq!(c.status, ConditionStatus::False);
        assert_eq!(c.reason, "BackendUnreachable");
        assert_eq!(c.message, "mosquitto ensureRole: no answer");
    }
}
