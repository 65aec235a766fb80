//! Names the Mosquitto backend derives: the role of a Thing's broker client, the mark that
//! says which Thing a client belongs to, and the operator's own role. Kept in one place: the
//! mark is how the operator recognises what it may change or delete on a shared broker.

/// The role that lets the operator's own account publish replies and state. One fixed name for
/// every operator sharing the account: the plugin disconnects every session of a client whose
/// roles change, so the grant must happen once per broker, not per process or topic prefix.
pub const SERVICE_ROLE: &str = "thing-operator-service";

/// What marks a broker client (its `textname`) as belonging to a Thing.
pub fn owner_mark(namespace: &str, name: &str) -> String {
    format!("thing-operator {namespace}/{name}")
}

/// The role holding a Thing's ACLs.
pub fn role_name(thing_name: &str) -> String {
    format!("thing:{thing_name}")
}
