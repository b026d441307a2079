//! A typed client for the Vault API subset leasehold needs: Kubernetes
//! login, token self-management, reading a secret path (keeping the lease
//! id, which vaultrs drops), lease renew/revoke/lookup.
//!
//! Transient failures (connection errors, 5xx, 429, 412) are retried with
//! exponential backoff and full jitter, a few times; callers decide what to
//! do after that. A standby's 307 is followed once, by hand: never to plain
//! http from https, and to another host only when it is listed or proves
//! itself with a verified certificate.

mod types;

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

pub mod secret;

use secret::{ExposeSecret, LeaseId, SecretData, SecretString};
use types::{Envelope, ErrorBody, data_object};

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{op}: cannot reach Vault: {reason}")]
    Transport {
        op: &'static str,
        reason: String,
        /// The connection failed: the request never reached Vault.
        unsent: bool,
    },
    #[error("{op}: Vault answered {status}: {}", errors.join("; "))]
    Status {
        op: &'static str,
        status: u16,
        errors: Vec<String>,
        /// A 429 or 503's `Retry-After` (in seconds), capped at `MAX_RETRY_AFTER`.
        retry_after: Option<Duration>,
    },
    #[error("{op}: unexpected response from Vault: {reason}")]
    Decode { op: &'static str, reason: String },
    #[error("{op}: {reason}")]
    Setup { op: &'static str, reason: String },
}

impl VaultError {
    pub fn status(&self) -> Option<u16> {
        match self {
            VaultError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Vault's error texts contain this (substring match, as Vault's own
    /// clients do).
    pub fn mentions(&self, text: &str) -> bool {
        matches!(self, VaultError::Status { errors, .. } if errors.iter().any(|e| e.contains(text)))
    }

    /// A failure that retrying will not fix until someone changes Vault's
    /// (or the cluster's) configuration, named for logs: `unknown_role` (a
    /// role Vault does not have), `unknown_path` (no secrets engine there),
    /// `permission_denied` (a policy, or a ServiceAccount the role does not
    /// bind). The agent still retries them, but slowly, and says so.
    pub fn permanent(&self) -> Option<&'static str> {
        let VaultError::Status { status, .. } = self else { return None };
        let role = ["unknown role", "role not found", "invalid role name", "role \"", "no role"];
        match status {
            400 | 404 if role.iter().any(|t| self.mentions(t)) => Some("unknown_role"),
            400 | 404 if self.mentions("no handler for route") || self.mentions("unsupported path") => {
                Some("unknown_path")
            }
            403 => Some("permission_denied"),
            _ => None,
        }
    }

    /// Worth retrying: Vault unreachable, overloaded, sealed or not yet
    /// consistent.
    pub fn is_transient(&self) -> bool {
        match self {
            VaultError::Transport { .. } => true,
            VaultError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 412,
            _ => false,
        }
    }

    /// How long Vault asked to be left alone (429 or 503 with `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            VaultError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Failed before the request was sent: retrying cannot do anything twice.
    pub fn is_unsent(&self) -> bool {
        matches!(self, VaultError::Transport { unsent: true, .. })
    }

    /// The token was refused (expired, revoked) or lacks permission.
    pub fn is_permission_denied(&self) -> bool {
        self.status() == Some(403)
    }
}

/// The auth method a login goes to: the Kubernetes and the JWT methods
/// take the same request; the name is the operation's in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Kubernetes,
    Jwt,
}

/// A Vault token: the secret plus what can be shown of it.
#[derive(Clone)]
pub struct Token {
    pub secret: SecretString,
    /// Vault's accessor; for a batch token, which has none, a local id
    /// (`batch-…`) that names it in the state file, logs and status.
    pub accessor: secret::Accessor,
    pub ttl: Duration,
    pub renewable: bool,
    /// A batch token: never renewable, cannot be revoked.
    pub batch: bool,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("accessor", &self.accessor).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// The answer to a renew-self: the new TTL and Vault's warnings.
#[derive(Debug, Clone)]
pub struct TokenRenewal {
    pub ttl: Duration,
    pub renewable: bool,
    pub warnings: Vec<String>,
}

/// A secret read from a path: with a lease (database creds) or without (KV).
#[derive(Debug, Clone)]
pub struct Secret {
    pub lease_id: LeaseId,
    pub lease_duration: Duration,
    pub renewable: bool,
    pub data: SecretData,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct LeaseRenewal {
    pub lease_duration: Duration,
    pub renewable: bool,
    pub warnings: Vec<String>,
}

#[derive(Clone)]
pub struct ClientConfig {
    pub address: String,
    pub ca_cert_pem: Option<Vec<u8>>,
    pub namespace: String,
    pub request_timeout: Duration,
    pub tls_skip_verify: bool,
    /// Retries of transient failures per request.
    pub max_retries: usize,
    /// Hosts a standby's redirect may go to besides the configured one (see
    /// `VaultClient::may_follow`).
    pub redirect_hosts: Vec<String>,
}

/// Sees every request to Vault (for metrics): operation, HTTP status (0
/// when there was no answer) and duration.
pub trait RequestObserver: Send + Sync {
    fn observe(&self, op: &'static str, code: u16, elapsed: Duration);
}

#[derive(Clone)]
pub struct VaultClient {
    http: reqwest::Client,
    /// The address, parsed once: each request only sets its path.
    base: reqwest::Url,
    namespace: String,
    max_retries: usize,
    observer: Option<std::sync::Arc<dyn RequestObserver>>,
    /// Lease endpoints (`sys/leases/renew`, `sys/leases/revoke`) whose path
    /// form the policy denied while the body form worked: use the body form.
    body_form: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
    /// Requests in flight at once: hundreds of secrets issued together at
    /// start would otherwise open a connection each (memory here, a
    /// thundering herd at Vault).
    inflight: std::sync::Arc<tokio::sync::Semaphore>,
    /// Hosts a standby may redirect to besides the configured one.
    redirect_hosts: Vec<String>,
    /// Certificates are verified (`tls_skip_verify` off).
    verified: bool,
    /// What the client's own retries draw from (`RetryBudget`).
    budget: std::sync::Arc<RetryBudget>,
}

/// The retries one client (one agent) may add, over all its requests: up
/// to `RETRY_BURST` at once, refilled by `RETRY_RATE` a second. A Vault
/// failing for a whole fleet then meets each agent's first attempts (which
/// its loops pace by the life left), not up to four times as many: the
/// fleet cannot amplify the outage. A failure past the budget goes back to
/// the loop at once, which waits as its schedule says.
struct RetryBudget {
    /// Tokens, and when they were counted.
    state: std::sync::Mutex<(f64, tokio::time::Instant)>,
}

/// See `RetryBudget`.
pub const RETRY_BURST: f64 = 10.0;
/// See `RetryBudget` (retries per second).
pub const RETRY_RATE: f64 = 1.0;

impl RetryBudget {
    fn new() -> RetryBudget {
        RetryBudget { state: std::sync::Mutex::new((RETRY_BURST, Self::now())) }
    }

    // tokio's clock, as for the request metric: paused in tests.
    #[allow(clippy::disallowed_methods)]
    fn now() -> tokio::time::Instant {
        tokio::time::Instant::now()
    }

    /// Takes one retry if the budget holds one.
    fn try_spend(&self) -> bool {
        let now = Self::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, counted) = *state;
        let tokens = (tokens + now.duration_since(counted).as_secs_f64() * RETRY_RATE).min(RETRY_BURST);
        let spend = tokens >= 1.0;
        *state = (if spend { tokens - 1.0 } else { tokens }, now);
        spend
    }
}

/// See `VaultClient::inflight`.
const MAX_IN_FLIGHT: usize = 16;

/// The longest a TCP connect to Vault may take (less when
/// `request_timeout` is shorter).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an idle connection to Vault stays pooled.
pub const POOL_IDLE: Duration = Duration::from_secs(5);

impl VaultClient {
    pub fn new(cfg: ClientConfig) -> Result<Self, VaultError> {
        install_crypto_provider();
        let setup = |reason: String| VaultError::Setup { op: "client setup", reason };
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            // A SYN lost once is sent again at 1 s; one still unanswered
            // at 2 s went into a dead link, and a fresh attempt (the
            // client's retry) finds a link that came back sooner than the
            // kernel's next retransmission would (3 s, then 7 s).
            .connect_timeout(cfg.request_timeout.min(CONNECT_TIMEOUT))
            // Many secrets issue at once at start: keep a few connections
            // for the renewals, not one per secret (each holds buffers).
            .pool_max_idle_per_host(8)
            // A connection idle a while may sit on a path that died
            // silently (a blackholed link sends no RST): a request on it
            // hangs until the timeout. Renewals come minutes apart, so a
            // pooled connection is reused only within a burst.
            .pool_idle_timeout(POOL_IDLE)
            // Dead peers found by the kernel, not by a request: keepalive
            // probes on idle connections, and unacknowledged data (a
            // request sent into a cut link) ends the connection after the
            // request timeout rather than after minutes of retransmission.
            .tcp_keepalive(Duration::from_secs(5))
            .tcp_keepalive_interval(Duration::from_secs(2))
            .tcp_keepalive_retries(3)
            .tcp_user_timeout(cfg.request_timeout)
            // Redirects are followed by hand (`call_once`, `may_follow`).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("leasehold/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &cfg.ca_cert_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| setup(format!("invalid CA certificate: {e}")))?;
            if certs.is_empty() {
                return Err(setup("the CA file holds no PEM certificate".into()));
            }
            builder = builder.tls_certs_only(certs);
        } else {
            builder = without_unused_roots(builder, &cfg.address);
        }
        if cfg.tls_skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let http = builder.build().map_err(|e| setup(e.to_string()))?;
        let base = reqwest::Url::parse(cfg.address.trim_end_matches('/'))
            .map_err(|e| setup(format!("invalid address {:?}: {e}", cfg.address)))?;
        Ok(VaultClient {
            http,
            base,
            namespace: cfg.namespace,
            max_retries: cfg.max_retries,
            observer: None,
            body_form: Default::default(),
            inflight: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            redirect_hosts: cfg.redirect_hosts,
            verified: !cfg.tls_skip_verify,
            budget: std::sync::Arc::new(RetryBudget::new()),
        })
    }

    /// `<address>/v1/<path>`: only the path is parsed per request (reqwest
    /// parses the whole URL once more; the two were a quarter of a
    /// renewal's instructions).
    fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        url.set_path(&format!("{}/v1/{}", self.base.path().trim_end_matches('/'), path.trim_start_matches('/')));
        url
    }

    pub fn with_observer(mut self, observer: std::sync::Arc<dyn RequestObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// One request with retries of transient failures. Returns the status
    /// and the decoded envelope (empty for 204).
    async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&Value>,
    ) -> Result<Envelope, VaultError> {
        self.call_retrying(op, method, path, token, body, VaultError::is_transient).await
    }

    /// As `call`, retrying the failures `retry` accepts.
    async fn call_retrying(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&Value>,
        retry: fn(&VaultError) -> bool,
    ) -> Result<Envelope, VaultError> {
        let attempt = || async { self.call_once(op, method.clone(), path, token, body).await };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(self.max_retries)
            .with_jitter();
        // Vault's `Retry-After` wins over a shorter step; the caller's
        // deadline (`tokio::time::timeout` around the call) bounds both.
        attempt
            .retry(backoff)
            .when(|e| retry(e) && self.budget.try_spend())
            .adjust(|e: &VaultError, step| step.map(|d| e.retry_after().map_or(d, |after| after.max(d))))
            .await
    }

    async fn call_once(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&Value>,
    ) -> Result<Envelope, VaultError> {
        // Never closed, so acquiring only waits.
        let _permit = self.inflight.acquire().await.ok();
        let url = self.url(path);
        let first = self
            .send(op, method.clone(), url.clone(), token, body)
            .await
            .map_err(|e| transport(op, &format!("{}: ", show_origin(&url)), &e))?;
        let resp = match redirect_target(&first, &url) {
            None => first,
            // A standby points at the active node: followed once, by hand,
            // so that the error can name both addresses and the token and
            // JWT only go where `may_follow` allows.
            Some(target) => {
                let via = format!("redirected by {} to {}", show_origin(&self.base), show_origin(&target));
                if let Err(why) = self.may_follow(&target) {
                    return Err(VaultError::Transport {
                        op,
                        reason: format!(
                            "{via}, which is not followed ({why}); point vault.address at the active node's \
                             Service (vault-active) or list the host in vault.redirect_hosts"
                        ),
                        unsent: true,
                    });
                }
                self.send(op, method, target, token, body).await.map_err(|e| transport(op, &format!("{via}: "), &e))?
            }
        };
        let status = resp.status();
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => retry_after(resp.headers()),
            _ => None,
        };
        let bytes = read_capped(op, resp).await?;
        if status == StatusCode::NO_CONTENT || (status.is_success() && bytes.is_empty()) {
            return Ok(Envelope::default());
        }
        if !status.is_success() {
            let errors = serde_json::from_slice::<ErrorBody>(&bytes).map(|b| b.errors).unwrap_or_default();
            return Err(VaultError::Status { op, status: status.as_u16(), errors, retry_after });
        }
        decode_body(op, &bytes)
    }

    /// One HTTP exchange, observed for the metrics.
    async fn send(
        &self,
        op: &'static str,
        method: Method,
        url: reqwest::Url,
        token: Option<&SecretString>,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut req = self.http.request(method, url).header("X-Vault-Request", "true");
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t.expose_secret());
        }
        if !self.namespace.is_empty() {
            req = req.header("X-Vault-Namespace", &self.namespace);
        }
        if let Some(b) = body {
            req = req.header(header::CONTENT_TYPE, "application/json").body(b.to_string());
        }
        // A duration for the metric, no deadline: tokio's clock (paused in
        // tests), the one the agent's `clock::instant` reads.
        #[allow(clippy::disallowed_methods)]
        let started = tokio::time::Instant::now();
        let sent = req.send().await;
        if let Some(o) = &self.observer {
            o.observe(op, sent.as_ref().map(|r| r.status().as_u16()).unwrap_or(0), started.elapsed());
        }
        sent
    }

    /// Whether a standby's redirect to `target` may carry the token (and a
    /// login's JWT): never from https to anything else; to the configured
    /// host, a host in `vault.redirect_hosts`, or another host over https
    /// whose certificate is verified (it proves itself a Vault node of the
    /// configured CA). Plain http or an unverified certificate to another
    /// host would hand the token to whoever answers there.
    fn may_follow(&self, target: &reqwest::Url) -> Result<(), &'static str> {
        let https = target.scheme() == "https";
        if self.base.scheme() == "https" && !https {
            return Err("it leaves https");
        }
        if !https && target.scheme() != "http" {
            return Err("not http or https");
        }
        let host = target.host_str().unwrap_or_default();
        let same = self.base.host_str().is_some_and(|h| h.eq_ignore_ascii_case(host));
        if same || self.redirect_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Ok(());
        }
        if https && self.verified {
            return Ok(());
        }
        Err("another host, without a verified certificate")
    }

    /// `PUT <base>/<lease_id>`, the path form, so that a policy can grant
    /// renew and revoke under the role's own prefix only
    /// (`sys/leases/revoke/database/creds/app-role/*`). Denied there, the
    /// body form `PUT <base>` follows: Vault's default policy grants
    /// `sys/leases/renew` only in that form, and older policies granted
    /// `sys/leases/revoke` so; once that happened, the body form comes
    /// first. The path form's body never names the lease: the ACL was
    /// checked against the path.
    async fn lease_call(
        &self,
        op: &'static str,
        base: &'static str,
        token: &SecretString,
        lease: &LeaseId,
        body: Value,
    ) -> Result<Envelope, VaultError> {
        let mut with_id = body.clone();
        with_id["lease_id"] = json!(lease.expose());
        let body_form = || self.body_form.lock().map(|f| f.contains(&base)).unwrap_or(false);
        if body_form() {
            return self.call(op, Method::PUT, base, Some(token), Some(&with_id)).await;
        }
        let path = format!("{base}/{}", lease.expose());
        match self.call(op, Method::PUT, &path, Some(token), Some(&body)).await {
            Err(e) if e.is_permission_denied() => {
                let result = self.call(op, Method::PUT, base, Some(token), Some(&with_id)).await;
                if result.is_ok()
                    && let Ok(mut f) = self.body_form.lock()
                {
                    f.push(base);
                }
                result
            }
            other => other,
        }
    }

    /// A raw write, for setup steps (the demo configures devvault with it).
    pub async fn write(&self, token: &SecretString, path: &str, body: &Value) -> Result<(), VaultError> {
        self.call("write", Method::POST, path, Some(token), Some(body)).await.map(|_| ())
    }
}

