//! Configuration: the YAML of DESIGN.md, defaults, `VAULT_*` environment
//! overrides and validation. Every error names the file, the key path (e.g.
//! `secrets[1].files[0].mode`) and what is wrong; the CLI exits 78 on it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub vault: VaultConfig,
    pub auth: AuthConfig,
    pub secrets: Vec<SecretConfig>,
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default = "d_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// The CA in PEM, inline (the injector delivers it so: no file to mount).
    #[serde(default)]
    pub ca_cert_pem: Option<String>,
    #[serde(default)]
    pub namespace: String,
    #[serde(default = "d_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default)]
    pub tls_skip_verify: bool,
    /// Hosts a standby may redirect requests (and the token) to, besides
    /// the configured one; another host over https with a verified
    /// certificate needs no listing.
    #[serde(default)]
    pub redirect_hosts: Vec<String>,
}

/// Exactly one login method (checked by `validate`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default, deserialize_with = "present")]
    pub kubernetes: Option<KubernetesAuth>,
    #[serde(default, deserialize_with = "present")]
    pub jwt: Option<JwtAuth>,
}

/// A method that is named must be complete: `kubernetes:` with nothing
/// under it is an error at `auth.kubernetes`, not "no method".
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesAuth {
    pub role: String,
    #[serde(default = "d_mount")]
    pub mount: String,
    #[serde(default = "d_token_path")]
    pub token_path: PathBuf,
}

/// JWT auth (`auth/<mount>/login` with `role` and `jwt`): Vault verifies the
/// ServiceAccount token itself (OIDC discovery or `jwt_validation_pubkeys`),
/// no TokenReview.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtAuth {
    pub role: String,
    #[serde(default = "d_jwt_mount")]
    pub mount: String,
    #[serde(default = "d_token_path")]
    pub token_path: PathBuf,
}

/// Which auth method logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    Kubernetes,
    Jwt,
}

impl AuthKind {
    /// The config key, also the operation's name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            AuthKind::Kubernetes => "kubernetes",
            AuthKind::Jwt => "jwt",
        }
    }
}

/// The chosen method's settings: both methods log in the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub kind: AuthKind,
    pub role: String,
    pub mount: String,
    pub token_path: PathBuf,
}

