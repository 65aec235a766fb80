//! The SDK clients, client-side rate limiting and retries, and the mapping of SDK errors to
//! [`BackendFailure`].
//!
//! The SDK's own retries are switched off: every attempt goes through a per-API-family token
//! bucket first, so a fleet of Things never exceeds AWS's published rates, and retries of
//! throttled or 5xx answers back off exponentially with full jitter. Errors keep the HTTP status
//! and the AWS error code only, never a body (bodies of some calls hold keys).

use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aws_sdk_iot::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::{interceptors::SharedInterceptor, orchestrator::HttpResponse};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;

use crate::{metrics::Metrics, provider::BackendFailure};

pub(crate) const BACKEND: &str = "aws";

/// API families that share a rate limit. AWS IoT Core's default per-account limits
/// (Service Quotas, "AWS IoT Core API throttling limits"): registry writes ~10-15 TPS,
/// describes in the hundreds, shadow HTTP calls in the thousands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// DescribeThing, ListThingPrincipals.
    ThingRead,
    /// CreateThing, UpdateThing, DeleteThing, Attach/DetachThingPrincipal.
    ThingWrite,
    /// Get/Create/DeletePolicy(Version), Attach/DetachPolicy, ListAttachedPolicies, ListTargetsForPolicy.
    Policy,
    /// Register/Create/Describe/Update/Delete/ListCertificate(s).
    Certificate,
    /// GetThingShadow, UpdateThingShadow.
    Shadow,
    /// DescribeEndpoint.
    Endpoint,
}

/// Requests per second per family. Defaults follow AWS's published per-account limits, kept a
/// little under them because other tools may share the account.
#[derive(Clone, Debug)]
pub struct RateLimits {
    pub thing_read: u32,
    pub thing_write: u32,
    pub policy: u32,
    pub certificate: u32,
    pub shadow: u32,
    pub endpoint: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            thing_read: 300,
            thing_write: 15,
            policy: 10,
            certificate: 10,
            shadow: 400,
            endpoint: 10,
        }
    }
}

impl RateLimits {
    /// Every family's rate times `factor` (at least 1 request per second).
    pub fn scaled(&self, factor: f64) -> Self {
        // A missing (zero) or nonsensical factor means the defaults.
        let factor = if factor.is_finite() && factor > 0.0 {
            factor
        } else {
            1.0
        };
        let f = |r: u32| ((r as f64) * factor).clamp(1.0, u32::MAX as f64) as u32;
        Self {
            thing_read: f(self.thing_read),
            thing_write: f(self.thing_write),
            policy: f(self.policy),
            certificate: f(self.certificate),
            shadow: f(self.shadow),
            endpoint: f(self.endpoint),
        }
    }
}

struct Limiters {
    thing_read: DefaultDirectRateLimiter,
    thing_write: DefaultDirectRateLimiter,
    policy: DefaultDirectRateLimiter,
    certificate: DefaultDirectRateLimiter,
    shadow: DefaultDirectRateLimiter,
    endpoint: DefaultDirectRateLimiter,
}

fn limiter(per_second: u32) -> DefaultDirectRateLimiter {
    let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
    // Burst of one second's worth: a fleet created at once starts at the full rate, no faster.
    RateLimiter::direct(Quota::per_second(rate).allow_burst(rate))
}

impl Limiters {
    fn new(r: &RateLimits) -> Self {
        Self {
            thing_read: limiter(r.thing_read),
            thing_write: limiter(r.thing_write),
            policy: limiter(r.policy),
            certificate: limiter(r.certificate),
            shadow: limiter(r.shadow),
            endpoint: limiter(r.endpoint),
        }
    }

    fn get(&self, f: Family) -> &DefaultDirectRateLimiter {
        match f {
            Family::ThingRead => &self.thing_read,
            Family::ThingWrite => &self.thing_write,
            Family::Policy => &self.policy,
            Family::Certificate => &self.certificate,
            Family::Shadow => &self.shadow,
            Family::Endpoint => &self.endpoint,
        }
    }
}

/// Retries of one call (throttling, 5xx, transport) before the reconcile gives up and the
/// controller's per-object backoff takes over.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// "Full jitter" (AWS Architecture Blog): uniformly random in [0, min(cap, base * 2^n)],
    /// which spreads a throttled fleet out best.
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.cap);
        rand::rng().random_range(Duration::ZERO..=exp)
    }
}

