//! The telemetry endpoints (axum, HTTP/1): `/healthz`, `/readyz`,
//! `/metrics`, `/v1/status`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::Telemetry;

/// The endpoints; `/v1/status` only `with_status` (`telemetry.status`
/// decides per connection).
pub fn router(t: Arc<Telemetry>, with_status: bool) -> Router {
    let r = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let r = if with_status {
        r.route("/v1/status", get(status))
    } else {
        r.route(
            "/v1/status",
            get(|| async { (StatusCode::NOT_FOUND, "not served to this address (telemetry.status)\n") }),
        )
    };
    r.with_state(t)
}

/// Connections open at once. A probe or a scrape takes one for a moment;
/// ~18 KB each, so a flood cannot take the sidecar's memory.
pub const MAX_CONNECTIONS: usize = 128;
/// For a request's headers (also between requests of a kept-alive one).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until `stop`. At the cap, a new connection is not refused: the
/// oldest one that has not sent a request yet is closed to make room, so a
/// flood of silent connections cannot keep the kubelet's probes out (they
/// send their request at once, and are served).
pub async fn serve(
    listener: tokio::net::TcpListener,
    t: Arc<Telemetry>,
    access: config::StatusAccess,
    stop: CancellationToken,
) {
    let (full, probes) = (router(t.clone(), true), router(t, false));
    let mut accept_errors = listen::AcceptErrors::default();
    let waiting = Arc::new(Mutex::new(Waiting::default()));
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let accept = || listener.accept();
        let next = listen::next(accept, &mut accept_errors, "telemetry_accept_failed", "telemetry", &stop).await;
        let Some((stream, peer)) = next else { return };
        let router = if access.serves(peer.ip()) { full.clone() } else { probes.clone() };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            let evicted = super::lock(&waiting).evict_oldest();
            if !evicted {
                // Every connection is in a request: this one waits its turn
                // no more than the rest, it is closed.
                continue;
            }
        }
        let (id, cancel) = super::lock(&waiting).add(stop.child_token());
        let (waiting, open) = (waiting.clone(), open.clone());
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            // The first request's arrival takes the connection off the
            // evictable list.
            let first = waiting.clone();
            let service = tower::ServiceExt::map_request(router, move |req| {
                super::lock(&first).remove(id);
                req
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
            }
            super::lock(&waiting).remove(id);
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Connections that have not sent a request yet, oldest first.
#[derive(Default)]
struct Waiting {
    next: u64,
    queue: VecDeque<(u64, CancellationToken)>,
}

impl Waiting {
    fn add(&mut self, cancel: CancellationToken) -> (u64, CancellationToken) {
        self.next += 1;
        self.queue.push_back((self.next, cancel.clone()));
        (self.next, cancel)
    }

    fn remove(&mut self, id: u64) {
        self.queue.retain(|(i, _)| *i != id);
    }

    /// Closes the oldest; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        match self.queue.pop_front() {
            Some((_, cancel)) => {
                cancel.cancel();
                true
            }
            None => false,
        }
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
