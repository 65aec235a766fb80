//! How the Mosquitto backend fails: [`MosquittoError`], classified for the controller through
//! [`BackendError`]. Dynamic-security failures keep the plugin's error as their source; no
//! message carries a command body (which may hold a password).

use super::dynsec::DynsecError;
use crate::{
    credentials::{SecretError, ca::CaError},
    mqtt::topic::TopicError,
    provider::{BackendError, ThingKey},
};

#[derive(Debug, thiserror::Error)]
pub enum MosquittoError {
    /// A dynamic-security step (`operation`) failed: the broker refused a command, did not
    /// answer, or the client name belongs to someone else.
    #[error("mosquitto {operation}")]
    Dynsec {
        operation: &'static str,
        #[source]
        source: DynsecError,
    },
    /// The Thing's namespace, name or thing name cannot be placed into a topic (refused, never
    /// escaped: one topic must only ever belong to one Thing).
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The thing name is the operator's own broker account.
    #[error("thing name {0} is the operator's own broker account")]
    OperatorAccount(String),
    /// Another Thing of this operator already uses the thing name. The message names the name
    /// only: the other Thing may belong to another tenant (its key stays in `owner` for logs).
    #[error("thing name {thing_name} is already used by another Thing")]
    NameTaken { thing_name: String, owner: ThingKey },
    /// The operator's CA could not issue the device certificate.
    #[error("issuing the device certificate")]
    IssueCertificate(#[source] CaError),
    /// Reading or writing the device Secret failed.
    #[error(transparent)]
    Secret(#[from] SecretError),
}

impl MosquittoError {
    pub fn dynsec(operation: &'static str) -> impl FnOnce(DynsecError) -> Self {
        move |source| MosquittoError::Dynsec { operation, source }
    }
}

impl BackendError for MosquittoError {
    fn is_retryable(&self) -> bool {
        match self {
            MosquittoError::Dynsec { source, .. } => !matches!(
                source,
                DynsecError::Foreign(_) | DynsecError::ForeignRole(_)
            ),
            MosquittoError::Topic(_)
            | MosquittoError::OperatorAccount(_)
            | MosquittoError::NameTaken { .. } => false,
            MosquittoError::IssueCertificate(_) | MosquittoError::Secret(_) => true,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            MosquittoError::Dynsec { source, .. } => match source {
                DynsecError::Timeout { .. } | DynsecError::Send { .. } => "BackendUnreachable",
                DynsecError::Command { .. } => "BackendError",
                // Not ours: only a spec change (another name) helps.
                DynsecError::Foreign(_) | DynsecError::ForeignRole(_) => "Conflict",
            },
            MosquittoError::NameTaken { .. } => "Conflict",
            MosquittoError::Topic(_) | MosquittoError::OperatorAccount(_) => "BackendRejected",
            MosquittoError::Secret(e) => e.reason(),
            // Credential material for the device Secret, as the Secret's own failures.
            MosquittoError::IssueCertificate(_) => "SecretError",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_keeps_the_reasons_conditions_show() {
        let dynsec = |source| MosquittoError::dynsec("ensureClient")(source);
        let cases: Vec<(MosquittoError, &str, bool)> = vec![
            (
                dynsec(DynsecError::Timeout {
                    command: "getClient",
                    timeout: std::time::Duration::from_secs(10),
                }),
                "BackendUnreachable",
                true,
            ),
            (
                dynsec(DynsecError::Send {
                    command: "getClient",
                    message: "connection to the broker lost".into(),
                }),
                "BackendUnreachable",
                true,
            ),
            (
                dynsec(DynsecError::Command {
                    command: "createRole",
                    error: "Internal error".into(),
                }),
                "BackendError",
                true,
            ),
            (
                dynsec(DynsecError::Foreign("ns_dev".into())),
                "Conflict",
                false,
            ),
            (
                MosquittoError::OperatorAccount("admin".into()),
                "BackendRejected",
                false,
            ),
            (
                MosquittoError::NameTaken {
                    thing_name: "n".into(),
                    owner: ThingKey::new("a", "b"),
                },
                "Conflict",
                false,
            ),
            (
                MosquittoError::IssueCertificate(CaError::Generate("rng".into())),
                "SecretError",
                true,
            ),
        ];
        for (e, reason, retryable) in cases {
            assert_eq!(e.reason(), reason, "{e:?}");
            assert_eq!(e.is_retryable(), retryable, "{e:?}");
        }
        let e = crate::provider::ProviderError::from(dynsec(DynsecError::Foreign("ns_dev".into())));
        assert_eq!(
            e.to_string(),
            "mosquitto ensureClient: broker client ns_dev exists and is not managed by this Thing"
        );
    }
}