impl AuthConfig {
    /// The one configured method (`validate` guarantees there is one).
    pub fn login(&self) -> Login {
        match (&self.kubernetes, &self.jwt) {
            (_, Some(j)) => Login {
                kind: AuthKind::Jwt,
                role: j.role.clone(),
                mount: j.mount.clone(),
                token_path: j.token_path.clone(),
            },
            (Some(k), None) => Login {
                kind: AuthKind::Kubernetes,
                role: k.role.clone(),
                mount: k.mount.clone(),
                token_path: k.token_path.clone(),
            },
            (None, None) => {
                Login { kind: AuthKind::Kubernetes, role: String::new(), mount: d_mount(), token_path: d_token_path() }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Method {
    #[serde(rename = "GET", alias = "get")]
    Get,
    #[serde(rename = "POST", alias = "post")]
    Post,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    pub name: String,
    pub path: String,
    #[serde(default = "d_method")]
    pub method: Method,
    #[serde(default)]
    pub body: Option<Value>,
    #[serde(default = "d_renew_at")]
    pub renew_at: f64,
    #[serde(default = "d_jitter")]
    pub jitter: f64,
    /// Fraction of the lease's TTL until which failed renewals are retried
    /// before new credentials are issued; unset: 0.75, or `renew_at` when
    /// that is later (`SecretConfig::reissue_at`).
    #[serde(default, rename = "reissue_at")]
    pub reissue_at_key: Option<f64>,
    #[serde(default = "d_five_minutes", with = "humantime_serde")]
    pub revoke_replaced_after: Duration,
    #[serde(default = "d_five_minutes", with = "humantime_serde")]
    pub refresh_interval: Duration,
    pub files: Vec<FileConfig>,
    #[serde(default)]
    pub on_change: Option<OnChange>,
    /// A local PostgreSQL proxy logging in with this secret's credentials.
    #[serde(default)]
    pub proxy: Option<ProxyConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// `HOST:PORT` (an IP), or `unix:/absolute/path`.
    pub listen: Listen,
    /// The database, `HOST:PORT`.
    pub upstream: String,
    #[serde(default)]
    pub upstream_tls: UpstreamTls,
    /// The CA of the database's certificate (`verify-full`).
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// SCRAM-SHA-256-PLUS (`tls-server-end-point`) with the upstream; unset:
    /// `require` under `upstream_tls: require` (the certificate is not
    /// checked, so the binding is what shows the server is the database),
    /// `prefer` otherwise (`ProxyConfig::channel_binding`).
    #[serde(default, rename = "channel_binding")]
    pub channel_binding_key: Option<ChannelBinding>,
    /// Answer a server asking for a cleartext or md5 password even though
    /// its certificate is not verified (`upstream_tls` other than
    /// `verify-full`): whoever answers gets the password or its hash.
    #[serde(default)]
    pub allow_plain_password: bool,
    /// What happens to connections of replaced credentials.
    #[serde(default)]
    pub replaced_connections: ReplacedConnections,
    /// Under `replaced_connections: migrate`, what happens to a session
    /// whose state cannot move to new credentials (temporary tables,
    /// `LISTEN`, session advisory locks, `WITH HOLD` cursors, statements
    /// made with SQL `PREPARE`).
    #[serde(default)]
    pub unmigratable: Unmigratable,
    /// The upstream `application_name` names the pod and namespace
    /// (`POD_NAME`, `POD_NAMESPACE` from the downward API) beside the
    /// client's own, so `pg_stat_activity` and the server's logs say which
    /// pod holds a session.
    #[serde(default = "d_true")]
    pub attribution: bool,
    /// Clients must give a password the agent makes up at start
    /// (`{{ proxy.password }}` in templates).
    #[serde(default)]
    pub local_password: bool,
    /// How long a client has to send its startup packet (and the local
    /// password): a connection that says nothing is closed then.
    #[serde(default = "d_proxy_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Client connections at once, cancel requests included: more are
    /// told `53300` and closed, so a flood cannot take the descriptors the
    /// agent needs for its state and credential files.
    #[serde(default = "d_proxy_max_connections")]
    pub max_connections: usize,
}

fn d_proxy_startup_timeout() -> Duration {
    Duration::from_secs(10)
}

fn d_proxy_max_connections() -> usize {
    256
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplacedConnections {
    /// Moved to the new credentials at their next idle point (a new upstream
    /// login, the session's settings and prepared statements re-applied):
    /// the client sees nothing. Sessions that cannot move are handled as
    /// `unmigratable` says.
    #[default]
    Migrate,
    /// Closed between transactions (`57P01`) once `revoke_replaced_after`
    /// has passed, or before the old lease ends if sooner, then the old
    /// lease is revoked.
    Close,
    /// Kept until the client closes them, the old lease renewed meanwhile
    /// (closed between transactions only before the lease ends for good).
    Keep,
}

/// What becomes of a session that cannot migrate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmigratable {
    /// It stays on the old credentials, whose lease is renewed while it
    /// lasts, until the client leaves or, just before that lease ends for
    /// good, it is closed between transactions (or at the end).
    #[default]
    Keep,
    /// Closed at its next idle point (`57P01`).
    Close,
}

/// libpq's `channel_binding`, for the proxy's upstream logins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelBinding {
    /// Never bound (plain SCRAM-SHA-256).
    Disable,
    /// Bound when the server offers it over TLS.
    Prefer,
    /// Only SCRAM-SHA-256-PLUS: every other method, and a server letting the
    /// proxy in without one, is refused.
    Require,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    Disable,
    #[default]
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Json,
    Env,
    Template,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub format: Option<Format>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub template_file: Option<PathBuf>,
    #[serde(default = "d_mode", deserialize_with = "de_mode")]
    pub mode: u32,
    #[serde(default)]
    pub owner: Option<u32>,
    #[serde(default)]
    pub group: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnChange {
    #[serde(default)]
    pub signal: Option<SignalHook>,
    #[serde(default)]
    pub exec: Option<Vec<String>>,
    #[serde(default)]
    pub http: Option<HttpHook>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalHook {
    pub pid_file: PathBuf,
    #[serde(default = "d_sighup", deserialize_with = "signal_name")]
    pub signal: Signal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHook {
    pub url: String,
    #[serde(default = "d_post", deserialize_with = "http_method")]
    pub method: http::Method,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    #[serde(default = "d_true")]
    pub revoke: bool,
    #[serde(default = "d_shutdown_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { revoke: true, timeout: d_shutdown_timeout() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    #[serde(default = "d_listen", deserialize_with = "host_port")]
    pub listen: SocketAddr,
    /// Who is served `/v1/status` (the probes and `/metrics` are served to
    /// all).
    #[serde(default)]
    pub status: StatusAccess,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { listen: d_listen(), status: StatusAccess::default() }
    }
}

/// `telemetry.status`: `/v1/status` names the leases, their users' expiry
/// and errors; the kubelet and Prometheus do not need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusAccess {
    /// Only to connections from a loopback address (`leasehold status` in
    /// the pod, `kubectl port-forward`).
    #[default]
    Loopback,
    /// To anyone who reaches `telemetry.listen`.
    All,
    /// Not served. (`none`, not `off`: YAML reads `off` as `false`.)
    None,
}

impl StatusAccess {
    /// Whether a connection from `peer` is served `/v1/status`.
    pub fn serves(self, peer: std::net::IpAddr) -> bool {
        match self {
            StatusAccess::All => true,
            StatusAccess::None => false,
            // An IPv4 peer on an IPv6 socket arrives as ::ffff:127.0.0.1.
            StatusAccess::Loopback => match peer {
                std::net::IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
                v4 => v4.is_loopback(),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "d_log_format")]
    pub format: LogFormat,
    #[serde(default = "d_log_level")]
    pub level: LogLevel,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: d_log_format(), level: d_log_level() }
    }
}

// Values parsed once, here: what the agent, the proxy and the hooks use
// is typed, never a string parsed again downstream. Each error names the
// value and what was expected (the key path comes from `parse`).

/// Where the proxy listens: `HOST:PORT` (an IP), or `unix:/absolute/path`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl TryFrom<String> for Listen {
    type Error = String;
    fn try_from(s: String) -> Result<Listen, String> {
        let bad = || format!("{s:?} is not HOST:PORT (an IP) or unix:/absolute/path");
        match s.strip_prefix("unix:") {
            Some(path) if path.starts_with('/') => Ok(Listen::Unix(PathBuf::from(path))),
            Some(_) => Err(bad()),
            None => s.parse().map(Listen::Tcp).map_err(|_| bad()),
        }
    }
}

/// As written in the config: templates see it as `{{ proxy.listen }}`.
impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// `log.level`: a level (`debug`) or per-target directives
/// (`leasehold=debug,info`), kept with its text for comparisons.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct LogLevel {
    text: String,
    targets: tracing_subscriber::filter::Targets,
}

impl LogLevel {
    pub fn info() -> LogLevel {
        let targets =
            tracing_subscriber::filter::Targets::new().with_default(tracing_subscriber::filter::LevelFilter::INFO);
        LogLevel { text: "info".into(), targets }
    }

