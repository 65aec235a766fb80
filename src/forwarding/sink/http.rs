//! The HTTP sink: POSTs an Observer's CloudEvents to a URL its spec names, with headers from an
//! optional Secret, and tells retryable answers from final ones.
//!
//! Kept apart because it is where a user-chosen destination is reached from inside the cluster:
//! the one place that builds the HTTP client and reads the header Secret. The client is the
//! [`EgressPolicy`]'s guarded one (every name checked when it resolves, no redirects, no proxy),
//! and a destination the policy refuses is a permanent failure, never a request. A header Secret
//! must opt in with the label [`HEADERS_OPT_IN_LABEL`]: otherwise anyone allowed to create an
//! Observer could send any Secret of the namespace (one they may not read) to a URL of their
//! choosing.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use reqwest::{
    StatusCode,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use serde_json::Value;

use crate::{
    api::observer::HttpSink,
    egress::{EgressPolicy, Refusal},
    forwarding::DeliveryError,
};

/// The label a Secret needs (value `"true"`) before an Observer may send its keys as headers.
pub const HEADERS_OPT_IN_LABEL: &str = "iot.thing-operator.dev/http-sink-headers";

/// A request may take this long before it counts as failed (and is retried).
const TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP destination, ready to post to.
pub struct HttpEndpoint {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
}

impl HttpEndpoint {
    /// Reads the header Secret (in `namespace`) and builds the client for `spec`.
    pub async fn build(
        spec: &HttpSink,
        namespace: &str,
        kube: &Client,
        egress: &Arc<EgressPolicy>,
    ) -> Result<Self, DeliveryError> {
        // A literal address (or `localhost`) never reaches the resolver: checked here.
        let url = url::Url::parse(&spec.url)
            .map_err(|e| DeliveryError::permanent(format!("sink.http.url: {e}")))?;
        egress
            .check_url(&url)
            .map_err(|e| DeliveryError::refused(format!("destination refused: {e}")))?;
        let headers = match &spec.headers_secret {
            Some(s) => headers_from_secret(kube, namespace, s).await?,
            None => HeaderMap::new(),
        };
        let client = egress
            .http_client(reqwest::Client::builder().timeout(TIMEOUT))
            .map_err(|e| DeliveryError::permanent(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            client,
            url: spec.url.clone(),
            headers,
        })
    }

    /// POSTs one CloudEvent (structured mode).
    pub async fn post(&self, event: &Value) -> Result<(), DeliveryError> {
        let url = &self.url;
        let resp = self
            .client
            .post(url)
            .headers(self.headers.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/cloudevents+json; charset=utf-8",
            )
            .json(event)
            .send()
            .await
            .map_err(|e| send_failure(url, e))?;
        answer(url, resp.status())
    }
}

/// A request that got no answer: refused by the egress policy (for good: the name resolves
/// only to addresses sinks may not reach), or a network failure (may pass later).
fn send_failure(url: &str, e: reqwest::Error) -> DeliveryError {
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        if let Some(refusal) = cause.downcast_ref::<Refusal>() {
            return DeliveryError::refused(format!("POST {url}: destination refused: {refusal}"));
        }
        source = cause.source();
    }
    // Without the URL: reqwest's message would repeat it, and a query may hold a token.
    DeliveryError::retryable(format!("POST {url}: {}", e.without_url()))
}

/// What an HTTP answer means: 2xx delivered; 408, 429 and 5xx may pass later; anything else is
/// the receiver refusing this event, which repeating will not change.
fn answer(url: &str, code: StatusCode) -> Result<(), DeliveryError> {
    if code.is_success() {
        Ok(())
    } else if code.is_server_error()
        || code == StatusCode::TOO_MANY_REQUESTS
        || code == StatusCode::REQUEST_TIMEOUT
    {
        Err(DeliveryError::retryable(format!("POST {url}: HTTP {code}")))
    } else {
        Err(DeliveryError::permanent(format!("POST {url}: HTTP {code}")))
    }
}

/// Reads an Observer's header Secret into request headers: each key a header name. Values are
/// marked sensitive so they never show in logs or debug output.
async fn headers_from_secret(
    client: &Client,
    namespace: &str,
    secret: &str,
) -> Result<HeaderMap, DeliveryError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get(secret)
        .await
        .map_err(|e| DeliveryError::retryable(format!("reading header Secret {secret}: {e}")))?;
    let opted_in = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(HEADERS_OPT_IN_LABEL))
        .is_some_and(|v| v == "true");
    if !opted_in {
        return Err(DeliveryError::permanent(format!(
            "header Secret {} does not opt in: it needs the label {HEADERS_OPT_IN_LABEL}=true",
            secret.metadata.name.as_deref().unwrap_or_default()
        )));
    }
    let mut headers = HeaderMap::new();
    for (key, value) in secret.data.unwrap_or_default() {
        let name = HeaderName::from_bytes(key.as_bytes()).map_err(|_| {
            DeliveryError::permanent(format!("header Secret key {key:?} is not a header name"))
        })?;
        let mut value = HeaderValue::from_bytes(&value.0).map_err(|_| {
            DeliveryError::permanent(format!(
                "header Secret value of {key:?} is not a header value"
            ))
        })?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_resolving_inward_is_refused_for_good_without_a_request() {
        // `localhost` is a name, so only the guarded resolver can catch it.
        let egress = Arc::new(EgressPolicy::default());
        let endpoint = HttpEndpoint {
            client: egress
                .http_client(reqwest::Client::builder().timeout(TIMEOUT))
                .unwrap(),
            url: "http://localhost:9/hook".into(),
            headers: HeaderMap::new(),
        };
        let e = endpoint.post(&serde_json::json!({})).await.unwrap_err();
        assert!(!e.retryable, "{e}");
        assert!(e.refused, "{e}");
        assert!(e.message.contains("destination refused"), "{e}");
    }

    #[test]
    fn only_answers_that_may_change_are_retried() {
        let u = "http://sink";
        assert_eq!(answer(u, StatusCode::OK), Ok(()));
        assert_eq!(answer(u, StatusCode::ACCEPTED), Ok(()));
        for code in [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::REQUEST_TIMEOUT,
        ] {
            assert!(answer(u, code).unwrap_err().retryable, "{code}");
        }
        for code in [
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
            StatusCode::NOT_FOUND,
            StatusCode::PAYLOAD_TOO_LARGE,
        ] {
            assert!(!answer(u, code).unwrap_err().retryable, "{code}");
        }
        // 3xx: reqwest follows redirects itself; one it hands back is not a delivery.
        assert!(!answer(u, StatusCode::NOT_MODIFIED).unwrap_err().retryable);
    }
}
