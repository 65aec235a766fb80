//! How AWS IoT failures are told apart: [`AwsError`], the outcome of one call ([`CallError`]),
//! and the classification of the SDK's errors into them.
//!
//! Only the HTTP status, the AWS error code and the request id are read from an error answer,
//! never its body or the service's message text: bodies of some calls hold keys
//! (CreateKeysAndCertificate), and messages may echo the request. An unreachable endpoint keeps
//! the connector's error as its source ([`ConnectorFailure`]).

use aws_sdk_iot::{
    error::{ProvideErrorMetadata, SdkError},
    operation::RequestId,
};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

use crate::{
    credentials::{SecretError, pki::KeyError},
    provider::BackendError,
};

/// The HTTP connector's account of a failed connection (`io error: ... Connection refused`),
/// as text: the SDK lends its error out but does not give it up. It names the connection,
/// never the request.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectorFailure(String);

/// Error codes AWS (and the SDK's HTTP layer) use for "slow down".
const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "TooManyRequestsException",
    "Throttling",
    "RequestLimitExceeded",
    "SlowDown",
];

/// 4xx codes AWS documents as transient: the same request succeeds once the other update has
/// landed (ConflictingResourceUpdate) or an operator fixed the IAM policy (access denied). They
/// are retried with backoff, never left waiting for a spec change.
const BUSY_CODES: &[&str] = &["ConflictingResourceUpdateException"];
/// Something is still attached: AWS detaches asynchronously, so a delete right after a detach may
/// see it still. Retried with backoff (not within the call: the flows answer it by listing).
const DELETE_CONFLICT: &str = "DeleteConflictException";
const ACCESS_DENIED_CODES: &[&str] = &[
    "AccessDeniedException",
    "AccessDenied",
    "UnauthorizedException",
];

/// What a transient 4xx means, for the condition message (the code alone does not say what to do).
fn hint(code: &str, status: u16) -> &'static str {
    if BUSY_CODES.contains(&code) {
        " (another update of the resource is in progress; retried with backoff)"
    } else if code == DELETE_CONFLICT {
        " (something is still attached, or a detach has not propagated yet; retried with backoff)"
    } else if ACCESS_DENIED_CODES.contains(&code) || status == 403 {
        " (the operator's IAM identity lacks a permission this call needs, see docs/aws.md; retried with backoff)"
    } else if status == 404 {
        " (not visible yet after its creation, or deleted outside the operator; retried with backoff)"
    } else {
        ""
    }
}

