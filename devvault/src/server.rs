//! HTTP: decodes requests into logical ones, applies injected faults, writes
//! Vault's headers and bodies, and logs every request.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::api::{Failure, Reply};
use crate::core::{Core, Op, Request};

/// Vault's default `max_request_size`.
const MAX_BODY: usize = 32 << 20;

pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, core: Arc<Core>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = cancel.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let core = core.clone();
        let cancel = cancel.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                // A failed handshake (e.g. a client that does not trust the
                // CA) just closes the connection, as Vault's listener does.
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        connection(stream, core, cancel).await;
                    }
                }
                None => connection(stream, core, cancel).await,
            }
        });
    }
}

async fn connection<IO>(io: IO, core: Arc<Core>, cancel: CancellationToken)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Cancelled by a `drop` fault: the connection is closed unanswered.
    let dropper = CancellationToken::new();
    let svc_dropper = dropper.clone();
    let svc = hyper::service::service_fn(move |req| {
        let core = core.clone();
        let dropper = svc_dropper.clone();
        async move { Ok::<_, Infallible>(handle(core, dropper, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        _ = conn => {}
        _ = dropper.cancelled() => {}
        _ = cancel.cancelled() => {}
    }
}

fn respond(status: u16, body: Option<Value>) -> Response<Full<Bytes>> {
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let mut resp = Response::new(Full::new(bytes));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn handle(core: Arc<Core>, dropper: CancellationToken, req: hyper::Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let uri_path = req.uri().path().to_string();
    let query: Vec<(String, String)> = req.uri().query().map(parse_query).unwrap_or_default();
    // devvault has no namespaces (OpenBao 2.3+, Vault Enterprise): a request
    // in one is refused as OpenBao refuses one in a namespace that does not
    // exist. The log keeps the header so tests can see that clients send it.
    let ns = req.headers().get("x-vault-namespace").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let Some(path) = uri_path.strip_prefix("/v1/").map(percent_decode) else {
        core.log.record(&method, &uri_path, &ns, 404, "");
        return respond(404, Some(Failure::not_found().body()));
    };
    let local = path.starts_with("sys/devvault/");
    let fault = if local { None } else { core.faults.take(&method, &path) };
    // A fault applies before the request is handled, or with `after` once it
    // was (the server acted; only the answer is delayed, replaced or lost).
    if let Some(f) = fault.as_ref().filter(|f| !f.after)
        && let Some(resp) = apply_fault(&core, &dropper, f, (&method, &path, &ns)).await
    {
        return resp;
    }
    let (resp, accessor) = answer(&core, &method, &path, &ns, query, req).await;
    if let Some(f) = fault.as_ref().filter(|f| f.after)
        && let Some(resp) = apply_fault(&core, &dropper, f, (&method, &path, &ns)).await
    {
        return resp;
    }
    core.log.record(&method, &path, &ns, resp.status().as_u16(), &accessor);
    resp
}

/// Delays, then drops the connection or answers with the fault's body or
/// status;
/// `None` lets the request's own answer through.
async fn apply_fault(
    core: &Core,
    dropper: &CancellationToken,
    fault: &crate::testext::FaultAction,
    (method, path, ns): (&str, &str, &str),
) -> Option<Response<Full<Bytes>>> {
    if fault.delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(fault.delay_ms)).await;
    }
    if fault.drop {
        core.log.record(method, path, ns, 0, "");
        dropper.cancel();
        return std::future::pending().await;
    }
    if let Some(body) = &fault.body {
        let status = fault.status.unwrap_or(200);
        core.log.record(method, path, ns, status, "");
        let mut resp = respond(status, None);
        *resp.body_mut() = Full::new(Bytes::from(body.clone()));
        return Some(resp);
    }
    let status = fault.status?;
    core.log.record(method, path, ns, status, "");
    Some(respond(status, Some(json!({ "errors": fault.errors }))))
}

/// The request's own answer: refused for a namespace, forwarded in proxy
/// mode, or handled here; with the accessor of the token used.
async fn answer(
    core: &Arc<Core>,
    method: &str,
    path: &str,
    ns: &str,
    query: Vec<(String, String)>,
    req: hyper::Request<Incoming>,
) -> (Response<Full<Bytes>>, String) {
    let local = path.starts_with("sys/devvault/");
    if !ns.is_empty() && ns != "root" && core.upstream.is_none() && !local {
        let failure = if path == "sys/health" {
            Failure::resp(400, "operation unavailable in namespaces")
        } else {
            Failure::resp(404, "namespace not found")
        };
        return (respond(failure.status, Some(failure.body())), String::new());
    }
    if let Some(upstream) = core.upstream.as_ref().filter(|_| !local) {
        // The accessor is the upstream's secret to know: logged empty.
        return (upstream.forward(req, MAX_BODY).await, String::new());
    }
    let (status, (body, accessor)) = run(core, method, path.to_string(), query, req).await;
    if method == "HEAD" {
        return (respond(status, None), accessor);
    }
    (respond(status, body), accessor)
}

type Body = (Option<Value>, String);

async fn run(
    core: &Arc<Core>,
    method: &str,
    mut path: String,
    query: Vec<(String, String)>,
    req: hyper::Request<Incoming>,
) -> (u16, Body) {
    let fail = |f: Failure| (f.status, (Some(f.body()), String::new()));
    let list_query = query.iter().any(|(k, v)| k == "list" && (v == "true" || v == "1"));
    let op = match method {
        "GET" if list_query => Op::List,
        "GET" => Op::Read,
        "LIST" => Op::List,
        "POST" | "PUT" => Op::Update,
        "DELETE" => Op::Delete,
        "HEAD" => Op::Head,
        // Vault's PATCH needs a merge-patch body; the media type is checked first.
        "PATCH" if !req.headers().contains_key(hyper::header::CONTENT_TYPE) => {
            return fail(Failure::resp(400, "mime: no media type"));
        }
        "PATCH" => return fail(Failure::unsupported_operation()),
        _ => {
            return fail(Failure { status: 405, errors: vec![] });
        }
    };
    if op == Op::List && !path.ends_with('/') {
        path.push('/');
    }
    if op == Op::Update && path.ends_with('/') {
        return fail(Failure::resp(400, "cannot write to a path ending in '/'"));
    }
    let headers = req.headers().clone();
    let token = headers
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string)
        })
        .filter(|t| !t.is_empty());
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return fail(Failure::resp(413, "http: request body too large")),
    };
    let mut data = match parse_body(&bytes) {
        Ok(d) => d,
        Err(f) => return fail(f),
    };
    if matches!(op, Op::Read | Op::Delete | Op::Head) {
        for (k, v) in &query {
            data.entry(k.clone()).or_insert(Value::String(v.clone()));
        }
    }
    let request = Request { op, path, data, query, token };
    let (outcome, accessor) = crate::router::handle(core, request).await;
    let (status, body) = match outcome {
        // A read that produced nothing is a 404 in Vault.
        Ok(Reply::Empty) if op == Op::Read => (404, Some(Failure::not_found().body())),
        Ok(Reply::Empty) => (204, None),
        Ok(Reply::Accepted) => (202, None),
        Ok(Reply::Envelope(env)) => (200, Some(env.to_json())),
        Ok(Reply::Raw(code, v)) => (code, Some(v)),
        Err(f) => (f.status, Some(f.body())),
    };
    (status, (body, accessor))
}

fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>, Failure> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        // `bao write -force` sends `null`: no fields.
        Ok(Value::Null) => Ok(Map::new()),
        Ok(other) => {
            let kind = match other {
                Value::Array(_) => "array",
                Value::String(_) => "string",
                Value::Number(_) => "number",
                _ => "bool",
            };
            let go = format!("json: cannot unmarshal {kind} into Go value of type map[string]interface {{}}");
            Err(Failure::resp(400, format!("failed to decode JSON input: {go}")))
        }
        // Go's decoder words its errors differently; the prefix is Vault's.
        Err(e) => Err(Failure::resp(400, format!("failed to decode JSON input: {e}"))),
    }
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
