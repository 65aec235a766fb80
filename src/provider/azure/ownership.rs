//! Which Thing owns an IoT Hub device, recorded where the device lives: the twin tag
//! [`OWNER_TAG`] = `<namespace>/<name>/<uid>`, the same record as the AWS backend's. A hub is
//! shared with every namespace, other clusters and other tools, so before the operator adopts,
//! changes or deletes a device it checks the record.
//!
//! IoT Hub cannot set tags in the call that creates a device, so there is a moment when a
//! device of ours has no record yet (a crash between the two calls). The proof of ownership then
//! is the certificate: the device's registered thumbprint is the one of the certificate in this
//! Thing's own Secret, whose key was generated in the operator and never left the cluster. No one
//! else can have registered it. Pure rules; the calls are in `reconcile.rs`.

use serde_json::{Map, Value};

use super::twin::OWNER_TAG;

pub use crate::provider::ownership::Claim;

/// The rule for an existing device with twin `tags`. `holds_credential`: the device's registered
/// credential (thumbprint, or symmetric key) is the one in this Thing's own Secret, which proves
/// an unrecorded device ours (a crash between creating the device and tagging it).
pub fn claim(
    tags: &Map<String, Value>,
    ours: &str,
    holds_credential: bool,
    adopt_unowned: bool,
) -> Claim {
    crate::provider::ownership::claim(
        tags.get(OWNER_TAG).and_then(Value::as_str),
        ours,
        holds_credential,
        adopt_unowned,
        "has no owner record (created outside this operator; --azure-adopt-unowned allows adopting it)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_recorded_owner_the_holder_of_the_credential_or_a_sanctioned_adoption_may_touch_a_device()
     {
        let ours = "team-a/lamp/uid-1";
        let tags = |owner: Option<&str>| {
            owner
                .map(|o| json!({ OWNER_TAG: o }).as_object().cloned().unwrap())
                .unwrap_or_default()
        };
        let other = Claim::Refuse("belongs to another Thing");
        let table = [
            (tags(Some(ours)), false, false, Claim::Ours),
            // A deleted and re-created Thing (same name, new uid) is a new owner.
            (tags(Some("team-a/lamp/uid-0")), true, true, other.clone()),
            (tags(Some("team-b/x/uid-9")), false, true, other),
            (tags(None), true, false, Claim::Adopt),
            (tags(None), false, true, Claim::Adopt),
        ];
        for (t, holds, adopt, want) in table {
            assert_eq!(claim(&t, ours, holds, adopt), want, "{t:?} {holds} {adopt}");
        }
        assert!(matches!(
            claim(&tags(None), ours, false, false),
            Claim::Refuse(_)
        ));
    }
}
