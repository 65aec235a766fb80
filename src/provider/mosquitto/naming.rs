//! Names the Mosquitto backend derives: the role of a Thing's broker client, the mark that
//! says which Thing a client belongs to, the operator's own role, and the account that acts for
//! a namespace's Observers and Subscribers. Kept in one place: the
//! mark is how the operator recognises what it may change or delete on a shared broker.

use super::dynsec::OwnerMark;

/// The role that lets the operator's own account publish replies and state. One fixed name for
/// every operator sharing the account: the plugin disconnects every session of a client whose
/// roles change, so the grant must happen once per broker, not per process or topic prefix.
pub const SERVICE_ROLE: &str = "thing-operator-service";

/// What marks a broker client and its role (their `textname`) as belonging to a Thing: its
/// namespace, name and uid, so a Thing deleted and created again under the same name is a new
/// owner, as on AWS.
pub fn owner_mark(namespace: &str, name: &str, uid: &str) -> String {
    format!("thing-operator {namespace}/{name}/{uid}")
}

/// The mark earlier versions wrote (no uid): still recognised, and replaced on the next
/// reconcile.
pub fn legacy_owner_mark(namespace: &str, name: &str) -> String {
    format!("thing-operator {namespace}/{name}")
}

/// A Thing's marks, current and legacy, as [`OwnerMark`] wants them.
pub struct ThingMarks {
    current: String,
    legacy: String,
}

impl ThingMarks {
    pub fn of(namespace: &str, name: &str, uid: Option<&str>) -> Self {
        Self {
            current: owner_mark(namespace, name, uid.unwrap_or_default()),
            legacy: legacy_owner_mark(namespace, name),
        }
    }

    pub fn owner(&self) -> OwnerMark<'_> {
        OwnerMark {
            current: &self.current,
            legacy: Some(&self.legacy),
        }
    }
}

/// The role holding a Thing's ACLs.
pub fn role_name(thing_name: &str) -> String {
    format!("thing:{thing_name}")
}

/// The broker account (and its role) acting for `namespace`'s Observers and Subscribers. The
/// `/` keeps it out of every device's reach: a thingName may not contain one, so no Thing can
/// claim this name. The cluster id keeps clusters sharing a broker apart.
pub fn namespace_account(cluster_id: Option<&str>, namespace: &str) -> String {
    match cluster_id {
        Some(cluster) => format!("thing-operator/{cluster}/namespace/{namespace}"),
        None => format!("thing-operator/namespace/{namespace}"),
    }
}

/// What marks a broker client as a namespace's account.
pub fn namespace_mark(cluster_id: Option<&str>, namespace: &str) -> String {
    format!(
        "thing-operator namespace {}",
        namespace_account(cluster_id, namespace)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_accounts_cannot_be_a_thing_name_and_differ_per_cluster() {
        let plain = namespace_account(None, "team-a");
        assert!(
            plain.contains('/'),
            "thingName forbids '/', so no Thing can claim {plain}"
        );
        assert_ne!(plain, namespace_account(Some("eu1"), "team-a"));
        assert_ne!(plain, namespace_account(None, "team-b"));
        assert_ne!(
            namespace_mark(None, "team-a"),
            owner_mark("team-a", "x", "u")
        );
    }
}
