//! How backend failures reach the controller.
//!
//! Each backend has its own error type that keeps the failing operation and the source error
//! (secret-operator's pattern). The controller never matches on a backend's variants: it asks
//! every error the same two questions through [`BackendError`] (retry or wait for a spec change?
//! which condition reason?), so a new backend plugs in without touching the controller.
//! Messages carry operations, status and error codes, never request or response bodies (which
//! may hold keys).
//!
//! A backend error's own message names what failed (`aws DescribeThing: throttled`, `reading
//! the device Secret x`) and keeps the cause as its `source`, not in its text. A condition or
//! an Event has room for one line only, so [`ProviderError`] renders the whole chain there
//! (`reading the device Secret x: ApiError: ...`), and [`chain`] does the same for a backend's
//! own conditions.

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

// The backend error's message followed by its causes: this is what conditions and Events show.
// `source()` below still hands out the same chain to code that walks it.
impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&Chain(&*self.0), f)
    }
}

/// An error and its causes on one line, `error: cause: cause`, as conditions show them.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    Chain(error).to_string()
}

struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading the device Secret s")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("forbidden")]
    struct Inner;

    impl BackendError for Outer {
        fn is_retryable(&self) -> bool {
            true
        }

        fn reason(&self) -> &'static str {
            "SecretError"
        }
    }

    #[test]
    fn provider_error_shows_the_chain_and_keeps_the_classification() {
        let e = ProviderError::from(Outer(Inner));
        assert_eq!(e.to_string(), "reading the device Secret s: forbidden");
        assert_eq!(e.reason(), "SecretError");
        assert!(e.is_retryable());
        assert!(e.downcast_ref::<Outer>().is_some());
        assert_eq!(
            std::error::Error::source(&e).unwrap().to_string(),
            "forbidden"
        );
    }
}
