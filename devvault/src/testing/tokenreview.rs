//! The one stand-in the harness needs: Kubernetes' TokenReview API, which
//! OpenBao's Kubernetes auth calls to verify a ServiceAccount JWT. It checks
//! the signature and expiry with the test issuer's key and answers
//! `authentication.k8s.io/v1` TokenReview as the API server does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ServiceAccountIssuer;

pub const REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// A running TokenReview endpoint; dropping it stops it.
pub struct TokenReviewer {
    addr: SocketAddr,
    reviews: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

impl TokenReviewer {
    pub async fn start(issuer: Arc<ServiceAccountIssuer>) -> std::io::Result<TokenReviewer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let reviews = Arc::new(AtomicUsize::new(0));
        let (stop, count) = (cancel.clone(), reviews.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    r = listener.accept() => r,
                    _ = stop.cancelled() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (issuer, count) = (issuer.clone(), count.clone());
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (issuer, count) = (issuer.clone(), count.clone());
                    async move {
                        let ok_path = req.method() == hyper::Method::POST && req.uri().path() == REVIEW_PATH;
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let (status, answer) = if ok_path {
                            count.fetch_add(1, Ordering::Relaxed);
                            match serde_json::from_slice::<Value>(&body) {
                                Ok(v) => (StatusCode::CREATED, review(&issuer, &v)),
                                Err(e) => (StatusCode::BAD_REQUEST, status_failure(400, &format!("decoding: {e}"))),
                            }
                        } else {
                            (
                                StatusCode::NOT_FOUND,
                                status_failure(404, "the server could not find the requested resource"),
                            )
                        };
                        let mut resp = Response::new(Full::new(Bytes::from(answer.to_string())));
                        *resp.status_mut() = status;
                        resp.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
            }
        });
        Ok(TokenReviewer { addr, reviews, cancel })
    }

    /// The value for `kubernetes_host`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// TokenReviews answered so far.
    pub fn reviews(&self) -> usize {
        self.reviews.load(Ordering::Relaxed)
    }
}

impl Drop for TokenReviewer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn status_failure(code: u16, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code})
}

/// The API server's answer to one TokenReview: authenticated with the
/// ServiceAccount's user info, or not, with an error text.
pub fn review(issuer: &ServiceAccountIssuer, request: &Value) -> Value {
    let spec = &request["spec"];
    let token = spec["token"].as_str().unwrap_or_default();
    let wanted: Vec<&str> =
        spec["audiences"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let status = match issuer.verify(token) {
        Err(_) => json!({"user": {}, "error": "[invalid bearer token, service account token has been invalidated]"}),
        Ok(claims) => {
            let has: Vec<&str> = match &claims["aud"] {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            // Without spec.audiences the API server checks its own audience,
            // which the issuer's tokens carry.
            let audiences: Vec<&str> = if wanted.is_empty() {
                has.clone()
            } else {
                has.iter().copied().filter(|a| wanted.contains(a)).collect()
            };
            if audiences.is_empty() {
                json!({"user": {}, "error": "[invalid bearer token, token audiences [...] is invalid for the target audiences]"})
            } else {
                let k = &claims["kubernetes.io"];
                let ns = k["namespace"].as_str().unwrap_or_default();
                let sa = k["serviceaccount"]["name"].as_str().unwrap_or_default();
                json!({
                    "authenticated": true,
                    "user": {
                        "username": format!("system:serviceaccount:{ns}:{sa}"),
                        "uid": k["serviceaccount"]["uid"],
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                        "extra": {
                            "authentication.kubernetes.io/pod-name": [k["pod"]["name"]],
                            "authentication.kubernetes.io/pod-uid": [k["pod"]["uid"]],
                        },
                    },
                    "audiences": audiences,
                })
            }
        }
    };
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": spec,
        "status": status,
    })
}