    pub fn targets(&self) -> &tracing_subscriber::filter::Targets {
        &self.targets
    }
}

impl PartialEq for LogLevel {
    fn eq(&self, other: &LogLevel) -> bool {
        self.text == other.text
    }
}

impl TryFrom<String> for LogLevel {
    type Error = String;
    fn try_from(text: String) -> Result<LogLevel, String> {
        match text.parse() {
            Ok(targets) => Ok(LogLevel { text, targets }),
            Err(_) => Err(format!("{text:?} is not a log level or filter")),
        }
    }
}

fn host_port<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| serde::de::Error::custom(format!("{s:?} is not HOST:PORT")))
}

fn signal_name<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| serde::de::Error::custom(format!("{s:?} is not a signal name like SIGHUP")))
}

fn http_method<'de, D: Deserializer<'de>>(d: D) -> Result<http::Method, D::Error> {
    let s = String::deserialize(d)?;
    http::Method::from_bytes(s.as_bytes()).map_err(|_| serde::de::Error::custom(format!("{s:?} is not an HTTP method")))
}

fn d_startup_timeout() -> Duration {
    Duration::from_secs(120)
}
fn d_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_mount() -> String {
    "kubernetes".into()
}
fn d_jwt_mount() -> String {
    "jwt".into()
}
fn d_token_path() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}
fn d_method() -> Method {
    Method::Get
}
fn d_renew_at() -> f64 {
    0.5
}
fn d_jitter() -> f64 {
    0.05
}
fn d_five_minutes() -> Duration {
    Duration::from_secs(300)
}
/// Owner and group may read; nobody writes in place (files are replaced).
fn d_mode() -> u32 {
    0o440
}
fn d_sighup() -> Signal {
    Signal::SIGHUP
}
fn d_post() -> http::Method {
    http::Method::POST
}
fn d_true() -> bool {
    true
}
fn d_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9102))
}
fn d_log_format() -> LogFormat {
    LogFormat::Json
}
fn d_log_level() -> LogLevel {
    LogLevel::info()
}

/// File modes as an octal string (`"0440"`) or an unquoted YAML number
/// whose digits are read as octal (`0440` → 0o440).
fn de_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = Value::deserialize(d)?;
    let digits = match &v {
        Value::String(s) => s.trim().trim_start_matches("0o").to_string(),
        // YAML parsers disagree on `0600` (int 600, octal 384, float 600.0):
        // take the written digits when the number is whole.
        Value::Number(n) if n.is_u64() => n.to_string(),
        Value::Number(n) if n.as_f64().is_some_and(|f| f >= 0.0 && f.fract() == 0.0 && f < 1e6) => {
            format!("{}", n.as_f64().unwrap_or_default() as u64)
        }
        _ => {
            return Err(serde::de::Error::custom(format!("expected an octal mode like \"0440\", got {v}")));
        }
    };
    match u32::from_str_radix(&digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(serde::de::Error::custom(format!("invalid mode {v}: expected octal digits, at most 7777"))),
    }
}

