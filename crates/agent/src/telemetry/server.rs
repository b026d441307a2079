//! The telemetry endpoints (axum, HTTP/1): `/healthz`, `/readyz`,
//! `/metrics`, `/v1/status`.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
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

/// OpenMetrics when the scraper asks for it (Prometheus does), the classic
/// text format otherwise (promtool, curl, older scrapers).
async fn metrics(State(t): State<Arc<Telemetry>>, headers: HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let text = t.encode_metrics();
    if openmetrics {
        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
    } else {
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], to_prometheus_text(&text))
    }
}

/// OpenMetrics → Prometheus text 0.0.4: counter families are named with
/// their `_total` suffix, and there is no `# EOF`.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ").and_then(|rest| rest.strip_suffix(" counter")))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

async fn status(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], t.status_json().to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_get_their_total_name() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total{a=\"b\"} 1\n# HELP g G.\n# TYPE g gauge\ng 2\n# EOF\n";
        let text = super::to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{a=\"b\"} 1\n# HELP g G.\n# TYPE g gauge\ng 2\n"
        );
    }
}