/// A 307 or 308's `Location`, resolved against the request's URL.
fn redirect_target(resp: &reqwest::Response, url: &reqwest::Url) -> Option<reqwest::Url> {
    if !matches!(resp.status(), StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT) {
        return None;
    }
    let location = resp.headers().get(header::LOCATION)?.to_str().ok()?;
    url.join(location).ok()
}

/// Scheme, host and port: never the path, which may hold a lease id.
fn show_origin(url: &reqwest::Url) -> String {
    url.origin().ascii_serialization()
}

fn transport(op: &'static str, via: &str, e: &reqwest::Error) -> VaultError {
    VaultError::Transport { op, reason: format!("{via}{}", transport_reason(e)), unsent: e.is_connect() }
}

/// The longest `Retry-After` honoured: Vault's own are seconds; an hour
/// from a broken proxy must not park the agent.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// `Retry-After` in seconds (the form Vault and its load balancers send),
/// capped at `MAX_RETRY_AFTER`; an HTTP date or garbage is ignored.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// The largest answer read from Vault. Vault's own are a few KiB (a PKI
/// bundle with its chain stays well under 64 KiB); a bigger body is a
/// misbehaving server or a man in the middle, and reading it whole would
/// take the sidecar's memory with it.
pub const MAX_BODY: usize = 4 << 20;