/// Where environment overrides come from (the process, or a map in tests).
pub type Env<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// `-c env:NAME`: the config is the value of the environment variable
/// NAME (the injector delivers it so; the image has no shell to write a
/// file). Such a config has no file to watch.
pub fn env_source(path: &Path) -> Option<&str> {
    path.to_str()?.strip_prefix("env:").filter(|n| !n.is_empty())
}

/// The config's text, from its file or (`env:NAME`) its variable.
pub fn read_source(path: &Path, env: Env) -> Result<String, ConfigError> {
    let err = |message: String| ConfigError { file: path.display().to_string(), key: "(file)".into(), message };
    match env_source(path) {
        Some(name) => env(name).ok_or_else(|| err(format!("the environment variable {name} is not set"))),
        None => std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}"))),
    }
}

impl Config {
    /// Reads, parses, applies environment overrides and validates.
    pub fn load(path: &Path, env: Env) -> Result<Config, ConfigError> {
        let text = read_source(path, env)?;
        Self::parse(&text, path, env)
    }

    pub fn parse(text: &str, path: &Path, env: Env) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let err = |key: &str, message: String| ConfigError { file: file.clone(), key: key.to_string(), message };
        let value: Value = serde_saphyr::from_str(text).map_err(|e| err("(syntax)", first_line(&e.to_string())))?;
        if !value.is_object() {
            return Err(err("(top level)", "expected a mapping with `vault`, `auth` and `secrets`".into()));
        }
        let mut config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { "(top level)".to_string() } else { key };
            err(&key, e.into_inner().to_string())
        })?;
        if let Some(addr) = env("VAULT_ADDR") {
            config.vault.address = addr;
        }
        if let Some(ca) = env("VAULT_CACERT") {
            config.vault.ca_cert = Some(PathBuf::from(ca));
            config.vault.ca_cert_pem = None;
        }
        if let Some(ns) = env("VAULT_NAMESPACE") {
            config.vault.namespace = ns;
        }
        config.validate().map_err(|(key, message)| err(&key, message))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_vault_and_auth()?;
        if self.secrets.is_empty() {
            return Err(("secrets".into(), "at least one secret is required".into()));
        }
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for (i, s) in self.secrets.iter().enumerate() {
            if !names.insert(s.name.as_str()) {
                return Err((format!("secrets[{i}].name"), format!("duplicate secret name {:?}", s.name)));
            }
            s.validate(i, &mut paths)?;
        }
        // The state file holds tokens and passwords: never where the app
        // reads its credentials (that volume is shared with it).
        if let Some(dir) = &self.state_dir
            && let Some(f) = paths.iter().find(|p| p.parent() == Some(dir.as_path()))
        {
            return Err((
                "state_dir".into(),
                format!(
                    "{} is also where {} is written: the app would see the agent's tokens",
                    dir.display(),
                    f.display()
                ),
            ));
        }
        let fail = |key: &str, msg: &str| Err((key.to_string(), msg.to_string()));
        if self.startup_timeout.is_zero() {
            return fail("startup_timeout", "must be greater than 0");
        }
        if self.shutdown.timeout.is_zero() {
            return fail("shutdown.timeout", "must be greater than 0");
        }
        Ok(())
    }

    fn validate_vault_and_auth(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, msg: &str| Err((key.to_string(), msg.to_string()));
        let addr = &self.vault.address;
        if addr.is_empty() {
            return fail("vault.address", "is required (or set VAULT_ADDR)");
        }
        if let Some(problem) = http_url_problem(addr) {
            return Err(("vault.address".into(), problem));
        }
        if self.vault.ca_cert.is_some() && self.vault.ca_cert_pem.is_some() {
            return fail("vault.ca_cert_pem", "set either vault.ca_cert or vault.ca_cert_pem, not both");
        }
        if self.vault.ca_cert_pem.as_deref().is_some_and(|p| !p.contains("-----BEGIN CERTIFICATE-----")) {
            return fail("vault.ca_cert_pem", "is not a PEM certificate (no -----BEGIN CERTIFICATE-----)");
        }
        if self.vault.request_timeout.is_zero() {
            return fail("vault.request_timeout", "must be greater than 0");
        }
        match (&self.auth.kubernetes, &self.auth.jwt) {
            (Some(_), Some(_)) => return fail("auth", "set exactly one method: kubernetes or jwt, not both"),
            (None, None) => return fail("auth", "set exactly one method: kubernetes or jwt"),
            _ => {}
        }
        let login = self.auth.login();
        let key = |k: &str| format!("auth.{}.{k}", login.kind.name());
        if login.role.trim().is_empty() {
            return Err((key("role"), "must not be empty".into()));
        }
        if login.mount.trim_matches('/').is_empty() {
            return Err((key("mount"), "must not be empty".into()));
        }
        Ok(())
    }
}

