//! A thin IoT Hub service client on `azure_core`'s HTTP pipeline (REST api-version 2021-04-12):
//! device identities (`PUT/GET/DELETE /devices/{id}`) and twins (`GET/PATCH /twins/{id}`) with
//! `If-Match` etags. No maintained Rust SDK exists for this API (`azure_iot_hub` is frozen on
//! azure_core 0.21), so this is the part of one the operator needs.
//!
//! The pipeline brings the Azure SDK's retry policy (429, 408 and 5xx retried with exponential
//! backoff and jitter, `Retry-After` honoured) and error types; this module adds the SAS policy
//! (a token from the connection string, renewed before it expires) or the Entra bearer-token
//! policy (workload identity, [`super::entra`]), a counter of attempts and
//! throttled answers, and client-side rate limits at IoT Hub's published quotas, so a fleet never
//! exceeds the hub's limits in the first place. The transport is the process's own reqwest
//! (rustls), not a second HTTP stack.
//!
//! The documents are in [`super::model`], the pipeline's own policies and transport in
//! [`super::pipeline`].

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use azure_core::http::{
    ClientOptions, Context, ExponentialRetryOptions, Method, Pipeline, RawResponse, Request,
    RetryOptions, Transport, Url,
    headers::{HeaderName, HeaderValue},
    policies::Policy,
};
use governor::{DefaultDirectRateLimiter, Jitter, Quota, RateLimiter};
use serde_json::Value;

pub use super::model::{Authentication, Device, SymmetricKeys, Thumbprints, Twin, TwinProperties};
pub use super::pipeline::{CallStats, CredentialSource};
use super::{
    error::{ApiErrorKind, AzureError},
    pipeline::{CountingPolicy, ReqwestTransport, SasPolicy},
};

pub const API_VERSION: &str = "2021-04-12";

/// IoT Hub's published per-unit quotas (S1): identity registry operations 100/min, twin reads
/// 100/s... per unit; the operator stays below them on its own. `units` scales all of them.
#[derive(Clone, Copy, Debug)]
pub struct HubQuotas {
    pub registry_per_minute: u32,
    pub twin_reads_per_second: u32,
    pub twin_updates_per_second: u32,
}