/// The body, read chunk by chunk and refused past `MAX_BODY` (a declared
/// `Content-Length` over it is refused before anything is read).
async fn read_capped(op: &'static str, mut resp: reqwest::Response) -> Result<Vec<u8>, VaultError> {
    let too_big = || VaultError::Decode { op, reason: format!("the answer is larger than {} MiB", MAX_BODY >> 20) };
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() > MAX_BODY => return Err(too_big()),
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => return Ok(body),
            Err(e) => return Err(VaultError::Transport { op, reason: transport_reason(&e), unsent: false }),
        }
    }
}

/// A lookup's `data.ttl` and `data.renewable`. Strict: an answer without a
/// numeric `ttl` is unreadable, not "expired" (which would drop a lease or
/// token that may well be alive).
fn ttl_and_renewable(op: &'static str, data: Option<Value>) -> Result<(Duration, bool), VaultError> {
    let data = data_object(data);
    let ttl = data
        .get("ttl")
        .and_then(Value::as_i64)
        .ok_or(VaultError::Decode { op, reason: "no numeric data.ttl".into() })?;
    let renewable = data.get("renewable").and_then(Value::as_bool).unwrap_or(false);
    Ok((secs(ttl), renewable))
}

/// serde_json's message quotes the offending value, which could be a token
/// in a malformed answer: keep only the kind of error and where it is.
fn decode_reason(e: &serde_json::Error) -> String {
    format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column())
}

