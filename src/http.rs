//! The operator's HTTP server: `/healthz`, `/readyz`, `/metrics`, and the HTTP endpoints of
//! Subscribers (`POST /subscribers/<namespace>/<path>`). Only transport lives here: what a
//! message is worth and whom it is for is decided in `forwarding::subscribers`, and this file
//! turns the verdict into a status code.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    forwarding::{SubscriberManager, subscribers::Rejection},
    metrics::Metrics,
};

/// Readiness: true once the controllers have synced their caches.
#[derive(Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    subscribers: Arc<SubscriberManager>,
}

/// Largest request body read at all; each Subscriber has its own, smaller limit.
const MAX_BODY: usize = 1024 * 1024 + 1;

/// `POST /subscribers/{namespace}/{path}`: a message for the Subscriber serving that path.
async fn subscriber_message(
    State(state): State<AppState>,
    Path((namespace, path)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let verdict = state
        .subscribers
        .http_message(&namespace, &path, bearer, body.to_vec())
        .await;
    let (code, message) = match verdict {
        // Written into the Thing (durable in the API server) before this answer.
        Ok(()) => (StatusCode::ACCEPTED, "written".to_string()),
        Err(e) => (rejection_status(&e), e.to_string()),
    };
    (code, axum::Json(serde_json::json!({"result": message})))
}

/// The status code of a refused message: 503 says "try again" (queue full, standby replica),
/// every 4xx says the request itself is wrong.
fn rejection_status(rejection: &Rejection) -> StatusCode {
    match rejection {
        Rejection::NotFound => StatusCode::NOT_FOUND,
        Rejection::Unauthorized => StatusCode::UNAUTHORIZED,
        Rejection::TooLarge(..) => StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::Busy | Rejection::Standby | Rejection::NotWrittenYet => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Rejection::NotWritable(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Rejection::NotJson(_) | Rejection::NotObject | Rejection::Invalid(_) => {
            StatusCode::BAD_REQUEST
        }
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

pub fn router(
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    subscribers: Arc<SubscriberManager>,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/subscribers/{namespace}/{path}", post(subscriber_message))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(AppState {
            metrics,
            readiness,
            subscribers,
        })
}

/// Binds and serves until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "http server listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_refusals_ask_the_caller_to_retry() {
        let cases = [
            (Rejection::NotFound, 404),
            (Rejection::Unauthorized, 401),
            (Rejection::TooLarge(2, 1), 413),
            (Rejection::NotJson("x".into()), 400),
            (Rejection::NotObject, 400),
            (Rejection::Invalid("deep".into()), 400),
            (Rejection::Busy, 503),
            (Rejection::Standby, 503),
        ];
        for (rejection, code) in cases {
            assert_eq!(rejection_status(&rejection).as_u16(), code, "{rejection:?}");
        }
    }
}
