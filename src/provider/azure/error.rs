//! What an IoT Hub failure is and whether a retry may help. Messages carry the operation, the
//! HTTP status and IoT Hub's own `iothub-errorcode`, never request or response bodies (a device
//! or twin body may hold keys) and never the connection string.

use crate::{credentials::SecretError, provider::BackendError};

/// The kind of an IoT Hub answer, from its status and `iothub-errorcode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// 404 DeviceNotFound.
    NotFound,
    /// 409 DeviceAlreadyExists.
    AlreadyExists,
    /// 412 PreconditionFailed: the etag moved (someone else wrote in between).
    PreconditionFailed,
    /// 429 ThrottlingException (after the pipeline's own retries).
    Throttled,
    /// 401/403: the policy key or its rights.
    Unauthorized,
    /// 400: the hub refused what was asked (ArgumentInvalid, IotHubFormatError, ...).
    Rejected,
    /// 5xx and anything else.
    Server,
}

impl ApiErrorKind {
    pub fn classify(status: u16, code: Option<&str>) -> Self {
        match (status, code) {
            (404, _) | (_, Some("DeviceNotFound")) => Self::NotFound,
            (409, _) | (_, Some("DeviceAlreadyExists")) => Self::AlreadyExists,
            (412, _) | (_, Some("PreconditionFailed")) => Self::PreconditionFailed,
            (429, _) | (_, Some("ThrottlingException")) => Self::Throttled,
            (401 | 403, _) => Self::Unauthorized,
            (400..=499, _) => Self::Rejected,
            _ => Self::Server,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    #[error("iothub {op}: HTTP {status} {}", code.as_deref().unwrap_or("(no iothub-errorcode)"))]
    Api {
        op: &'static str,
        status: u16,
        code: Option<String>,
        kind: ApiErrorKind,
    },
    #[error("iothub {op}: no answer")]
    Transport {
        op: &'static str,
        #[source]
        source: azure_core::Error,
    },
    /// No credential for the hub: a connection string that cannot be read or used, or a token
    /// Microsoft Entra would not issue (workload identity).
    #[error("iothub {op}: no credential for the hub")]
    Authentication {
        op: &'static str,
        #[source]
        source: azure_core::Error,
    },
    #[error("iothub {op}: unreadable answer")]
    Decode {
        op: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("iothub credentials")]
    Credentials(#[source] super::sas::ConnectionStringError),
    #[error("reading the connection string file {path}")]
    ConnectionStringFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("generating the device certificate")]
    Key(#[source] crate::credentials::pki::KeyError),
    /// The spec asks for something IoT Hub cannot hold (key rules, twin limits, device ids).
    #[error("not valid for IoT Hub: {0}")]
    InvalidSpec(String),
    /// A device of that id exists and is not this Thing's.
    #[error("device {device_id} {why}")]
    NotOwner {
        device_id: String,
        why: &'static str,
    },
    /// The device id changed after provisioning: a new id would orphan the first device.
    #[error(
        "device id is immutable: provisioned as {recorded}, the spec now derives {wanted}; delete and re-create the Thing"
    )]
    DeviceIdChanged { recorded: String, wanted: String },
}

impl AzureError {
    pub fn kind(&self) -> Option<ApiErrorKind> {
        match self {
            AzureError::Api { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

impl BackendError for AzureError {
    fn is_retryable(&self) -> bool {
        match self {
            AzureError::Api { kind, .. } => !matches!(kind, ApiErrorKind::Rejected),
            AzureError::InvalidSpec(_) | AzureError::DeviceIdChanged { .. } => false,
            AzureError::Secret(SecretError::Conflict { .. }) => false,
            // Another Thing may release the device: look again with backoff.
            AzureError::NotOwner { .. } => true,
            _ => true,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            AzureError::Api { kind, .. } => match kind {
                ApiErrorKind::Throttled => "Throttled",
                ApiErrorKind::Unauthorized => "BackendUnauthorized",
                ApiErrorKind::Rejected => "BackendRejected",
                ApiErrorKind::AlreadyExists => "Conflict",
                _ => "BackendError",
            },
            AzureError::Transport { .. } => "BackendUnreachable",
            AzureError::Decode { .. } | AzureError::Key(_) => "BackendError",
            AzureError::Credentials(_)
            | AzureError::ConnectionStringFile { .. }
            | AzureError::Authentication { .. } => "BackendUnauthorized",
            AzureError::Secret(e) => e.reason(),
            AzureError::InvalidSpec(_) | AzureError::DeviceIdChanged { .. } => "InvalidSpec",
            AzureError::NotOwner { .. } => "Conflict",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_by_status_and_error_code() {
        use ApiErrorKind::*;
        let table = [
            (404, Some("DeviceNotFound"), NotFound),
            (409, Some("DeviceAlreadyExists"), AlreadyExists),
            (412, Some("PreconditionFailed"), PreconditionFailed),
            (429, Some("ThrottlingException"), Throttled),
            (401, Some("IotHubUnauthorizedAccess"), Unauthorized),
            (400, Some("ArgumentInvalid"), Rejected),
            (503, None, Server),
            (500, Some("ServerError"), Server),
        ];
        for (status, code, want) in table {
            assert_eq!(ApiErrorKind::classify(status, code), want, "{status}");
        }
        let e = |kind| AzureError::Api {
            op: "GetTwin",
            status: 429,
            code: Some("ThrottlingException".into()),
            kind,
        };
        assert!(e(Throttled).is_retryable());
        assert_eq!(e(Throttled).reason(), "Throttled");
        assert_eq!(
            e(Throttled).to_string(),
            "iothub GetTwin: HTTP 429 ThrottlingException"
        );
        assert!(!e(Rejected).is_retryable());
        assert!(!AzureError::InvalidSpec("x".into()).is_retryable());
        assert_eq!(AzureError::InvalidSpec("x".into()).reason(), "InvalidSpec");
    }
}