pub use secret::MAX_TTL;

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(0) as u64).min(MAX_TTL)
}

// The decoders of Vault's answers: pure, so the client uses them and the
// fuzz targets (`fuzz/`) reach them without HTTP.

fn decode_body(op: &'static str, bytes: &[u8]) -> Result<Envelope, VaultError> {
    serde_json::from_slice(bytes).map_err(|e| VaultError::Decode { op, reason: decode_reason(&e) })
}

fn decode_login(op: &'static str, env: Envelope) -> Result<Token, VaultError> {
    let auth = env.auth.ok_or(VaultError::Decode { op, reason: "no auth block".into() })?;
    if auth.client_token.is_empty() {
        return Err(VaultError::Decode { op, reason: "empty client_token".into() });
    }
    let batch = auth.token_type == "batch" || auth.accessor.is_empty();
    let accessor =
        if auth.accessor.is_empty() { format!("batch-{:016x}", rand::random::<u64>()).into() } else { auth.accessor };
    Ok(Token {
        secret: SecretString::from(auth.client_token),
        accessor,
        ttl: secs(auth.lease_duration),
        renewable: auth.renewable && !batch,
        batch,
    })
}

fn decode_token_renewal(op: &'static str, env: Envelope) -> Result<TokenRenewal, VaultError> {
    let auth = env.auth.ok_or(VaultError::Decode { op, reason: "no auth block".into() })?;
    Ok(TokenRenewal {
        ttl: secs(auth.lease_duration),
        renewable: auth.renewable,
        warnings: env.warnings.unwrap_or_default(),
    })
}