impl HubQuotas {
    pub fn s1(units: f64) -> Self {
        let scale = |n: f64| ((n * units.max(0.01)).round() as u32).max(1);
        HubQuotas {
            registry_per_minute: scale(100.0),
            twin_reads_per_second: scale(100.0),
            twin_updates_per_second: scale(50.0),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// The hub's host name, `<hub>.azure-devices.net`: the audience of every token.
    pub host_name: String,
    /// Where requests go when not `https://<host_name>` (tests: the loopback double over http).
    pub endpoint: Option<String>,
    pub credentials: CredentialSource,
    pub quotas: HubQuotas,
    /// Retries of one call (429/5xx) inside the pipeline before the reconcile sees the error.
    pub max_retries: u32,
}

/// Which quota an operation counts against.
#[derive(Clone, Copy)]
enum Quota3 {
    Registry,
    TwinRead,
    TwinUpdate,
}

pub struct HubClient {
    pipeline: Pipeline,
    base: Url,
    pub host_name: String,
    registry: DefaultDirectRateLimiter,
    twin_reads: DefaultDirectRateLimiter,
    twin_updates: DefaultDirectRateLimiter,
    pub stats: Arc<CallStats>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

fn limiter(per: Duration, n: u32) -> DefaultDirectRateLimiter {
    let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    // A burst of a tenth of the quota, refilled evenly: a reconcile storm after a restart
    // spreads out instead of hitting the hub at once.
    let burst = NonZeroU32::new((n.get() / 10).max(1)).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(per / n.get())
        .unwrap_or_else(|| Quota::per_second(n))
        .allow_burst(burst);
    RateLimiter::direct(quota)
}

impl HubClient {
    /// `metrics`: where calls are counted (`thing_operator_backend_calls_total{backend="azure"}`).
    pub fn new(
        settings: &ClientSettings,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Self, String> {
        let base = settings
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://{}", settings.host_name));
        let base = Url::parse(&base).map_err(|e| format!("IoT Hub endpoint {base:?}: {e}"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        let stats = Arc::new(CallStats::default());
        let options = ClientOptions {
            transport: Some(Transport::new(Arc::new(ReqwestTransport(http.clone())))),
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: azure_core::time::Duration::milliseconds(500),
                max_retries: settings.max_retries,
                max_total_elapsed: azure_core::time::Duration::seconds(30),
                max_delay: azure_core::time::Duration::seconds(10),
            }),
            ..ClientOptions::default()
        };
        let auth: Arc<dyn Policy> = match &settings.credentials {
            CredentialSource::File(path) => {
                Arc::new(SasPolicy::new(path.clone(), settings.host_name.clone()))
            }
            CredentialSource::WorkloadIdentity => Arc::new(super::entra::bearer_policy(
                Transport::new(Arc::new(ReqwestTransport(http.clone()))),
            )?),
        };
        let counter: Arc<dyn Policy> = Arc::new(CountingPolicy(stats.clone()));
        let pipeline = Pipeline::new(
            Some("thing-operator"),
            Some(env!("CARGO_PKG_VERSION")),
            options,
            Vec::new(),
            vec![auth, counter],
            None,
        );
        let q = settings.quotas;
        Ok(HubClient {
            pipeline,
            base,
            host_name: settings.host_name.clone(),
            registry: limiter(Duration::from_secs(60), q.registry_per_minute),
            twin_reads: limiter(Duration::from_secs(1), q.twin_reads_per_second),
            twin_updates: limiter(Duration::from_secs(1), q.twin_updates_per_second),
            stats,
            metrics,
        })
    }

    fn url(&self, collection: &str, id: &str) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map(|mut s| {
                s.clear().push(collection).push(id);
            })
            .ok();
        url.query_pairs_mut()
            .append_pair("api-version", API_VERSION);
        url
    }

    async fn send(
        &self,
        op: &'static str,
        quota: Quota3,
        method: Method,
        url: Url,
        if_match: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, AzureError> {
        let limiter = match quota {
            Quota3::Registry => &self.registry,
            Quota3::TwinRead => &self.twin_reads,
            Quota3::TwinUpdate => &self.twin_updates,
        };
        limiter
            .until_ready_with_jitter(Jitter::up_to(Duration::from_millis(50)))
            .await;
        let mut request = Request::new(url, method);
        request.insert_header(
            HeaderName::from_static("content-type"),
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        if let Some(etag) = if_match {
            let value = if etag == "*" {
                "*".to_string()
            } else {
                format!("\"{}\"", etag.trim_matches('"'))
            };
            request.insert_header(
                HeaderName::from_static("if-match"),
                HeaderValue::from(value),
            );
        }
        if let Some(body) = body {
            request.set_body(body);
        }
        // azure_core's pipeline turns a non-2xx answer into an `HttpResponse` error carrying
        // the raw response; only its status and `iothub-errorcode` are kept (the body is never
        // shown: messages must not carry response bodies).
        let answer = self
            .pipeline
            .send(&Context::new(), &mut request, None)
            .await;
        let result = Self::classify(op, answer);
        if let Some(m) = &self.metrics {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => match e.kind() {
                    Some(ApiErrorKind::NotFound) => "not_found",
                    Some(ApiErrorKind::Throttled) => "throttled",
                    _ => "error",
                },
            };
            m.count_backend_call("azure", op, outcome);
        }
        result
    }

    /// The pipeline's answer as this client's result.
    fn classify(
        op: &'static str,
        answer: azure_core::Result<RawResponse>,
    ) -> Result<RawResponse, AzureError> {
        match answer {
            Ok(response) => Ok(response),
            Err(error) => match error.kind() {
                azure_core::error::ErrorKind::HttpResponse {
                    status,
                    error_code,
                    raw_response,
                } => {
                    let status = u16::from(*status);
                    let code = raw_response
                        .as_ref()
                        .and_then(|r| {
                            r.headers()
                                .get_optional_str(&HeaderName::from_static("iothub-errorcode"))
                                .map(str::to_string)
                        })
                        .or_else(|| error_code.clone());
                    let kind = ApiErrorKind::classify(status, code.as_deref());
                    tracing::debug!(op, status, code = ?code, "iothub answered an error");
                    Err(AzureError::Api {
                        op,
                        status,
                        code,
                        kind,
                    })
                }
                // No token for the hub: the connection string or Entra refused (the error
                // carries Entra's description, never the assertion or a token).
                azure_core::error::ErrorKind::Credential => {
                    Err(AzureError::Authentication { op, source: error })
                }
                _ => Err(AzureError::Transport { op, source: error }),
            },
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        op: &'static str,
        response: RawResponse,
    ) -> Result<T, AzureError> {
        serde_json::from_slice(response.body().as_ref())
            .map_err(|source| AzureError::Decode { op, source })
    }

    /// The device, or `None` when there is none of that id.
    pub async fn get_device(&self, id: &str) -> Result<Option<Device>, AzureError> {
        let url = self.url("devices", id);
        match self
            .send("GetDevice", Quota3::Registry, Method::Get, url, None, None)
            .await
        {
            Ok(r) => Ok(Some(Self::decode("GetDevice", r)?)),
            Err(e) if e.kind() == Some(ApiErrorKind::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates the device (`if_match: None`; 409 when it exists) or replaces it (`Some(etag)`;
    /// 412 when the etag moved).
    pub async fn put_device(
        &self,
        device: &Device,
        if_match: Option<&str>,
    ) -> Result<Device, AzureError> {
        let op = if if_match.is_some() {
            "UpdateDevice"
        } else {
            "CreateDevice"
        };
        let mut body = device.clone();
        body.etag = None;
        let bytes =
            serde_json::to_vec(&body).map_err(|source| AzureError::Decode { op, source })?;
        let url = self.url("devices", &device.device_id);
        let r = self
            .send(
                op,
                Quota3::Registry,
                Method::Put,
                url,
                if_match,
                Some(bytes),
            )
            .await?;
        Self::decode(op, r)
    }

    /// Deletes the device if its etag is still `etag`. `Ok(false)`: it was already gone.
    pub async fn delete_device(&self, id: &str, etag: &str) -> Result<bool, AzureError> {
        let url = self.url("devices", id);
        match self
            .send(
                "DeleteDevice",
                Quota3::Registry,
                Method::Delete,
                url,
                Some(etag),
                None,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == Some(ApiErrorKind::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn get_twin(&self, id: &str) -> Result<Option<Twin>, AzureError> {
        let url = self.url("twins", id);
        match self
            .send("GetTwin", Quota3::TwinRead, Method::Get, url, None, None)
            .await
        {
            Ok(r) => Ok(Some(Self::decode("GetTwin", r)?)),
            Err(e) if e.kind() == Some(ApiErrorKind::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Merges `patch` (`tags`, `properties.desired`) into the twin if its etag is still `etag`.
    pub async fn patch_twin(
        &self,
        id: &str,
        patch: &Value,
        etag: &str,
    ) -> Result<Twin, AzureError> {
        let op = "UpdateTwin";
        let bytes =
            serde_json::to_vec(patch).map_err(|source| AzureError::Decode { op, source })?;
        let url = self.url("twins", id);
        let r = self
            .send(
                op,
                Quota3::TwinUpdate,
                Method::Patch,
                url,
                Some(etag),
                Some(bytes),
            )
            .await?;
        Self::decode(op, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_scale_with_hub_units() {
        let one = HubQuotas::s1(1.0);
        assert_eq!(one.registry_per_minute, 100);
        assert_eq!(one.twin_reads_per_second, 100);
        let three = HubQuotas::s1(3.0);
        assert_eq!(three.registry_per_minute, 300);
        assert_eq!(HubQuotas::s1(0.0).registry_per_minute, 1);
    }
}
