//! `leasehold injector`: a mutating admission webhook (HTTPS, rustls) that
//! adds the agent to pods annotated `leasehold.dev/inject: "true"` (and,
//! with `--vault-k8s-compat`, `vault.hashicorp.com/agent-inject`).
//!
//! - `plan.rs`: `leasehold.dev/*` annotations → a `Plan` → the agent config;
//! - `vault_k8s.rs`, `gotemplate.rs`: vault-k8s annotations and templates → a `Plan`;
//! - `patch.rs`: the pod's JSONPatch; `admit.rs`: one AdmissionReview;
//! - `tls.rs`: the certificate, re-read when its files change.

pub mod admit;
pub mod gotemplate;
pub mod lint;
pub mod patch;
pub mod plan;
pub mod tls;
pub mod vault_k8s;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::Value;

use admit::{Outcome, Settings};

struct Counters {
    injected: AtomicU64,
    skipped: AtomicU64,
    denied: AtomicU64,
}

struct App {
    settings: Settings,
    counters: Counters,
}

/// `:8443` listens on every address, as Go programs do.
pub fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') { format!("0.0.0.0{s}") } else { s.to_string() };
    full.parse().map_err(|_| format!("--listen {s:?} is not HOST:PORT or :PORT"))
}

pub fn router(settings: Settings) -> Router {
    let app = Arc::new(App {
        settings,
        counters: Counters { injected: AtomicU64::new(0), skipped: AtomicU64::new(0), denied: AtomicU64::new(0) },
    });
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics))
        .with_state(app)
}

async fn mutate(State(app): State<Arc<App>>, body: Bytes) -> impl IntoResponse {
    let parsed: Result<Value, String> = serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"));
    let decision = parsed.and_then(|v| admit::review(&v, &app.settings).map_err(|e| e.to_string()));
    match decision {
        Ok(d) => {
            let c = match d.outcome {
                Outcome::Injected => &app.counters.injected,
                Outcome::Skipped => &app.counters.skipped,
                Outcome::Denied => &app.counters.denied,
            };
            c.fetch_add(1, Ordering::Relaxed);
            let level_warn = d.outcome == Outcome::Denied;
            if level_warn {
                tracing::warn!(event = "admission", result = d.outcome.label(), namespace = %d.namespace, reason = %d.reason, "pod denied");
            } else {
                tracing::info!(event = "admission", result = d.outcome.label(), namespace = %d.namespace, reason = %d.reason, "pod admitted");
            }
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], d.response.to_string())
        }
        Err(e) => {
            tracing::warn!(event = "bad_review", error = %e, "a request that is not an AdmissionReview");
            (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "text/plain")], format!("{e}\n"))
        }
    }
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let c = &app.counters;
    let mut text = String::from(
        "# HELP leasehold_injector_admissions_total Pod admissions, by result.\n# TYPE leasehold_injector_admissions_total counter\n",
    );
    for (result, n) in [("injected", &c.injected), ("skipped", &c.skipped), ("denied", &c.denied)] {
        text.push_str(&format!(
            "leasehold_injector_admissions_total{{result=\"{result}\"}} {}\n",
            n.load(Ordering::Relaxed)
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

/// Serves HTTPS on `listener` until `stop`; each connection in its own
/// task, so a slow client delays nobody else.
/// Connections served at once (the rest are closed at accept).
pub const MAX_CONNECTIONS: usize = 512;
/// For the TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// For a request's headers, the first and each kept-alive one after.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    router: Router,
    stop: tokio_util::sync::CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let mut accept_errors = listen::AcceptErrors::default();
    // The API server keeps a few connections open; anything near this is
    // someone else's flood. Over the cap a connection is closed at once,
    // never waited for: the others keep being served.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accept = || listener.accept();
        let Some((stream, peer)) = listen::next(accept, &mut accept_errors, "accept_failed", "injector", &stop).await
        else {
            return;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(event = "connection_refused", peer = %peer, "over the connection cap");
            continue;
        };
        let Ok(fds) = listen::Descriptors::take(1) else {
            tracing::debug!(event = "connection_refused", peer = %peer, "out of descriptors (listen::RESERVE kept)");
            continue;
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _held = (slot, fds);
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            let tls = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(event = "tls_failed", peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            // A request's headers must arrive within HEADER_TIMEOUT (also
            // between requests of a kept-alive connection).
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                tracing::debug!(event = "connection_failed", peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
}