fn decode_secret(env: Envelope) -> Secret {
    Secret {
        lease_id: LeaseId::new(env.lease_id.unwrap_or_default()),
        lease_duration: secs(env.lease_duration.unwrap_or(0)),
        renewable: env.renewable.unwrap_or(false),
        data: SecretData::new(data_object(env.data)),
        warnings: env.warnings.unwrap_or_default(),
    }
}

fn decode_lease_renewal(env: Envelope) -> LeaseRenewal {
    LeaseRenewal {
        lease_duration: secs(env.lease_duration.unwrap_or(0)),
        renewable: env.renewable.unwrap_or(false),
        warnings: env.warnings.unwrap_or_default(),
    }
}

/// Every decoder over one answer body (each as its operation would see it),
/// returning the TTL each took from it. For the fuzz targets: it must
/// return, whatever the bytes (the agent's lease times from these TTLs are
/// fuzzed beside it, in `fuzz/`).
pub fn decode_every_answer(bytes: &[u8]) -> Vec<Result<Duration, VaultError>> {
    let decode = || decode_body("fuzz", bytes);
    vec![
        decode().and_then(|e| decode_login("login", e)).map(|t| t.ttl),
        decode().and_then(|e| decode_token_renewal("token renew", e)).map(|r| r.ttl),
        decode().map(decode_secret).map(|s| s.lease_duration),
        decode().map(decode_lease_renewal).map(|r| r.lease_duration),
        decode().and_then(|e| ttl_and_renewable("lookup", e.data)).map(|(ttl, _)| ttl),
    ]
}

