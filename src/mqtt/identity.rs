//! Broker identities that act for one namespace.
//!
//! Observers publish and Subscribers subscribe with a broker account whose ACL covers only
//! their namespace's topic roots, never with the operator's admin account: validation keeps
//! specs inside their namespace, and the broker enforces it again, so a bug in validation
//! cannot become a cross-tenant read or write. The backend that administers the broker
//! (Mosquitto's dynamic-security plugin) implements [`NamespaceIdentities`]; forwarding uses it
//! without knowing how accounts are made.

use async_trait::async_trait;

/// How a namespace's connection logs in. The password lives only in memory: the account is
/// (re)keyed whenever a leader first needs it, which also shuts out an older leader.
#[derive(Clone)]
pub struct BrokerLogin {
    pub username: String,
    pub password: String,
    /// The client id the account is bound to: the same for every replica and restart, so the
    /// broker's persistent session (and the messages not yet acknowledged in it) carries over
    /// to the next leader. Only the leader connects.
    pub client_id: String,
}

impl std::fmt::Debug for BrokerLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLogin")
            .field("username", &self.username)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// Why a namespace has no broker identity. Never carries a password.
#[derive(Debug, Clone, thiserror::Error)]
#[error("broker identity of namespace {namespace}: {reason}")]
pub struct IdentityError {
    pub namespace: String,
    pub reason: String,
}

/// Issues the broker account that acts for a namespace.
#[async_trait]
pub trait NamespaceIdentities: Send + Sync {
    /// Makes sure `namespace` has an account whose ACL allows exactly the topic trees under
    /// `roots` (each a literal prefix without a trailing `/`), and returns a fresh login for it.
    async fn ensure(&self, namespace: &str, roots: &[String])
    -> Result<BrokerLogin, IdentityError>;
}
