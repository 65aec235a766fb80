//! Which Thing owns an AWS thing, recorded where the thing lives: the attribute
//! [`OWNER_ATTRIBUTE`] = `<namespace>/<name>/<uid>`, set in the same CreateThing call that makes
//! the thing (so a crash can never leave a thing of ours without the record). The AWS account is
//! shared with every namespace, other clusters and other tools, so before this operator adopts,
//! changes or deletes a thing it checks the record. Policies and certificates hang off the thing
//! (the policy is named after it, certificates are attached to it), so the thing's record guards
//! them too. Pure rules; the calls are in `provision.rs` and `teardown.rs`.

use std::collections::HashMap;

/// The attribute that names a thing's owner. Reserved: validation refuses it in a spec.
pub use crate::api::validation::OWNER_ATTRIBUTE;

pub use crate::provider::ownership::{Claim, owner_record};

/// The rule for an existing thing with `attributes` and `arn`: proven ours without a record
/// when this Thing's status recorded the thing's ARN (written by an operator version from before
/// owner records).
pub fn claim(
    attributes: &HashMap<String, String>,
    arn: &str,
    ours: &str,
    recorded_arn: Option<&str>,
    adopt_unowned: bool,
) -> Claim {
    crate::provider::ownership::claim(
        attributes.get(OWNER_ATTRIBUTE).map(String::as_str),
        ours,
        recorded_arn == Some(arn),
        adopt_unowned,
        "has no owner record (created outside this operator; --aws-adopt-unowned allows adopting it)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(owner: Option<&str>) -> HashMap<String, String> {
        owner
            .map(|o| HashMap::from([(OWNER_ATTRIBUTE.to_string(), o.to_string())]))
            .unwrap_or_default()
    }

    #[test]
    fn only_the_recorded_owner_or_a_sanctioned_adoption_may_touch_a_thing() {
        let ours = owner_record("team-a", "lamp", "uid-1");
        let arn = "arn:aws:iot:us-east-1:1:thing/team-a_lamp";
        let table = [
            (attrs(Some(&ours)), None, false, Claim::Ours),
            // Same namespace and name, another uid: a deleted and re-created Thing is a new owner.
            (
                attrs(Some("team-a/lamp/uid-0")),
                Some(arn),
                false,
                Claim::Refuse("belongs to another Thing"),
            ),
            (
                attrs(Some("team-b/squat/uid-9")),
                None,
                true,
                Claim::Refuse("belongs to another Thing"),
            ),
            (attrs(None), Some(arn), false, Claim::Adopt),
            (
                attrs(None),
                Some("arn:aws:iot:us-east-1:1:thing/other"),
                false,
                claim(&attrs(None), arn, &ours, None, false),
            ),
            (attrs(None), None, true, Claim::Adopt),
        ];
        for (attributes, recorded, adopt, want) in table {
            assert_eq!(
                claim(&attributes, arn, &ours, recorded, adopt),
                want,
                "{attributes:?} {recorded:?} {adopt}"
            );
        }
        assert!(matches!(
            claim(&attrs(None), arn, &ours, None, false),
            Claim::Refuse(_)
        ));
    }
}
