//! The operator's error type. Messages never carry secret material: provider errors are built
//! from status codes and error codes, never from request bodies.

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
    /// Why the reconcile failed, for the `reason` label of the failure metric: a backend's
    /// condition reason, or what part of the operator's own work failed.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "KubernetesApi",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "Finalizer",
            },
            Error::Provider(e) => e.reason(),
            Error::Json { .. } => "Serialization",
            Error::MissingField(_) => "MissingField",
        }
    }
}