/// reqwest's error chain without the URL (it could carry nothing secret, but
/// keeps messages short).
fn transport_reason(e: &reqwest::Error) -> String {
    let mut reason = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    // What to do about the commonest first-day failure.
    let tls = ["certificate", "UnknownIssuer", "unknown issuer", "NotValidForName"];
    if tls.iter().any(|t| reason.contains(t)) {
        reason.push_str(
            " (Vault's certificate is not trusted: give its CA with vault.ca_cert or vault.ca_cert_pem, or VAULT_CACERT; the name in vault.address must be one the certificate holds)",
        );
    }
    reason
}

/// What the auth and lease loops ask of Vault. Narrow on purpose: tests
/// script it (the agent's `tests/loops.rs`) and drive the real loops under tokio's
/// paused clock, where a real HTTP client cannot run.
pub trait Vault: Clone + Send + Sync + 'static {
    fn login(
        &self,
        kind: AuthMethod,
        mount: &str,
        role: &str,
        jwt: &SecretString,
    ) -> impl std::future::Future<Output = Result<Token, VaultError>> + Send;
    fn lookup_self(
        &self,
        token: &SecretString,
    ) -> impl std::future::Future<Output = Result<(Duration, bool), VaultError>> + Send;
    fn renew_self(
        &self,
        token: &SecretString,
        increment: Duration,
    ) -> impl std::future::Future<Output = Result<TokenRenewal, VaultError>> + Send;
    fn read_secret(
        &self,
        token: &SecretString,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> impl std::future::Future<Output = Result<Secret, VaultError>> + Send;
    fn renew_lease(
        &self,
        token: &SecretString,
        lease: &LeaseId,
        increment: Duration,
    ) -> impl std::future::Future<Output = Result<LeaseRenewal, VaultError>> + Send;
    fn revoke_lease(
        &self,
        token: &SecretString,
        lease: &LeaseId,
    ) -> impl std::future::Future<Output = Result<(), VaultError>> + Send;
    fn lookup_lease(
        &self,
        token: &SecretString,
        lease: &LeaseId,
    ) -> impl std::future::Future<Output = Result<(Duration, bool), VaultError>> + Send;
    fn revoke_self(&self, token: &SecretString) -> impl std::future::Future<Output = Result<(), VaultError>> + Send;
}