/// A failure of the AWS backend.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// AWS asked the operator to slow down (HTTP 429, ThrottlingException) through every retry.
    #[error("aws {operation}: throttled")]
    Throttled { operation: &'static str },
    /// AWS answered with an error.
    #[error("aws {operation}: {code}: HTTP {status}{}", hint(code, *status))]
    Service {
        operation: &'static str,
        code: String,
        status: u16,
        /// For AWS support; not in the message, which must stay the same across attempts.
        request_id: Option<String>,
        /// A 5xx, an internal failure or a transient 4xx: the same request may succeed later.
        retryable: bool,
    },
    /// A call whose time window was recorded could not start inside it (the rate limiter held
    /// it): it was not made.
    #[error("aws {operation}: CallWindowMissed: the call could not start in its recorded window")]
    CallWindowMissed { operation: &'static str },
    /// AWS could not be reached, or did not answer in time.
    #[error("aws {operation}: unreachable: {what}")]
    Unreachable {
        operation: &'static str,
        what: &'static str,
        #[source]
        source: Option<ConnectorFailure>,
    },
    /// A successful answer without the certificate id the flow needs.
    #[error("aws {operation}: MissingCertificateId: no certificate id in the answer")]
    MissingCertificateId { operation: &'static str },
    /// The shadow document AWS returned is not JSON.
    #[error("aws GetThingShadow: InvalidShadowDocument: the shadow document is not JSON")]
    InvalidShadowDocument(#[source] serde_json::Error),
    /// The certificate kept changing under the operator (deleted, revoked) while it repaired it.
    #[error("aws EnsureCertificate: NotConverged: certificate did not settle in three attempts")]
    NotConverged,
    /// Teardown waits until an interrupted issuance's certificate may be swept.
    #[error(
        "aws Teardown: OrphanGracePending: an interrupted certificate issuance is swept once its grace period has passed"
    )]
    OrphanGracePending,
    /// `spec.thingName` changed after provisioning: a new name would create a second thing and
    /// orphan the first.
    #[error(
        "thingName cannot change after provisioning: provisioned as {recorded}, the spec now gives {wanted}"
    )]
    ThingNameChanged { recorded: String, wanted: String },
    /// The thing exists and is not this Thing's: another Thing's owner record is on it, or none
    /// (and adopting unowned things is off). Names the device only, never the other owner.
    #[error("thing {thing_name} exists and {why}; it is left untouched")]
    NotOwner {
        thing_name: String,
        why: &'static str,
    },
    /// The policy of this Thing's name was made outside the operator (before the Thing).
    #[error("policy {policy_name} exists and {why}; it is left untouched")]
    PolicyNotOwner {
        policy_name: String,
        why: &'static str,
    },
    /// The policy template does not render into a policy document.
    #[error("{0}")]
    PolicyTemplate(String),
    /// The in-cluster key or certificate could not be generated.
    #[error("certificate generation failed")]
    KeyGeneration(#[source] KeyError),
    /// Reading or writing the device Secret (the journal of every certificate flow) failed.
    #[error(transparent)]
    Secret(#[from] SecretError),
}

impl BackendError for AwsError {
    fn is_retryable(&self) -> bool {
        match self {
            AwsError::Service { retryable, .. } => *retryable,
            AwsError::Throttled { .. }
            | AwsError::Unreachable { .. }
            | AwsError::MissingCertificateId { .. }
            | AwsError::InvalidShadowDocument(_)
            | AwsError::NotConverged
            | AwsError::OrphanGracePending
            | AwsError::CallWindowMissed { .. }
            | AwsError::Secret(_) => true,
            AwsError::ThingNameChanged { .. }
            | AwsError::NotOwner { .. }
            | AwsError::PolicyNotOwner { .. }
            | AwsError::PolicyTemplate(_)
            | AwsError::KeyGeneration(_) => false,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            AwsError::NotOwner { .. } | AwsError::PolicyNotOwner { .. } => "Conflict",
            AwsError::Throttled { .. } => "Throttled",
            AwsError::Service { code, status, .. }
                if ACCESS_DENIED_CODES.contains(&code.as_str()) || *status == 403 =>
            {
                "AccessDenied"
            }
            AwsError::Service { code, .. }
                if BUSY_CODES.contains(&code.as_str()) || code == DELETE_CONFLICT =>
            {
                "ResourceBusy"
            }
            AwsError::Service { status: 404, .. } => "NotFound",
            AwsError::Service { .. }
            | AwsError::CallWindowMissed { .. }
            | AwsError::MissingCertificateId { .. }
            | AwsError::InvalidShadowDocument(_)
            | AwsError::NotConverged
            | AwsError::OrphanGracePending => "BackendError",
            AwsError::Unreachable { .. } => "BackendUnreachable",
            AwsError::ThingNameChanged { .. }
            | AwsError::PolicyTemplate(_)
            | AwsError::KeyGeneration(_) => "BackendRejected",
            AwsError::Secret(e) => e.reason(),
        }
    }
}

impl AwsError {
    /// Whether the client repeats the call at once (with jittered backoff, a few times) rather
    /// than leaving it to the next reconcile: throttling, 5xx, transport failures and a
    /// conflicting update clear within seconds; a missing permission does not.
    pub fn retries_in_call(&self) -> bool {
        match self {
            AwsError::Throttled { .. } | AwsError::Unreachable { .. } => true,
            AwsError::Service {
                code,
                status,
                retryable,
                ..
            } => {
                *retryable
                    && *status != 403
                    && !ACCESS_DENIED_CODES.contains(&code.as_str())
                    && *status != 404
                    && code != DELETE_CONFLICT
            }
            _ => false,
        }
    }

    fn service(operation: &'static str, code: &str, status: u16, retryable: bool) -> Self {
        AwsError::Service {
            operation,
            code: code.to_string(),
            status,
            request_id: None,
            retryable,
        }
    }
}

/// How one failed call is seen by the provider logic: the two answers the flows act on, or a
/// failure.
#[derive(Debug)]
pub enum CallError {
    NotFound,
    /// ResourceAlreadyExistsException (409); AWS names the existing resource.
    AlreadyExists {
        resource_id: Option<String>,
        resource_arn: Option<String>,
    },
    Failed(AwsError),
}

impl CallError {
    /// The failure, for a flow that expected neither answer.
    pub fn into_error(self, operation: &'static str) -> AwsError {
        match self {
            CallError::Failed(e) => e,
            // The flow believed the resource exists: AWS is eventually consistent after a
            // create (an attachment right after CreateThing may see no thing), and a resource
            // deleted outside is recreated by the next full check. Either way: retry.
            CallError::NotFound => {
                AwsError::service(operation, "ResourceNotFoundException", 404, true)
            }
            CallError::AlreadyExists { .. } => {
                AwsError::service(operation, "ResourceAlreadyExistsException", 409, false)
            }
        }
    }

    /// Classifies an SDK error by HTTP status and error code (never the body).
    pub fn from_sdk<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + AlreadyExistsIds,
    {
        let failed = CallError::Failed;
        if let SdkError::DispatchFailure(d) = &err {
            let what = if d.is_timeout() {
                "timed out"
            } else if d.is_io() {
                "connection failed"
            } else {
                "request could not be sent"
            };
            return failed(AwsError::Unreachable {
                operation,
                what,
                source: d
                    .as_connector_error()
                    .map(|e| ConnectorFailure(crate::provider::error::chain(e))),
            });
        }
        match err {
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                let code = se.err().code().unwrap_or("Unknown");
                if code == "ResourceNotFoundException" || status == 404 {
                    return CallError::NotFound;
                }
                if code == "ResourceAlreadyExistsException" {
                    let (resource_id, resource_arn) = se.err().already_exists_ids();
                    return CallError::AlreadyExists {
                        resource_id,
                        resource_arn,
                    };
                }
                if status == 429 || THROTTLING_CODES.contains(&code) {
                    return failed(AwsError::Throttled { operation });
                }
                let retryable = status >= 500
                    || status == 403
                    || matches!(
                        code,
                        "InternalFailureException" | "ServiceUnavailableException"
                    )
                    || BUSY_CODES.contains(&code)
                    || code == DELETE_CONFLICT
                    || ACCESS_DENIED_CODES.contains(&code);
                failed(AwsError::Service {
                    operation,
                    code: code.to_string(),
                    status,
                    request_id: se.err().meta().request_id().map(str::to_string),
                    retryable,
                })
            }
            SdkError::ResponseError(re) => {
                // An answer the SDK could not parse (moto answers unimplemented calls with HTML
                // 500). Its parse error may quote the body: not kept.
                let status = re.raw().status().as_u16();
                if status == 429 {
                    return failed(AwsError::Throttled { operation });
                }
                failed(AwsError::service(
                    operation,
                    "UnparseableResponse",
                    status,
                    status >= 500,
                ))
            }
            SdkError::TimeoutError(_) => failed(AwsError::Unreachable {
                operation,
                what: "timed out",
                source: None,
            }),
            // The request could not be built: a bug or a bad configuration, not worth a retry.
            _ => failed(AwsError::service(operation, "ClientError", 0, false)),
        }
    }
}

