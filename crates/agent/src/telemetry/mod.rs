//! Telemetry: what the agent knows about each secret (for `/readyz`,
//! `/v1/status` and `/metrics`), logging setup, and process hardening.
//! Nothing here ever holds a secret value: lease ids are stored shortened.

pub mod events;
mod logging;
pub mod metrics;
pub mod server;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};

use crate::clock::rfc3339;
#[cfg(feature = "demo")]
pub use logging::init_demo_logging;
pub use logging::init_logging;
use metrics::{Counts, Metrics};
use vault::RequestObserver;
use vault::secret::{Accessor, LeaseId};

#[derive(Debug, Clone, Serialize)]
pub struct FileStatus {
    pub path: PathBuf,
    pub last_write: Option<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct SecretStatus {
    pub name: String,
    pub path: String,
    pub ready: bool,
    pub reason: Option<String>,
    /// Shortened so that it cannot be used.
    pub lease: Option<String>,
    pub renewable: bool,
    pub ttl_secs: u64,
    pub issued_at: Option<String>,
    pub expires_at: Option<String>,
    pub last_renewal: Option<String>,
    pub renewals: u64,
    pub issues: u64,
    pub consecutive_failures: u64,
    pub last_error: Option<String>,
    /// How long replaced credentials keep working after new files are
    /// written: a pool's max lifetime below it never holds a connection of
    /// a dropped role (`schedule::rotation_window`).
    pub rotation_window_secs: Option<u64>,
    pub files: Vec<FileStatus>,
    #[serde(skip)]
    rendered: bool,
    #[serde(skip)]
    expires: Option<SystemTime>,
}

impl SecretStatus {
    /// Ready: files written with credentials that have not expired.
    fn evaluate(&self, now: SystemTime) -> (bool, Option<String>) {
        if !self.rendered {
            let why = match &self.last_error {
                Some(e) => format!("not rendered yet; last error: {e}"),
                None => "not rendered yet".to_string(),
            };
            return (false, Some(why));
        }
        match self.expires {
            Some(t) if t <= now => (false, Some(format!("credentials expired at {}", rfc3339(t)))),
            _ => (true, None),
        }
    }
}

#[derive(Default)]
struct TokenStatus {
    accessor: Accessor,
    expires_at: Option<SystemTime>,
}

pub struct Telemetry {
    pub metrics: Metrics,
    registry: prometheus_client::registry::Registry,
    /// Read by `/readyz`, `/v1/status` and, at each scrape, the secrets'
    /// gauges (`metrics::SecretCollector`).
    secrets: Arc<Mutex<BTreeMap<String, SecretStatus>>>,
    /// The secrets' counters, read at each scrape.
    counts: Arc<Mutex<BTreeMap<String, Counts>>>,
    token: Mutex<TokenStatus>,
    proxies: metrics::Proxies,
    /// The last request to Vault failed (no answer, 5xx, 429, 412).
    vault_failing: std::sync::atomic::AtomicBool,
    /// Woken when Vault answers after a failure: the loops waiting out a
    /// backoff try again at once (`vault_back`).
    vault_back: tokio::sync::Notify,
}

/// A panic aborts the process (panic = "abort"): a poisoned lock's data is
/// as good as any.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Telemetry {
    pub fn new() -> Arc<Telemetry> {
        let proxies = metrics::Proxies::default();
        let (secrets, counts) = (Arc::default(), Arc::default());
        let collector = metrics::SecretCollector { status: Arc::clone(&secrets), counts: Arc::clone(&counts) };
        let (metrics, registry) = Metrics::register(collector, proxies.clone());
        for ok in [true, false] {
            let _ = metrics.logins.get_or_create(&metrics::result(ok));
            let _ = metrics.token_renewals.get_or_create(&metrics::result(ok));
        }
        for result in ["success", "rejected"] {
            let _ = metrics.reloads.get_or_create(&metrics::ResultLabel { result: result.to_string() });
        }
        Arc::new(Telemetry {
            metrics,
            registry,
            secrets,
            counts,
            token: Mutex::default(),
            proxies,
            vault_failing: Default::default(),
            vault_back: tokio::sync::Notify::new(),
        })
    }

