//! What the client adds to azure_core's HTTP pipeline: the SAS policy (a token for the hub on
//! every attempt, from the connection string, renewed before it expires and re-read from its file
//! then, so a rotated policy key is picked up), a counter of attempts and throttled answers, and
//! the transport, which is the process's own reqwest (rustls) rather than a second HTTP stack.
//! The other way to authenticate, Entra workload identity, is in [`super::entra`].

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use azure_core::{
    Bytes,
    http::{
        AsyncRawResponse, Body, Context, HttpClient, Method, Request,
        headers::{HeaderName, HeaderValue, Headers},
        policies::{Policy, PolicyResult},
    },
};

use super::{error::AzureError, sas::ConnectionString};

/// Lifetime of a service SAS token; renewed when less than [`RENEW_BEFORE`] is left.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
const RENEW_BEFORE: Duration = Duration::from_secs(600);

/// Where the operator's hub credentials come from.
#[derive(Clone, Debug)]
pub enum CredentialSource {
    /// A file holding the connection string (a mounted Secret: re-read at every renewal, so a
    /// rotated policy key is picked up without a restart).
    File(PathBuf),
    /// Microsoft Entra workload identity, configured by the environment the AKS webhook sets
    /// (see [`super::entra`]).
    WorkloadIdentity,
}

/// Attempts and throttled answers since start (the throttling tests assert there was no storm).
#[derive(Debug, Default)]
pub struct CallStats {
    pub attempts: AtomicU64,
    pub throttled: AtomicU64,
}

/// Counts every attempt the retry policy makes.
#[derive(Debug)]
pub(super) struct CountingPolicy(pub(super) Arc<CallStats>);

#[async_trait]
impl Policy for CountingPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        self.0.attempts.fetch_add(1, Ordering::Relaxed);
        let response = next[0].send(ctx, request, &next[1..]).await?;
        if u16::from(response.status()) == 429 {
            self.0.throttled.fetch_add(1, Ordering::Relaxed);
        }
        Ok(response)
    }
}

/// Puts a SAS token for the hub on every attempt, renewing it before it expires.
pub(super) struct SasPolicy {
    /// The file holding the connection string.
    source: PathBuf,
    host_name: String,
    cached: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for SasPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasPolicy")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl SasPolicy {
    pub(super) fn new(source: PathBuf, host_name: String) -> Self {
        SasPolicy {
            source,
            host_name,
            cached: Mutex::new(None),
        }
    }

    fn load(&self) -> Result<ConnectionString, AzureError> {
        let path = &self.source;
        let text =
            std::fs::read_to_string(path).map_err(|source| AzureError::ConnectionStringFile {
                path: path.display().to_string(),
                source,
            })?;
        ConnectionString::parse(&text).map_err(AzureError::Credentials)
    }

    fn token(&self) -> Result<String, AzureError> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, renew_at)) = cached.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let cs = self.load()?;
        if !cs.host_name.eq_ignore_ascii_case(&self.host_name) {
            tracing::warn!(connection_string_host = %cs.host_name, hub = %self.host_name, "the connection string names another hub; signing for the configured one");
        }
        let expiry = chrono::Utc::now().timestamp() + TOKEN_LIFETIME.as_secs() as i64;
        let signed =
            cs.token_for(&self.host_name, expiry)
                .map_err(|source| AzureError::Transport {
                    op: "SignToken",
                    source,
                })?;
        *cached = Some((
            signed.clone(),
            Instant::now() + TOKEN_LIFETIME - RENEW_BEFORE,
        ));
        Ok(signed)
    }
}

#[async_trait]
impl Policy for SasPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let token = self.token().map_err(|e| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                crate::provider::error::chain(&e),
            )
        })?;
        request.insert_header(
            HeaderName::from_static("authorization"),
            HeaderValue::from(token),
        );
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// The pipeline's transport: the process's reqwest client (rustls).
#[derive(Debug)]
pub(super) struct ReqwestTransport(pub(super) reqwest::Client);

#[async_trait]
impl HttpClient for ReqwestTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        use azure_core::error::ErrorKind;
        let method = match request.method() {
            Method::Delete => reqwest::Method::DELETE,
            Method::Get => reqwest::Method::GET,
            Method::Head => reqwest::Method::HEAD,
            Method::Patch => reqwest::Method::PATCH,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            _ => {
                return Err(azure_core::Error::with_message(
                    ErrorKind::Other,
                    "an HTTP method the IoT Hub client does not use",
                ));
            }
        };
        let mut builder = self.0.request(method, request.url().clone());
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let body: Bytes = match request.body() {
            Body::Bytes(b) => b.clone(),
            Body::SeekableStream(_) => {
                return Err(azure_core::Error::with_message(
                    ErrorKind::Other,
                    "streaming bodies are not used by the IoT Hub client",
                ));
            }
        };
        let response = builder.body(body).send().await.map_err(|e| {
            let kind = if e.is_connect() {
                ErrorKind::Connection
            } else {
                ErrorKind::Io
            };
            azure_core::Error::with_error(kind, e.without_url(), "sending the request")
        })?;
        let status = response.status().as_u16();
        let mut headers = Headers::new();
        for (k, v) in response.headers() {
            if let Ok(v) = v.to_str() {
                headers.insert(
                    HeaderName::from(k.as_str().to_string()),
                    HeaderValue::from(v.to_string()),
                );
            }
        }
        let bytes = response.bytes().await.map_err(|e| {
            azure_core::Error::with_error(ErrorKind::Io, e.without_url(), "reading the answer")
        })?;
        Ok(AsyncRawResponse::from_bytes(status.into(), headers, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cs(path: &std::path::Path, key: &str) {
        std::fs::write(
            path,
            format!("HostName=h.azure-devices.net;SharedAccessKeyName=p;SharedAccessKey={key}"),
        )
        .unwrap();
    }

    #[test]
    fn tokens_are_reused_until_renewal_which_rereads_the_connection_string() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cs");
        write_cs(&path, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=");
        let policy = SasPolicy {
            source: path.clone(),
            host_name: "h.azure-devices.net".into(),
            cached: Mutex::new(None),
        };
        let first = policy.token().unwrap();
        assert!(first.starts_with("SharedAccessSignature sr=h.azure-devices.net&sig="));
        // The policy key is rotated in the Secret: the cached token is kept until renewal...
        write_cs(&path, "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=");
        assert_eq!(policy.token().unwrap(), first);
        // ...which happens before expiry and signs with the new key.
        let renew_at = policy.cached.lock().unwrap().as_ref().unwrap().1;
        assert!(renew_at <= Instant::now() + TOKEN_LIFETIME - RENEW_BEFORE);
        policy.cached.lock().unwrap().as_mut().unwrap().1 = Instant::now();
        let second = policy.token().unwrap();
        assert_ne!(second, first);
        assert!(!format!("{policy:?}").contains("QUJD"));
        // A broken file is an error that names the file, never its content.
        std::fs::write(&path, "HostName=h;SharedAccessKey=secret-ish").unwrap();
        policy.cached.lock().unwrap().as_mut().unwrap().1 = Instant::now();
        let e = policy.token().unwrap_err();
        assert!(!crate::provider::error::chain(&e).contains("secret-ish"));
    }
}