/// `reissue_at` when the config leaves it out.
pub const DEFAULT_REISSUE_AT: f64 = 0.75;

impl SecretConfig {
    /// Until which fraction of its TTL a lease whose renewals fail is
    /// renewed again before new credentials are issued: the key, else 0.75
    /// (or `renew_at` when that is later: no retry window then, as before
    /// the key existed).
    pub fn reissue_at(&self) -> f64 {
        self.reissue_at_key.unwrap_or(DEFAULT_REISSUE_AT.max(self.renew_at))
    }

    /// One secret's keys; `paths` are the files of the secrets before it.
    fn validate(&self, i: usize, paths: &mut HashSet<PathBuf>) -> Result<(), (String, String)> {
        let s = self;
        let key = |k: &str| format!("secrets[{i}].{k}");
        if s.name.is_empty()
            || !s.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err((key("name"), format!("{:?} must match [a-z0-9_-]+", s.name)));
        }
        let p = s.path.trim_matches('/');
        if p.is_empty() || p.starts_with("v1/") {
            return Err((
                key("path"),
                format!("{:?} must be a Vault path like database/creds/<role> (without /v1/)", s.path),
            ));
        }
        if s.body.is_some() && s.method == Method::Get {
            return Err((key("body"), "is only sent with method: POST".into()));
        }
        if !(s.renew_at > 0.0 && s.renew_at < 1.0) {
            return Err((key("renew_at"), format!("{} must be between 0 and 1 (exclusive)", s.renew_at)));
        }
        if !(s.jitter >= 0.0 && s.jitter < s.renew_at) {
            return Err((key("jitter"), format!("{} must be at least 0 and less than renew_at", s.jitter)));
        }
        if let Some(r) = s.reissue_at_key
            && !(r >= s.renew_at && r < 1.0)
        {
            return Err((key("reissue_at"), format!("{r} must be at least renew_at ({}) and less than 1", s.renew_at)));
        }
        if s.refresh_interval.is_zero() {
            return Err((key("refresh_interval"), "must be greater than 0".into()));
        }
        if s.files.is_empty() && s.proxy.is_none() {
            return Err((key("files"), "at least one file is required (or a `proxy`)".into()));
        }
        if let Some(p) = &s.proxy {
            p.validate(&key)?;
        }
        for (j, f) in s.files.iter().enumerate() {
            f.validate(&|k: &str| format!("secrets[{i}].files[{j}].{k}"), paths)?;
        }
        if let Some(hooks) = &s.on_change {
            hooks.validate(&key)?;
        }
        Ok(())
    }
}

type Key<'a> = &'a dyn Fn(&str) -> String;

impl ProxyConfig {
    /// `channel_binding`, or its default for `upstream_tls`.
    pub fn channel_binding(&self) -> ChannelBinding {
        match (self.channel_binding_key, self.upstream_tls) {
            (Some(b), _) => b,
            (None, UpstreamTls::Require) => ChannelBinding::Require,
            (None, UpstreamTls::Disable | UpstreamTls::VerifyFull) => ChannelBinding::Prefer,
        }
    }

    fn validate(&self, key: Key) -> Result<(), (String, String)> {
        let p = self;
        let port = p.upstream.rsplit_once(':').and_then(|(h, port)| (!h.is_empty()).then_some(port));
        if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
            return Err((key("proxy.upstream"), format!("{:?} is not HOST:PORT", p.upstream)));
        }
        if p.max_connections == 0 {
            return Err((key("proxy.max_connections"), "must be at least 1".into()));
        }
        match (p.upstream_tls, &p.ca_cert) {
            (UpstreamTls::VerifyFull, None) => {
                return Err((key("proxy.ca_cert"), "upstream_tls: verify-full needs the database's CA".into()));
            }
            (UpstreamTls::Disable | UpstreamTls::Require, Some(_)) => {
                return Err((key("proxy.ca_cert"), "is used only with upstream_tls: verify-full".into()));
            }
            _ => {}
        }
        if p.upstream_tls == UpstreamTls::Disable && p.channel_binding_key == Some(ChannelBinding::Require) {
            return Err((key("proxy.channel_binding"), "require needs TLS: upstream_tls is disable".into()));
        }
        if p.channel_binding() == ChannelBinding::Require && p.allow_plain_password {
            return Err((
                key("proxy.allow_plain_password"),
                "contradicts channel_binding: require (the default under upstream_tls: require); set channel_binding: prefer too".into(),
            ));
        }
        Ok(())
    }
}