impl Vault for VaultClient {
    /// `auth/<mount>/login` with `role` and `jwt`: the Kubernetes and the
    /// JWT auth methods take the same request.
    async fn login(&self, kind: AuthMethod, mount: &str, role: &str, jwt: &SecretString) -> Result<Token, VaultError> {
        let op = match kind {
            AuthMethod::Kubernetes => "kubernetes login",
            AuthMethod::Jwt => "jwt login",
        };
        let body = json!({ "role": role, "jwt": jwt.expose_secret() });
        let env =
            self.call(op, Method::POST, &format!("auth/{}/login", mount.trim_matches('/')), None, Some(&body)).await?;
        decode_login(op, env)
    }

    /// `auth/token/lookup-self`: the token's remaining TTL and renewability.
    async fn lookup_self(&self, token: &SecretString) -> Result<(Duration, bool), VaultError> {
        let env = self.call("token lookup", Method::GET, "auth/token/lookup-self", Some(token), None).await?;
        ttl_and_renewable("token lookup", env.data)
    }

    async fn renew_self(&self, token: &SecretString, increment: Duration) -> Result<TokenRenewal, VaultError> {
        let op = "token renew";
        let body = json!({ "increment": increment.as_secs() });
        let env = self.call(op, Method::PUT, "auth/token/renew-self", Some(token), Some(&body)).await?;
        decode_token_renewal(op, env)
    }

    async fn revoke_self(&self, token: &SecretString) -> Result<(), VaultError> {
        self.call("token revoke", Method::PUT, "auth/token/revoke-self", Some(token), None).await.map(|_| ())
    }