/// The existing resource named by a ResourceAlreadyExistsException (RegisterCertificateWithoutCA
/// answers with the id of the certificate already registered, which makes a retry idempotent).
pub trait AlreadyExistsIds {
    fn already_exists_ids(&self) -> (Option<String>, Option<String>) {
        (None, None)
    }
}

macro_rules! no_ids {
    ($($t:ty),* $(,)?) => { $(impl AlreadyExistsIds for $t {})* };
}

macro_rules! with_ids {
    ($($t:ty),* $(,)?) => {
        $(impl AlreadyExistsIds for $t {
            fn already_exists_ids(&self) -> (Option<String>, Option<String>) {
                match self {
                    Self::ResourceAlreadyExistsException(e) => {
                        (e.resource_id().map(str::to_string), e.resource_arn().map(str::to_string))
                    }
                    _ => (None, None),
                }
            }
        })*
    };
}

use aws_sdk_iot::operation as iot_op;
use aws_sdk_iotdataplane::operation as data_op;

with_ids!(
    iot_op::create_thing::CreateThingError,
    iot_op::create_policy::CreatePolicyError,
    iot_op::register_certificate_without_ca::RegisterCertificateWithoutCAError,
);

no_ids!(
    iot_op::describe_thing::DescribeThingError,
    iot_op::update_thing::UpdateThingError,
    iot_op::delete_thing::DeleteThingError,
    iot_op::get_policy::GetPolicyError,
    iot_op::create_policy_version::CreatePolicyVersionError,
    iot_op::list_policy_versions::ListPolicyVersionsError,
    iot_op::delete_policy_version::DeletePolicyVersionError,
    iot_op::delete_policy::DeletePolicyError,
    iot_op::create_keys_and_certificate::CreateKeysAndCertificateError,
    iot_op::describe_certificate::DescribeCertificateError,
    iot_op::update_certificate::UpdateCertificateError,
    iot_op::delete_certificate::DeleteCertificateError,
    iot_op::list_certificates::ListCertificatesError,
    iot_op::attach_policy::AttachPolicyError,
    iot_op::detach_policy::DetachPolicyError,
    iot_op::list_attached_policies::ListAttachedPoliciesError,
    iot_op::list_targets_for_policy::ListTargetsForPolicyError,
    iot_op::attach_thing_principal::AttachThingPrincipalError,
    iot_op::detach_thing_principal::DetachThingPrincipalError,
    iot_op::list_thing_principals::ListThingPrincipalsError,
    iot_op::list_principal_things::ListPrincipalThingsError,
    iot_op::describe_endpoint::DescribeEndpointError,
    data_op::get_thing_shadow::GetThingShadowError,
    data_op::update_thing_shadow::UpdateThingShadowError,
    data_op::delete_thing_shadow::DeleteThingShadowError,
);

