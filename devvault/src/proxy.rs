//! Proxy mode (`devvault --upstream URL`): every request outside
//! `sys/devvault/` is forwarded to a real Vault/OpenBao, after the same
//! fault injection and with the same request log, so fault tests run
//! against the real server's answers.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HOST, HeaderValue};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The upstream server: plain HTTP `host:port` (the real server runs
/// beside the tests on the loopback).
#[derive(Debug, Clone)]
pub struct Upstream {
    authority: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream must be an http:// URL with a host and port, got {0:?}")]
    Url(String),
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Upstream, UpstreamError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| UpstreamError::Url(url.to_string()))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(UpstreamError::Url(url.to_string()));
        }
        Ok(Upstream { authority: authority.to_string() })
    }

    /// Forwards `req` unchanged (method, path and query, headers, body) and
    /// returns the upstream's answer. A failure to reach the upstream is a
    /// 502 with a Vault error body, as a load balancer would answer.
    pub async fn forward(&self, req: hyper::Request<Incoming>, max_body: usize) -> Response<Full<Bytes>> {
        match self.try_forward(req, max_body).await {
            Ok(resp) => resp,
            Err(e) => {
                let body =
                    serde_json::json!({ "errors": [format!("devvault proxy: upstream {}: {e}", self.authority)] });
                let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
                *resp.status_mut() = StatusCode::BAD_GATEWAY;
                resp
            }
        }
    }

    async fn try_forward(
        &self,
        req: hyper::Request<Incoming>,
        max_body: usize,
    ) -> Result<Response<Full<Bytes>>, String> {
        let (mut parts, body) = req.into_parts();
        let body = Limited::new(body, max_body).collect().await.map_err(|e| format!("reading request body: {e}"))?;
        parts.headers.insert(HOST, HeaderValue::from_str(&self.authority).map_err(|e| e.to_string())?);
        // One connection per request: simple, and a dropped client never
        // leaves a half-used upstream connection behind.
        parts.headers.insert(CONNECTION, HeaderValue::from_static("close"));
        let out = hyper::Request::from_parts(parts, Full::new(body.to_bytes()));
        let stream = TcpStream::connect(&self.authority).await.map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender.send_request(out).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map_err(|e| format!("reading response: {e}"))?.to_bytes();
        Ok(Response::from_parts(parts, Full::new(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_host_port_upstreams() {
        assert!(Upstream::parse("http://127.0.0.1:8200").is_ok());
        assert!(Upstream::parse("http://127.0.0.1:8200/").is_ok());
        for bad in ["https://127.0.0.1:8200", "127.0.0.1:8200", "http://host", "http://h:1/v1"] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
    }
}