impl FileConfig {
    fn validate(&self, fkey: Key, paths: &mut HashSet<PathBuf>) -> Result<(), (String, String)> {
        let f = self;
        if !f.path.is_absolute() {
            return Err((fkey("path"), format!("{} must be an absolute path", f.path.display())));
        }
        if f.path.file_name().is_none() {
            return Err((fkey("path"), format!("{} must name a file", f.path.display())));
        }
        if !paths.insert(f.path.clone()) {
            return Err((fkey("path"), format!("{} is written by another file entry", f.path.display())));
        }
        let templated = f.template.is_some() as u8 + f.template_file.is_some() as u8;
        if templated > 1 {
            return Err((fkey("template"), "`template` and `template_file` are exclusive".into()));
        }
        match (f.format, templated) {
            (None, 0) => {
                return Err((fkey("format"), "needs `format` (json, env), `template` or `template_file`".into()));
            }
            (Some(Format::Template), 0) => {
                return Err((fkey("format"), "`format: template` needs `template` or `template_file`".into()));
            }
            (Some(Format::Json | Format::Env), 1) => {
                return Err((fkey("format"), "`format: json|env` cannot be combined with a template".into()));
            }
            _ => {}
        }
        Ok(())
    }
}

impl OnChange {
    fn validate(&self, key: Key) -> Result<(), (String, String)> {
        let hooks = self;
        if let Some(argv) = &hooks.exec
            && argv.first().is_none_or(|a| a.is_empty())
        {
            return Err((key("on_change.exec"), "needs a program as its first element".into()));
        }
        if let Some(http) = &hooks.http
            && let Some(problem) = http_url_problem(&http.url)
        {
            return Err((key("on_change.http.url"), problem));
        }
        Ok(())
    }
}