    /// Completes when a request to Vault succeeds after one failed (the
    /// one "Vault answers again" signal the auth and lease loops share).
    pub fn vault_back(&self) -> tokio::sync::futures::Notified<'_> {
        self.vault_back.notified()
    }

    /// Declares a secret (at start and on reload); keeps what is known.
    pub fn declare(&self, name: &str, path: &str, files: &[PathBuf]) {
        // Every series of the secret at 0 from the start: a rule or a
        // dashboard query on a failure that has not happened yet sees 0,
        // not nothing, and `rate()` counts the first one.
        self.count(name, |_| {});
        let mut secrets = lock(&self.secrets);
        let entry = secrets
            .entry(name.to_string())
            .or_insert_with(|| SecretStatus { name: name.to_string(), ..Default::default() });
        if entry.path != path {
            *entry = SecretStatus { name: name.to_string(), path: path.to_string(), ..Default::default() };
        }
        let old: Vec<FileStatus> = std::mem::take(&mut entry.files);
        entry.files = files
            .iter()
            .map(|p| {
                old.iter().find(|f| &f.path == p).cloned().unwrap_or(FileStatus { path: p.clone(), last_write: None })
            })
            .collect();
    }

    /// Its gauges go with its status; its counters stay.
    pub fn remove(&self, name: &str) {
        lock(&self.secrets).remove(name);
    }

    fn count(&self, name: &str, f: impl FnOnce(&mut Counts)) {
        let mut counts = lock(&self.counts);
        match counts.get_mut(name) {
            Some(c) => f(c),
            None => f(counts.entry(name.to_string()).or_default()),
        }
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut SecretStatus)) {
        if let Some(s) = lock(&self.secrets).get_mut(name) {
            f(s);
        }
    }

    /// New credentials; `expires` is when they end (none for a KV secret).
    pub fn issued(
        &self,
        name: &str,
        lease: &LeaseId,
        ttl: Duration,
        renewable: bool,
        at: SystemTime,
        expires: Option<SystemTime>,
    ) {
        self.count(name, |c| c.issued[Counts::slot(true)] += 1);
        self.update(name, |s| {
            s.issues += 1;
            s.lease = (!lease.is_empty()).then(|| lease.short());
            s.renewable = renewable;
            s.ttl_secs = ttl.as_secs();
            s.issued_at = Some(rfc3339(at));
            s.expires_at = expires.map(rfc3339);
            s.expires = expires;
            s.consecutive_failures = 0;
            s.last_error = None;
        });
    }

    /// A lease adopted from the state file: its files count as rendered once
    /// the supervisor re-renders them.
    pub fn adopted(&self, name: &str, lease: &LeaseId, ttl: Duration, renewable: bool, at: SystemTime) {
        let expires = at + ttl;
        self.update(name, |s| {
            s.lease = Some(lease.short());
            s.renewable = renewable;
            s.ttl_secs = ttl.as_secs();
            s.expires_at = Some(rfc3339(expires));
            s.expires = Some(expires);
        });
    }

    // Through `events` only: the log line goes with it.
    fn failed(&self, name: &str, what: &str, error: &str) {
        let slot = Counts::slot(false);
        self.count(name, |c| match what {
            "issue" => c.issued[slot] += 1,
            _ => c.renewals[slot] += 1,
        });
        self.update(name, |s| {
            s.consecutive_failures += 1;
            s.last_error = Some(format!("{what}: {error}"));
        });
    }

    // Through `events` only: the log line goes with it.
    fn renewed(&self, name: &str, ttl: Duration, renewable: bool, at: SystemTime) {
        self.count(name, |c| c.renewals[Counts::slot(true)] += 1);
        let expires = at + ttl;
        self.update(name, |s| {
            s.renewals += 1;
            s.renewable = renewable;
            s.ttl_secs = ttl.as_secs();
            s.last_renewal = Some(rfc3339(at));
            s.expires_at = Some(rfc3339(expires));
            s.expires = Some(expires);
            s.consecutive_failures = 0;
            s.last_error = None;
        });
    }

    /// The lease ended early (Vault said it is gone).
    // Through `events` only: the log line goes with it.
    fn lease_ended(&self, name: &str, at: SystemTime, error: &str) {
        self.update(name, |s| {
            s.expires = Some(at);
            s.expires_at = Some(rfc3339(at));
            s.last_error = Some(format!("renew: {error}"));
        });
    }

    // Through `events` only: the log line goes with it.
    fn revoked(&self, name: &str, ok: bool) {
        self.count(name, |c| c.revocations[Counts::slot(ok)] += 1);
    }

    // Through `events` only: the log line goes with it.
    fn rendered(&self, name: &str, written: &[(PathBuf, bool)], window: Option<Duration>, at: SystemTime) {
        self.update(name, |s| {
            s.rendered = true;
            s.rotation_window_secs = window.map(|w| w.as_secs());
            for (path, changed) in written {
                if let Some(f) = s.files.iter_mut().find(|f| &f.path == path)
                    && (*changed || f.last_write.is_none())
                {
                    f.last_write = Some(rfc3339(at));
                }
            }
        });
    }

    // Through `events` only: the log line goes with it.
    fn expired(&self, name: &str) {
        self.count(name, |c| c.expired += 1);
    }

    // Through `events` only: the log line goes with it.
    fn render_failed(&self, name: &str, error: &str) {
        self.count(name, |c| c.render_failures += 1);
        self.update(name, |s| {
            s.consecutive_failures += 1;
            s.last_error = Some(format!("render: {error}"));
        });
    }

    // Through `events` only: the log line goes with it.
    fn notified(&self, name: &str, hook: &str, ok: bool) {
        let labels = metrics::HookLabels {
            secret: name.to_string(),
            hook: hook.to_string(),
            result: if ok { "success" } else { "failure" }.to_string(),
        };
        self.metrics.notifications.get_or_create(&labels).inc();
    }

    // Through `events` only: the log line goes with it.
    fn login(&self, ok: bool) {
        self.metrics.logins.get_or_create(&metrics::result(ok)).inc();
    }

    // Through `events` only: the log line goes with it.
    fn token_renewed(&self, ok: bool) {
        self.metrics.token_renewals.get_or_create(&metrics::result(ok)).inc();
    }

    // Through `events` only: the log line goes with it.
    fn token(&self, accessor: &Accessor, expires_at: SystemTime) {
        self.metrics.token_expiry.set(crate::clock::unix(expires_at));
        let mut t = lock(&self.token);
        t.accessor = accessor.clone();
        t.expires_at = Some(expires_at);
    }

    // Through `events` only: the log line goes with it.
    fn reloaded(&self, ok: bool) {
        let label = metrics::ResultLabel { result: if ok { "success" } else { "rejected" }.to_string() };
        self.metrics.reloads.get_or_create(&label).inc();
    }

    /// Every secret ready, and the reasons of those that are not.
    pub fn readiness(&self) -> (bool, Vec<String>) {
        let now = crate::clock::now();
        let secrets = lock(&self.secrets);
        let reasons: Vec<String> = secrets
            .values()
            .filter_map(|s| match s.evaluate(now) {
                (true, _) => None,
                (false, why) => Some(format!("{}: {}", s.name, why.unwrap_or_default())),
            })
            .collect();
        (reasons.is_empty() && !secrets.is_empty(), reasons)
    }

    pub fn status_json(&self) -> Value {
        let now = crate::clock::now();
        let secrets: Vec<SecretStatus> = lock(&self.secrets)
            .values()
            .map(|s| {
                let (ready, reason) = s.evaluate(now);
                SecretStatus { ready, reason, ..s.clone() }
            })
            .collect();
        let token = lock(&self.token);
        json!({
            "ready": !secrets.is_empty() && secrets.iter().all(|s| s.ready),
            "version": env!("CARGO_PKG_VERSION"),
            "token": {
                "accessor": token.accessor.to_string(),
                "expires_at": token.expires_at.map(rfc3339),
            },
            "secrets": secrets,
        })
    }

    /// OpenMetrics text.
    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The counters of a secret's proxy (created on first use).
    pub fn proxy_stats(&self, name: &str) -> Arc<pgproxy::Stats> {
        lock(&self.proxies).entry(name.to_string()).or_default().clone()
    }
}