/// How a failed call is seen by the provider logic.
#[derive(Debug, Clone)]
pub enum CallError {
    NotFound,
    /// ResourceAlreadyExistsException (409); AWS names the existing resource.
    AlreadyExists {
        resource_id: Option<String>,
        resource_arn: Option<String>,
    },
    Failed(BackendFailure),
}

impl CallError {
    /// The AWS error code of a failed call, when there is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::NotFound => Some("ResourceNotFoundException"),
            CallError::AlreadyExists { .. } => Some("ResourceAlreadyExistsException"),
            CallError::Failed(BackendFailure::Service { code, .. }) => Some(code),
            CallError::Failed(_) => None,
        }
    }

    pub fn into_provider(self, operation: &'static str) -> BackendFailure {
        match self {
            CallError::Failed(e) => e,
            CallError::NotFound => {
                service_error(operation, "ResourceNotFoundException", 404, false)
            }
            CallError::AlreadyExists { .. } => {
                service_error(operation, "ResourceAlreadyExistsException", 409, false)
            }
        }
    }
}

fn service_error(
    operation: &'static str,
    code: &str,
    status: u16,
    retryable: bool,
) -> BackendFailure {
    BackendFailure::Service {
        backend: BACKEND,
        operation,
        code: code.to_string(),
        message: format!("HTTP {status}"),
        retryable,
    }
}

const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "TooManyRequestsException",
    "Throttling",
    "RequestLimitExceeded",
    "SlowDown",
];

enum Classified {
    Final(CallError),
    Retry(BackendFailure),
}

/// Maps an SDK error to what the provider acts on. Reads status and code only.
fn classify<E>(operation: &'static str, err: &SdkError<E, HttpResponse>) -> Classified
where
    E: ProvideErrorMetadata,
{
    match err {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("Unknown").to_string();
            if code == "ResourceNotFoundException" || status == 404 {
                return Classified::Final(CallError::NotFound);
            }
            if code == "ResourceAlreadyExistsException" {
                return Classified::Final(CallError::AlreadyExists {
                    resource_id: None,
                    resource_arn: None,
                });
            }
            if status == 429 || THROTTLING_CODES.contains(&code.as_str()) {
                return Classified::Retry(BackendFailure::Throttled {
                    backend: BACKEND,
                    operation,
                });
            }
            let retryable = status >= 500
                || matches!(
                    code.as_str(),
                    "InternalFailureException" | "ServiceUnavailableException"
                );
            let e = service_error(operation, &code, status, retryable);
            if retryable {
                Classified::Retry(e)
            } else {
                Classified::Final(CallError::Failed(e))
            }
        }
        SdkError::ResponseError(re) => {
            // An answer the SDK could not parse (moto answers unimplemented calls with HTML 500).
            let status = re.raw().status().as_u16();
            if status == 429 {
                return Classified::Retry(BackendFailure::Throttled {
                    backend: BACKEND,
                    operation,
                });
            }
            let e = service_error(operation, "UnparseableResponse", status, status >= 500);
            if status >= 500 {
                Classified::Retry(e)
            } else {
                Classified::Final(CallError::Failed(e))
            }
        }
        SdkError::TimeoutError(_) => Classified::Retry(BackendFailure::Transport {
            backend: BACKEND,
            operation,
            message: "timed out".into(),
        }),
        SdkError::DispatchFailure(d) => {
            let message = if d.is_timeout() {
                "timed out"
            } else if d.is_io() {
                "connection failed"
            } else {
                "request could not be sent"
            };
            Classified::Retry(BackendFailure::Transport {
                backend: BACKEND,
                operation,
                message: message.into(),
            })
        }
        _ => Classified::Final(CallError::Failed(service_error(
            operation,
            "ClientError",
            0,
            false,
        ))),
    }
}

/// Per-operation counters, for tests and the benchmark (cloud calls per Thing).
#[derive(Default, Debug)]
pub struct CallStats {
    pub attempts: AtomicU64,
    pub retries: AtomicU64,
    pub throttled: AtomicU64,
}

pub struct AwsClients {
    pub iot: aws_sdk_iot::Client,
    pub data: aws_sdk_iotdataplane::Client,
    limiters: Limiters,
    retry: RetryPolicy,
    metrics: Option<Arc<Metrics>>,
    pub stats: Arc<CallStats>,
}

/// Where and how to reach AWS.
#[derive(Clone, Debug, Default)]
pub struct ClientSettings {
    pub region: Option<String>,
    pub iot_endpoint: Option<String>,
    pub data_endpoint: Option<String>,
    pub rates: RateLimits,
    pub retry: RetryPolicy,
    /// Per-attempt timeout; a hung connection must not stall a reconcile forever.
    pub attempt_timeout: Option<Duration>,
    /// Static access key id and secret instead of the default chain (tests and benchmarks
    /// against moto run in-process, where the environment is shared).
    pub static_credentials: Option<(String, String)>,
}