/// Why `v` is not an http:// or https:// URL, if it is not. URLs are parsed
/// without Unicode tables (`idna_adapter` 1.0 in Cargo.lock: 64 KiB less
/// resident): a host name that is not ASCII is refused, naming the way out.
pub fn http_url_problem(v: &str) -> Option<String> {
    if !(v.starts_with("http://") || v.starts_with("https://")) {
        return Some(format!("{v:?} is not an http:// or https:// URL"));
    }
    match url::Url::parse(v) {
        Ok(_) => None,
        Err(url::ParseError::IdnaError) => {
            Some(format!("{v:?} has a host name that is not ASCII: write it in its xn-- (punycode) form"))
        }
        Err(e) => Some(format!("{v:?} is not an http:// or https:// URL ({e})")),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
vault:
  address: http://127.0.0.1:8200
auth:
  kubernetes:
    role: app
secrets:
  - name: db
    path: database/creds/app
    files:
      - path: /tmp/db.json
        format: json
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("leasehold.yaml"), &no_env)
    }

    #[test]
    fn reissue_at_defaults_to_three_quarters_or_renew_at_and_is_checked() {
        let with = |keys: &str| parse(&MINIMAL.replace("    path: database", &format!("{keys}    path: database")));
        assert_eq!(with("    renew_at: 0.8\n").unwrap().secrets[0].reissue_at(), 0.8, "a later renew_at: no window");
        assert_eq!(with("    reissue_at: 0.9\n").unwrap().secrets[0].reissue_at(), 0.9);
        for bad in ["    reissue_at: 0.4\n", "    reissue_at: 1\n", "    renew_at: 0.6\n    reissue_at: 0.55\n"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("secrets[0].reissue_at") && err.contains("at least renew_at"), "{err}");
        }
    }

    #[test]
    fn defaults_apply() {
        let c = parse(MINIMAL).unwrap();
        let s = &c.secrets[0];
        assert_eq!(s.renew_at, 0.5);
        assert_eq!(s.reissue_at(), 0.75);
        assert_eq!(s.method, Method::Get);
        assert_eq!(s.files[0].mode, 0o440);
        let login = c.auth.login();
        assert_eq!((login.kind, login.mount.as_str()), (AuthKind::Kubernetes, "kubernetes"));
        assert_eq!(c.shutdown.timeout, Duration::from_secs(10));
        assert!(c.shutdown.revoke);
        assert_eq!(c.telemetry.listen.to_string(), "0.0.0.0:9102");
    }

    /// Cargo.lock pins `idna_adapter` 1.0 (no Unicode tables): a non-ASCII
    /// host name gets its own message, and its xn-- form passes.
    #[test]
    fn vault_addresses_are_checked_and_a_non_ascii_host_is_named() {
        let with = |addr: &str| parse(&MINIMAL.replace("http://127.0.0.1:8200", addr));
        for good in ["https://vault.example:8200", "https://vault.xn--bcher-kva.example", "http://[::1]:8200"] {
            assert!(with(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("https://vault.bücher.example:8200", "not ASCII: write it in its xn-- (punycode) form"),
            ("vault:8200", "is not an http:// or https:// URL"),
            ("https://vault:99999", "is not an http:// or https:// URL (invalid port number)"),
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("vault.address") && err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn env_overrides_address() {
        let env = |k: &str| (k == "VAULT_ADDR").then(|| "https://vault:8200".to_string());
        let c = Config::parse(MINIMAL, Path::new("x.yaml"), &env).unwrap();
        assert_eq!(c.vault.address, "https://vault:8200");
    }

    #[test]
    fn a_config_from_an_environment_variable() {
        let env = |k: &str| (k == "LEASEHOLD_CONFIG").then(|| MINIMAL.to_string());
        let c = Config::load(Path::new("env:LEASEHOLD_CONFIG"), &env).unwrap();
        assert_eq!(c.secrets[0].name, "db");
        let e = Config::load(Path::new("env:MISSING"), &env).unwrap_err();
        assert!(e.to_string().contains("MISSING is not set"), "{e}");
        assert_eq!(env_source(Path::new("env:")), None, "a file named `env:`");
    }

    /// MINIMAL with `proxy` (its keys, indented) under the secret.
    fn with_proxy(proxy: &str) -> String {
        MINIMAL.replace("    files:\n", &format!("    proxy:\n{proxy}    files:\n"))
    }

    #[test]
    fn a_proxy_is_checked() {
        let with = with_proxy;
        let ok = parse(&with("      listen: 127.0.0.1:5432\n      upstream: db.prod.svc:5432\n")).unwrap();
        let p = ok.secrets[0].proxy.clone().unwrap();
        assert_eq!((p.upstream_tls, p.ca_cert), (UpstreamTls::Require, None));
        assert_eq!((p.replaced_connections, p.local_password), (ReplacedConnections::Migrate, false));
        assert_eq!((p.unmigratable, p.attribution), (Unmigratable::Keep, true));
        let keep = with(
            "      listen: 127.0.0.1:5432\n      upstream: db:5432\n      replaced_connections: keep\n      local_password: true\n      unmigratable: close\n      attribution: false\n",
        );
        let p = parse(&keep).unwrap().secrets[0].proxy.clone().unwrap();
        assert_eq!((p.replaced_connections, p.local_password), (ReplacedConnections::Keep, true));
        assert_eq!((p.unmigratable, p.attribution), (Unmigratable::Close, false));
        for (proxy, key) in [
            (
                "      listen: 127.0.0.1:5432\n      upstream: db:5432\n      replaced_connections: drain\n",
                "secrets[0].proxy.replaced_connections",
            ),
            (
                "      listen: 127.0.0.1:5432\n      upstream: db:5432\n      unmigratable: wait\n",
                "secrets[0].proxy.unmigratable",
            ),
            ("      listen: localhost:5432\n      upstream: db:5432\n", "secrets[0].proxy.listen"),
            ("      listen: unix:relative.sock\n      upstream: db:5432\n", "secrets[0].proxy.listen"),
            ("      listen: 127.0.0.1:5432\n      upstream: db\n", "secrets[0].proxy.upstream"),
            (
                "      listen: 127.0.0.1:5432\n      upstream: db:5432\n      upstream_tls: verify-full\n",
                "secrets[0].proxy.ca_cert",
            ),
            (
                "      listen: 127.0.0.1:5432\n      upstream: db:5432\n      ca_cert: /ca.pem\n",
                "secrets[0].proxy.ca_cert",
            ),
            (
                "      listen: 127.0.0.1:5432\n      upstream: db:5432\n      upstream_tls: prefer\n",
                "secrets[0].proxy.upstream_tls",
            ),
            (
                "      listen: 127.0.0.1:5432\n      upstream: db:5432\n      upstream_tls: disable\n      channel_binding: require\n",
                "secrets[0].proxy.channel_binding",
            ),
            (
                "      listen: 127.0.0.1:5432\n      upstream: db:5432\n      allow_plain_password: true\n",
                "secrets[0].proxy.allow_plain_password",
            ),
        ] {
            assert_eq!(error_key(&with(proxy)), key, "{proxy}");
        }
    }

    /// #23: with the certificate unchecked, channel binding is what keeps a
    /// man in the middle out, so it is required by default there.
    #[test]
    fn channel_binding_is_required_where_the_certificate_is_not_checked() {
        let binding = |extra: &str| {
            let text = with_proxy(&format!("      listen: 127.0.0.1:5432\n      upstream: db:5432\n{extra}"));
            parse(&text).unwrap().secrets[0].proxy.clone().unwrap().channel_binding()
        };
        assert_eq!(binding(""), ChannelBinding::Require);
        assert_eq!(binding("      upstream_tls: disable\n"), ChannelBinding::Prefer);
        assert_eq!(binding("      upstream_tls: verify-full\n      ca_cert: /ca.pem\n"), ChannelBinding::Prefer);
        assert_eq!(binding("      channel_binding: disable\n"), ChannelBinding::Disable);
        let plain = "      channel_binding: prefer\n      allow_plain_password: true\n";
        assert_eq!(binding(plain), ChannelBinding::Prefer);
    }

    #[test]
    fn an_inline_ca_or_a_file_not_both() {
        let pem = "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n";
        let inline = MINIMAL.replace(
            "  address: http://127.0.0.1:8200",
            &format!("  address: http://127.0.0.1:8200\n  ca_cert_pem: \"{pem}\""),
        );
        assert!(parse(&inline).unwrap().vault.ca_cert_pem.unwrap().starts_with("-----BEGIN CERTIFICATE-----\n"));
        let both = inline.replace("  ca_cert_pem:", "  ca_cert: /ca.pem\n  ca_cert_pem:");
        assert_eq!(error_key(&both), "vault.ca_cert_pem");
        let junk = MINIMAL
            .replace("  address: http://127.0.0.1:8200", "  address: http://127.0.0.1:8200\n  ca_cert_pem: nope");
        assert_eq!(error_key(&junk), "vault.ca_cert_pem");
        // VAULT_CACERT wins over the inline CA, as over the file.
        let env = |k: &str| (k == "VAULT_CACERT").then(|| "/etc/ca.pem".to_string());
        let c = Config::parse(&inline, Path::new("x.yaml"), &env).unwrap();
        assert_eq!((c.vault.ca_cert.as_deref(), c.vault.ca_cert_pem), (Some(Path::new("/etc/ca.pem")), None));
    }

    fn error_key(text: &str) -> String {
        parse(text).unwrap_err().key
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(error_key(&MINIMAL.replace("role: app", "role: app\n    extra: 1")), "auth.kubernetes.extra");
        assert_eq!(
            error_key(&MINIMAL.replace("format: json", "format: json\n        mode: \"0999\"")),
            "secrets[0].files[0].mode"
        );
        assert_eq!(
            error_key(&MINIMAL.replace("path: database", "refresh_interval: soon\n    path: database")),
            "secrets[0].refresh_interval"
        );
        assert_eq!(error_key(&MINIMAL.replace("    role: app\n", "")), "auth.kubernetes");
        assert_eq!(error_key(&MINIMAL.replace("format: json", "")), "secrets[0].files[0].format");
        let dup =
            format!("{MINIMAL}  - name: db\n    path: x/y\n    files:\n      - path: /tmp/b\n        format: env\n");
        let e = parse(&dup).unwrap_err();
        assert_eq!(e.key, "secrets[1].name");
        assert!(e.message.contains("duplicate"));
        assert_eq!(e.file, "leasehold.yaml");
    }

    #[test]
    fn the_state_dir_is_never_a_credentials_directory() {
        let yaml = |state: &str| {
            format!(
                "vault:\n  address: http://v:8200\nauth:\n  kubernetes:\n    role: r\nstate_dir: {state}\nsecrets:\n  - name: db\n    path: database/creds/r\n    files:\n      - path: /vault/secrets/db.json\n        format: json\n"
            )
        };
        let e = Config::parse(&yaml("/vault/secrets"), Path::new("c.yaml"), &|_| None).unwrap_err();
        assert_eq!(e.key, "state_dir", "{e}");
        assert!(Config::parse(&yaml("/var/run/leasehold"), Path::new("c.yaml"), &|_| None).is_ok());
    }

    #[test]
    fn exactly_one_auth_method() {
        let jwt = MINIMAL.replace("kubernetes:", "jwt:");
        let login = parse(&jwt).unwrap().auth.login();
        assert_eq!((login.kind, login.mount.as_str(), login.role.as_str()), (AuthKind::Jwt, "jwt", "app"));
        assert_eq!(login.token_path, d_token_path());
        let both = MINIMAL.replace(
            "    role: app
",
            "    role: app
  jwt:
    role: app
",
        );
        let e = parse(&both).unwrap_err();
        assert_eq!((e.key.as_str(), e.message.contains("not both")), ("auth", true), "{}", e.message);
        assert_eq!(
            error_key(&MINIMAL.replace(
                "  kubernetes:
    role: app
",
                "  {}
"
            )),
            "auth"
        );
        assert_eq!(error_key(&jwt.replace("role: app", "role: \"\"")), "auth.jwt.role");
    }

    #[test]
    fn unquoted_octal_mode_reads_as_octal() {
        let c = parse(&MINIMAL.replace("format: json", "format: json\n        mode: 0600")).unwrap();
        assert_eq!(c.secrets[0].files[0].mode, 0o600);
    }
}
