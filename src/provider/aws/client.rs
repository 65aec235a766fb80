//! The SDK clients, client-side rate limiting and retries.
//!
//! The SDK's own retries are switched off: every attempt goes through a per-API-family token
//! bucket first, so a fleet of Things never exceeds AWS's published rates, and retries of
//! throttled or 5xx answers back off exponentially with full jitter. Which answers are worth a
//! retry is the error's own business ([`super::error`]).

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

use super::error::{AlreadyExistsIds, AwsError, CallError};
use crate::metrics::Metrics;

/// The backend label of metrics.
const BACKEND: &str = "aws";

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
    attempt_timeout: Duration,
}

/// Per-attempt timeout when the settings give none.
const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

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
        let attempt_timeout = settings.attempt_timeout.unwrap_or(DEFAULT_ATTEMPT_TIMEOUT);
        let timeout = aws_smithy_types::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(attempt_timeout)
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
            attempt_timeout,
        }
    }

    /// The longest one attempt of a call may take before the SDK gives up on it.
    pub fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
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

    /// [`Self::call_once`] that is not made at all when the rate limiter lets it start only
    /// after `start_by`: the caller has recorded the time window the call falls into (the orphan
    /// sweep relies on it), and a call outside it would create a certificate nobody can find.
    pub async fn call_once_by<T, E, F, Fut>(
        &self,
        family: Family,
        operation: &'static str,
        start_by: std::time::Instant,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + AlreadyExistsIds,
    {
        self.limiters.get(family).until_ready().await;
        if std::time::Instant::now() > start_by {
            return Err(CallError::Failed(AwsError::CallWindowMissed { operation }));
        }
        self.call_with_limit(family, operation, 1, false, f).await
    }

    async fn call_with<T, E, F, Fut>(
        &self,
        family: Family,
        operation: &'static str,
        max_attempts: u32,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + AlreadyExistsIds,
    {
        self.call_with_limit(family, operation, max_attempts, true, f)
            .await
    }

    /// `limit_first`: whether the first attempt waits for the rate limiter (a caller that
    /// already waited says no).
    async fn call_with_limit<T, E, F, Fut>(
        &self,
        family: Family,
        operation: &'static str,
        max_attempts: u32,
        limit_first: bool,
        mut f: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + AlreadyExistsIds,
    {
        let mut attempt = 0u32;
        loop {
            if attempt > 0 || limit_first {
                self.limiters.get(family).until_ready().await;
            }
            let err = match f().await {
                Ok(v) => {
                    self.count(operation, "ok");
                    return Ok(v);
                }
                Err(err) => CallError::from_sdk(operation, err),
            };
            let e = match err {
                CallError::Failed(e) if e.retries_in_call() => e,
                final_answer => {
                    let outcome = match &final_answer {
                        CallError::NotFound => "not_found",
                        CallError::AlreadyExists { .. } => "conflict",
                        CallError::Failed(_) => "error",
                    };
                    self.count(operation, outcome);
                    return Err(final_answer);
                }
            };
            let throttled = matches!(e, AwsError::Throttled { .. });
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
    }
}

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