impl AwsClients {
    /// Builds both clients on aws-config's default credential chain (env, profile, web identity).
    pub async fn new(
        settings: &ClientSettings,
        interceptors: Vec<SharedInterceptor>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some((id, secret)) = &settings.static_credentials {
            loader = loader.credentials_provider(aws_sdk_iot::config::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "thing-operator-static",
            ));
        }
        let shared = loader.load().await;
        let timeout = aws_smithy_types::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(settings.attempt_timeout.unwrap_or(Duration::from_secs(20)))
            .connect_timeout(Duration::from_secs(5))
            .build();
        let mut iot = aws_sdk_iot::config::Builder::from(&shared)
            .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
            .timeout_config(timeout.clone());
        if let Some(url) = &settings.iot_endpoint {
            iot = iot.endpoint_url(url);
        }
        let mut data = aws_sdk_iotdataplane::config::Builder::from(&shared)
            .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
            .timeout_config(timeout);
        if let Some(url) = &settings.data_endpoint {
            data = data.endpoint_url(url);
        }
        for i in interceptors {
            iot.push_interceptor(i.clone());
            data.push_interceptor(i);
        }
        Self {
            iot: aws_sdk_iot::Client::from_conf(iot.build()),
            data: aws_sdk_iotdataplane::Client::from_conf(data.build()),
            limiters: Limiters::new(&settings.rates),
            retry: settings.retry.clone(),
            metrics,
            stats: Arc::new(CallStats::default()),
        }
    }

    fn count(&self, operation: &str, outcome: &str) {
        self.stats.attempts.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.count_backend_call(BACKEND, operation, outcome);
        }
    }

    /// One AWS call: waits for the family's rate limiter, retries throttling, 5xx and transport
    /// failures with full-jitter backoff, and classifies the final error.
    pub async fn call<T, E, F, Fut>(
        &self,
        family: Family,
        operation: &'static str,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + AlreadyExistsIds,
    {
        self.call_with(family, operation, self.retry.max_attempts, f)
            .await
    }

    /// A call that is never repeated: for CreateKeysAndCertificate, where a lost answer means a
    /// certificate may exist that only the orphan sweep can find, and a retry would add another.
    pub async fn call_once<T, E, F, Fut>(
        &self,
        family: Family,
        operation: &'static str,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + AlreadyExistsIds,
    {
        self.call_with(family, operation, 1, f).await
    }

    async fn call_with<T, E, F, Fut>(
        &self,
        family: Family,
        operation: &'static str,
        max_attempts: u32,
        mut f: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + AlreadyExistsIds,
    {
        let mut attempt = 0u32;
        loop {
            self.limiters.get(family).until_ready().await;
            match f().await {
                Ok(v) => {
                    self.count(operation, "ok");
                    return Ok(v);
                }
                Err(err) => match classify(operation, &err) {
                    Classified::Final(CallError::AlreadyExists { .. }) => {
                        self.count(operation, "conflict");
                        let (resource_id, resource_arn) = match &err {
                            SdkError::ServiceError(se) => se.err().already_exists_ids(),
                            _ => (None, None),
                        };
                        return Err(CallError::AlreadyExists {
                            resource_id,
                            resource_arn,
                        });
                    }
                    Classified::Final(e) => {
                        self.count(
                            operation,
                            if matches!(e, CallError::NotFound) {
                                "not_found"
                            } else {
                                "error"
                            },
                        );
                        return Err(e);
                    }
                    Classified::Retry(e) => {
                        let throttled = matches!(e, BackendFailure::Throttled { .. });
                        self.count(operation, if throttled { "throttled" } else { "retryable" });
                        if throttled {
                            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                        }
                        attempt += 1;
                        if attempt >= max_attempts {
                            tracing::debug!(operation, error = %e, "giving up after {attempt} attempts");
                            return Err(CallError::Failed(e));
                        }
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        let delay = self.retry.delay(attempt);
                        tracing::debug!(operation, error = %e, ?delay, "retrying");
                        tokio::time::sleep(delay).await;
                    }
                },
            }
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
    use super::*;

    #[test]
    fn full_jitter_stays_under_the_cap() {
        let p = RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(800),
        };
        for attempt in 0..20 {
            assert!(p.delay(attempt) <= Duration::from_millis(800));
        }
    }
}
