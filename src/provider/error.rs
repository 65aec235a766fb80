//! How backend failures reach the controller.
//!
//! Each backend has its own error type that keeps the failing operation and the source error
//! (secret-operator's pattern). The controller never matches on a backend's variants: it asks
//! every error the same two questions through [`BackendError`] (retry or wait for a spec change?
//! which condition reason?), so a new backend plugs in without touching the controller.
//! Messages carry operations, status and error codes, never request or response bodies (which
//! may hold keys).

use std::fmt;

use crate::api::thing::Broker;

/// What the controller needs to know about any backend failure.
pub trait BackendError: std::error::Error + Send + Sync + 'static {
    /// Whether the same request may succeed later without a spec change (throttling, an
    /// unreachable backend, a 5xx). `false` parks the Thing until its spec changes.
    fn is_retryable(&self) -> bool;

    /// The `reason` of the condition this failure shows as (`Throttled`, `BackendError`, ...).
    fn reason(&self) -> &'static str;
}

/// A failure of any backend, as the controller sees it: classified through [`BackendError`],
/// with the backend's own error (and its source chain) kept inside.
pub struct ProviderError(Box<dyn BackendError>);

impl ProviderError {
    pub fn new(error: impl BackendError) -> Self {
        ProviderError(Box::new(error))
    }

    pub fn is_retryable(&self) -> bool {
        self.0.is_retryable()
    }

    pub fn reason(&self) -> &'static str {
        self.0.reason()
    }

    /// The backend's own error, for callers that know which backend they asked.
    pub fn downcast_ref<E: BackendError>(&self) -> Option<&E> {
        let inner: &(dyn std::error::Error + 'static) = &*self.0;
        inner.downcast_ref::<E>()
    }
}

impl<E: BackendError> From<E> for ProviderError {
    fn from(error: E) -> Self {
        ProviderError::new(error)
    }
}

// Transparent: the message and the source chain are the backend error's own.
impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::error::Error for ProviderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// The Thing asks for a backend this operator was not configured with.
#[derive(Debug, thiserror::Error)]
#[error("broker {0} is not configured in this operator")]
pub struct NotConfigured(pub Broker);

impl BackendError for NotConfigured {
    fn is_retryable(&self) -> bool {
        false
    }

    fn reason(&self) -> &'static str {
        "BackendNotConfigured"
    }
}

/// TRANSITIONAL: the single error enum both backends shared before each got its own type.
/// Being replaced by `AwsError` and `MosquittoError`; do not add uses.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendFailure {
    /// The backend asked us to slow down (HTTP 429, ThrottlingException).
    #[error("{backend} {operation}: throttled")]
    Throttled {
        backend: &'static str,
        operation: &'static str,
    },
    /// The backend answered with an error.
    #[error("{backend} {operation}: {code}: {message}")]
    Service {
        backend: &'static str,
        operation: &'static str,
        code: String,
        message: String,
        retryable: bool,
    },
    /// The backend could not be reached.
    #[error("{backend} {operation}: unreachable: {message}")]
    Transport {
        backend: &'static str,
        operation: &'static str,
        message: String,
    },
    /// The spec asks for something the backend refuses; retrying will not help until it changes.
    #[error("{0}")]
    Rejected(String),
    /// Reading or writing the device Secret failed.
    #[error("device secret: {0}")]
    Secret(String),
}

impl BackendError for BackendFailure {
    fn is_retryable(&self) -> bool {
        match self {
            BackendFailure::Throttled { .. }
            | BackendFailure::Transport { .. }
            | BackendFailure::Secret(_) => true,
            BackendFailure::Service { retryable, .. } => *retryable,
            BackendFailure::Rejected(_) => false,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            BackendFailure::Throttled { .. } => "Throttled",
            BackendFailure::Service { .. } => "BackendError",
            BackendFailure::Transport { .. } => "BackendUnreachable",
            BackendFailure::Rejected(_) => "BackendRejected",
            BackendFailure::Secret(_) => "SecretError",
        }
    }
}