#[cfg(test)]
mod tests {
    use aws_sdk_iot::{
        operation::{create_thing::CreateThingError, describe_thing::DescribeThingError},
        types::error::ResourceAlreadyExistsException,
    };
    use aws_smithy_runtime_api::{
        client::result::ConnectorError,
        http::{Response, StatusCode},
    };
    use aws_smithy_types::{body::SdkBody, error::ErrorMetadata};

    use super::*;

    fn answer(status: u16, code: &str) -> SdkError<DescribeThingError, HttpResponse> {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message("body text: KEY-MATERIAL")
            .custom("aws_request_id", "req-1")
            .build();
        let raw = Response::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        SdkError::service_error(DescribeThingError::generic(meta), raw)
    }

    /// (status, code) -> (outcome, condition reason, retryable)
    #[test]
    fn sdk_errors_are_classified_by_status_and_code() {
        let cases = [
            (404, "Whatever", "not_found", "", false),
            (400, "ResourceNotFoundException", "not_found", "", false),
            (429, "Whatever", "failed", "Throttled", true),
            (400, "ThrottlingException", "failed", "Throttled", true),
            (400, "TooManyRequestsException", "failed", "Throttled", true),
            (
                503,
                "ServiceUnavailableException",
                "failed",
                "BackendError",
                true,
            ),
            (
                500,
                "InternalFailureException",
                "failed",
                "BackendError",
                true,
            ),
            (502, "Whatever", "failed", "BackendError", true),
            (
                400,
                "InvalidRequestException",
                "failed",
                "BackendError",
                false,
            ),
            (403, "UnauthorizedException", "failed", "AccessDenied", true),
            (403, "AccessDeniedException", "failed", "AccessDenied", true),
            (
                409,
                "ConflictingResourceUpdateException",
                "failed",
                "ResourceBusy",
                true,
            ),
        ];
        for (status, code, outcome, reason, retryable) in cases {
            let got = CallError::from_sdk("DescribeThing", answer(status, code));
            match (outcome, got) {
                ("not_found", CallError::NotFound) => {}
                ("failed", CallError::Failed(e)) => {
                    assert_eq!(e.reason(), reason, "{status} {code}");
                    assert_eq!(e.is_retryable(), retryable, "{status} {code}");
                    // Status and code only: the service's message (from the body) stays out.
                    assert!(!e.to_string().contains("KEY-MATERIAL"), "{e}");
                    assert!(!format!("{e:?}").contains("KEY-MATERIAL"), "{e:?}");
                }
                (_, got) => panic!("{status} {code}: {got:?}"),
            }
        }
        // A conflicting update clears in seconds: repeated within the call. A missing permission
        // waits for an operator: left to the controller's backoff, with a message saying so.
        let failed = |status, code| match CallError::from_sdk("AttachPolicy", answer(status, code))
        {
            CallError::Failed(e) => e,
            other => panic!("{other:?}"),
        };
        assert!(failed(409, "ConflictingResourceUpdateException").retries_in_call());
        let denied = failed(403, "AccessDeniedException");
        assert!(!denied.retries_in_call());
        assert!(denied.to_string().contains("IAM"), "{denied}");
        assert!(!failed(400, "InvalidRequestException").retries_in_call());
        let attached = failed(409, "DeleteConflictException");
        assert!(attached.is_retryable() && !attached.retries_in_call());
        assert_eq!(attached.reason(), "ResourceBusy");
        let gone = CallError::NotFound.into_error("AttachThingPrincipal");
        assert!(gone.is_retryable() && !gone.retries_in_call());
        assert_eq!(gone.reason(), "NotFound");

        let CallError::Failed(e) = CallError::from_sdk("DescribeThing", answer(400, "Bad")) else {
            panic!("not a failure");
        };
        assert_eq!(e.to_string(), "aws DescribeThing: Bad: HTTP 400");
        assert!(matches!(e, AwsError::Service { request_id: Some(ref id), .. } if id == "req-1"));
    }