impl RequestObserver for Telemetry {
    fn observe(&self, op: &'static str, code: u16, elapsed: Duration) {
        // No answer, overloaded, sealed, standby: Vault is not serving. Any
        // other answer after such a failure means it is again.
        let failing = code == 0 || code >= 500 || code == 429 || code == 412;
        if failing {
            self.vault_failing.store(true, std::sync::atomic::Ordering::Relaxed);
        } else if self.vault_failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
            self.vault_back.notify_waiters();
        }
        let labels = metrics::OpCode { op: op.to_string(), code: code.to_string() };
        self.metrics.vault_requests.get_or_create(&labels).inc();
        self.metrics
            .vault_duration
            .get_or_create(&metrics::OpLabel { op: op.to_string() })
            .observe(elapsed.as_secs_f64());
    }
}

/// No core dumps (they would hold secrets), and panic messages that cannot
/// carry one: only literal messages and the location are printed.
pub fn harden() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("leasehold: cannot disable core dumps (prctl): {e}");
    }
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&'static str>()
            .copied()
            .unwrap_or("(message withheld: it may hold a secret)");
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("leasehold: internal error at {location}: {message}");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_families_are_registered_and_absent_without_a_proxy() {
        let t = Telemetry::new();
        assert!(!t.encode_metrics().contains("leasehold_proxy"), "no proxy, no proxy family");
        let stats = t.proxy_stats("db");
        stats.opened.fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        stats.bytes_up.fetch_add(10, std::sync::atomic::Ordering::Relaxed);
        let text = t.encode_metrics();
        for line in [
            "# TYPE leasehold_proxy_connections_opened counter",
            "leasehold_proxy_connections_opened_total{secret=\"db\"} 3",
            "leasehold_proxy_connections_open{secret=\"db\",generation=\"current\"} 0",
            "leasehold_proxy_connections_open{secret=\"db\",generation=\"replaced\"} 0",
            "leasehold_proxy_credential_generation{secret=\"db\"} 0",
            "leasehold_proxy_bytes_total{secret=\"db\",direction=\"up\"} 10",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn readiness_follows_render_and_expiry() {
        let t = Telemetry::new();
        t.declare("db", "database/creds/app", &[PathBuf::from("/x/db.json")]);
        let (ready, reasons) = t.readiness();
        assert!(!ready);
        assert_eq!(reasons, vec!["db: not rendered yet"]);
        let lease = LeaseId::new("database/creds/app/AbCdEfGhIjKlMnOpQrStUvWx".into());
        let past = crate::clock::now() - Duration::from_secs(120);
        t.issued("db", &lease, Duration::from_secs(60), true, past, Some(past + Duration::from_secs(60)));
        t.rendered("db", &[(PathBuf::from("/x/db.json"), true)], Some(Duration::from_secs(15)), past);
        let (ready, reasons) = t.readiness();
        assert!(!ready && reasons[0].starts_with("db: credentials expired at"), "{reasons:?}");
        t.renewed("db", Duration::from_secs(60), true, crate::clock::now());
        assert!(t.readiness().0);
        let status = t.status_json().to_string();
        assert!(status.contains("database/creds/app/AbCd…") && !status.contains("EfGh"));
        assert!(status.contains("\"rotation_window_secs\":15"), "{status}");
        let metrics = t.encode_metrics();
        assert!(metrics.contains("leasehold_lease_renewals_total{secret=\"db\",result=\"success\"} 1"), "{metrics}");
        assert!(metrics.contains("leasehold_secret_ready{secret=\"db\"} 1"));
    }
}
