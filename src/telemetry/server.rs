//! The telemetry endpoints (axum, HTTP/1): `/healthz`, `/readyz`,
//! `/metrics`, `/v1/status`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::Telemetry;

pub fn router(t: Arc<Telemetry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .with_state(t)
}

pub async fn serve(listener: tokio::net::TcpListener, t: Arc<Telemetry>, stop: CancellationToken) {
    if let Err(e) = axum::serve(listener, router(t)).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::error!(event = "telemetry_failed", error = %e, "the telemetry server stopped");
    }
}

async fn readyz(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    match t.readiness() {
        (true, _) => (StatusCode::OK, "ready\n".to_string()),
        (false, reasons) if reasons.is_empty() => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: no secret configured\n".into())
        }
        (false, reasons) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{}\n", reasons.join("\n"))),
    }
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], t.encode_metrics())
}

async fn status(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], t.status_json().to_string())
}