    #[test]
    fn already_exists_names_the_existing_resource() {
        let e = ResourceAlreadyExistsException::builder()
            .message("exists")
            .resource_id("cert-1")
            .resource_arn("arn:cert-1")
            .meta(
                ErrorMetadata::builder()
                    .code("ResourceAlreadyExistsException")
                    .build(),
            )
            .build();
        let raw = Response::new(StatusCode::try_from(409).unwrap(), SdkBody::empty());
        let err = SdkError::service_error(CreateThingError::ResourceAlreadyExistsException(e), raw);
        match CallError::from_sdk("CreateThing", err) {
            CallError::AlreadyExists {
                resource_id,
                resource_arn,
            } => {
                assert_eq!(resource_id.as_deref(), Some("cert-1"));
                assert_eq!(resource_arn.as_deref(), Some("arn:cert-1"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transport_failures_keep_the_connector_error_and_are_retried() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err: SdkError<DescribeThingError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::io(Box::new(refused)));
        let CallError::Failed(e) = CallError::from_sdk("DescribeThing", err) else {
            panic!("not a failure");
        };
        assert_eq!(e.reason(), "BackendUnreachable");
        assert!(e.is_retryable());
        assert_eq!(
            crate::provider::error::chain(&e),
            "aws DescribeThing: unreachable: connection failed: io error: refused"
        );
        let err: SdkError<DescribeThingError, HttpResponse> =
            SdkError::timeout_error("attempt timeout");
        let CallError::Failed(e) = CallError::from_sdk("DescribeThing", err) else {
            panic!("not a failure");
        };
        assert_eq!(e.to_string(), "aws DescribeThing: unreachable: timed out");
        assert!(e.is_retryable());
    }

    #[test]
    fn unparseable_answers_and_unbuildable_requests() {
        let raw = |s| Response::new(StatusCode::try_from(s).unwrap(), SdkBody::from("<html>"));
        let parse = |s| {
            let err: SdkError<DescribeThingError, HttpResponse> =
                SdkError::response_error("expected JSON: <html>", raw(s));
            match CallError::from_sdk("DescribeThing", err) {
                CallError::Failed(e) => e,
                other => panic!("{other:?}"),
            }
        };
        let e = parse(500);
        assert_eq!(
            e.to_string(),
            "aws DescribeThing: UnparseableResponse: HTTP 500"
        );
        assert!(e.is_retryable());
        assert!(!parse(400).is_retryable());
        assert_eq!(parse(429).reason(), "Throttled");
        let err: SdkError<DescribeThingError, HttpResponse> =
            SdkError::construction_failure("missing thing name");
        let CallError::Failed(e) = CallError::from_sdk("DescribeThing", err) else {
            panic!("not a failure");
        };
        assert!(!e.is_retryable());
        assert_eq!(e.reason(), "BackendError");
    }
}