    /// Reads (GET) or writes (POST with `body`) a secret path.
    async fn read_secret(
        &self,
        token: &SecretString,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Secret, VaultError> {
        // Reading a secret may create one (database/creds, pki/issue): one
        // that timed out or failed after it was sent may have made a user
        // already, so it is retried here only when it never left; the
        // supervisor re-issues deliberately, with its own backoff.
        let env = self.call_retrying("read secret", method, path, Some(token), body, VaultError::is_unsent).await?;
        Ok(decode_secret(env))
    }

    async fn renew_lease(
        &self,
        token: &SecretString,
        lease: &LeaseId,
        increment: Duration,
    ) -> Result<LeaseRenewal, VaultError> {
        let body = json!({ "increment": increment.as_secs() });
        let env = self.lease_call("lease renew", "sys/leases/renew", token, lease, body).await?;
        Ok(decode_lease_renewal(env))
    }

    async fn revoke_lease(&self, token: &SecretString, lease: &LeaseId) -> Result<(), VaultError> {
        self.lease_call("lease revoke", "sys/leases/revoke", token, lease, json!({})).await.map(|_| ())
    }

    /// `sys/leases/lookup`: the lease's TTL left and renewability.
    async fn lookup_lease(&self, token: &SecretString, lease: &LeaseId) -> Result<(Duration, bool), VaultError> {
        let body = json!({ "lease_id": lease.expose() });
        let env = self.call("lease lookup", Method::PUT, "sys/leases/lookup", Some(token), Some(&body)).await?;
        ttl_and_renewable("lease lookup", env.data)
    }
}

/// Whether the system's root certificates can be of use: only for an
/// `https://` address (a CA file, when given, replaces them: the caller's
/// part). Otherwise they are not loaded (a PEM bundle of some 200 KB parsed
/// at start, whose peak heap the allocator keeps: 0.45 MiB of a 4 MiB agent).
fn system_roots_needed(address: &str) -> bool {
    address.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// ring, for every TLS client of the process (reqwest is built without a
/// provider of its own, and panics at `build` without one). Called first
/// thing by every command; an error only says it was installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `builder` without the system's roots when requests to `address` cannot
/// use them (every HTTP client of the process: Vault, hooks, `status`).
pub fn without_unused_roots(builder: reqwest::ClientBuilder, address: &str) -> reqwest::ClientBuilder {
    if system_roots_needed(address) { builder } else { builder.tls_certs_only(Vec::new()) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_shows_an_accessor_short() {
        let accessor = "AbCdEfGhIjKlMnOpQrStUvWx";
        let token = super::Token {
            secret: super::SecretString::from("hvs.secret".to_string()),
            accessor: accessor.into(),
            ttl: std::time::Duration::from_secs(60),
            renewable: true,
            batch: false,
        };
        let block: super::types::AuthBlock = serde_json::from_value(serde_json::json!({
            "client_token": "hvs.secret", "accessor": accessor, "lease_duration": 60, "renewable": true
        }))
        .unwrap();
        for dbg in [format!("{token:?}"), format!("{block:?}")] {
            assert!(dbg.contains("AbCdEf…"), "{dbg}");
            assert!(!dbg.contains(accessor) && !dbg.contains("hvs.secret"), "{dbg}");
        }
    }

    #[test]
    fn system_roots_only_for_https() {
        assert!(super::system_roots_needed("https://vault.example:8200"));
        assert!(super::system_roots_needed("HTTPS://vault.example"));
        assert!(!super::system_roots_needed("http://127.0.0.1:8200"));
        assert!(!super::system_roots_needed("http://https.example"));
    }

    #[test]
    fn request_urls_keep_the_address_path() {
        let client = |address: &str| {
            super::VaultClient::new(super::ClientConfig {
                address: address.into(),
                ca_cert_pem: None,
                namespace: String::new(),
                request_timeout: std::time::Duration::from_secs(1),
                tls_skip_verify: false,
                max_retries: 0,
                redirect_hosts: Vec::new(),
            })
            .unwrap()
        };
        let renew = "sys/leases/renew/database/creds/app/AbC.123";
        assert_eq!(client("http://127.0.0.1:8200").url(renew).as_str(), format!("http://127.0.0.1:8200/v1/{renew}"));
        assert_eq!(
            client("http://vault:8200/").url("/auth/token/lookup-self").as_str(),
            "http://vault:8200/v1/auth/token/lookup-self"
        );
        assert_eq!(
            client("http://lb.example/vault/").url(renew).as_str(),
            format!("http://lb.example/vault/v1/{renew}")
        );
    }

    #[test]
    fn absurd_ttls_are_capped_not_overflowed() {
        // i64::MAX seconds from now overflows every clock (a panic before the cap).
        let body = br#"{"lease_id": "x/y", "lease_duration": 9223372036854775807, "renewable": true,
            "data": {"ttl": 9223372036854775807}, "auth": {"client_token": "t", "accessor": "a", "lease_duration": 9223372036854775807}}"#;
        for decoded in super::decode_every_answer(body) {
            assert_eq!(decoded.unwrap(), super::MAX_TTL);
        }
    }

    #[test]
    fn decode_errors_do_not_quote_the_response() {
        let e = serde_json::from_str::<super::types::Envelope>(r#"{"lease_duration": "hvs.SECRET"}"#).unwrap_err();
        let reason = super::decode_reason(&e);
        assert!(!reason.contains("hvs.SECRET"), "{reason}");
        assert!(reason.starts_with("Data error at line 1"), "{reason}");
    }
}
