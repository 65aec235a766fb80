//! The operator's error type. Messages never carry secret material: provider errors are built
//! from status codes and error codes, never from request bodies.

use crate::api::validation::InvalidSpec;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] InvalidSpec),
    #[error("backend: {0}")]
    Provider(#[from] crate::provider::ProviderError),
    #[error("serialization: {context}: {source}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("configuration: {0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a context string to a kube result.
pub trait KubeContext<T> {
    fn kube_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> KubeContext<T> for Result<T, kube::Error> {
    fn kube_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Kube {
            context: context(),
            source,
        })
    }
}

impl Error {
    /// A short machine-readable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Provider(_) => "provider",
            Error::Json { .. } => "json",
            Error::MissingField(_) => "missing_field",
            Error::Config(_) => "config",
        }
    }
}
