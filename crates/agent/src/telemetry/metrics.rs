//! Prometheus metrics (OpenMetrics text via prometheus-client). Names are
//! part of the contract (DESIGN.md, docs/observability.md).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabel {
    pub secret: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretResult {
    pub secret: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpCode {
    pub op: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub secret: String,
    pub hook: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

type TimeGauge = Gauge<f64, AtomicU64>;
type DurationFamily = Family<OpLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 5 ms … ~10 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

pub struct Metrics {
    pub lease_expiry: Family<SecretLabel, TimeGauge>,
    pub renewals: Family<SecretResult, Counter>,
    pub issued: Family<SecretResult, Counter>,
    pub revocations: Family<SecretResult, Counter>,
    pub logins: Family<ResultLabel, Counter>,
    pub token_renewals: Family<ResultLabel, Counter>,
    pub token_expiry: TimeGauge,
    pub vault_requests: Family<OpCode, Counter>,
    pub vault_duration: DurationFamily,
    pub ready: Family<SecretLabel, Gauge>,
    pub consecutive_failures: Family<SecretLabel, Gauge>,
    pub expired: Family<SecretLabel, Counter>,
    pub render_failures: Family<SecretLabel, Counter>,
    pub notifications: Family<HookLabels, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub build_info: Family<BuildLabels, Gauge>,
}

impl Metrics {
    /// Every family, the proxies' (read from their `Stats` at each scrape)
    /// among them.
    pub fn register(proxies: Proxies) -> (Metrics, Registry) {
        let mut r = Registry::with_prefix("leasehold");
        r.register_collector(Box::new(ProxyCollector(proxies)));
        let m = Metrics {
            lease_expiry: Family::default(),
            renewals: Family::default(),
            issued: Family::default(),
            revocations: Family::default(),
            logins: Family::default(),
            token_renewals: Family::default(),
            token_expiry: TimeGauge::default(),
            vault_requests: Family::default(),
            vault_duration: DurationFamily::new_with_constructor(duration_histogram),
            ready: Family::default(),
            consecutive_failures: Family::default(),
            expired: Family::default(),
            render_failures: Family::default(),
            notifications: Family::default(),
            reloads: Family::default(),
            build_info: Family::default(),
        };
        r.register(
            "lease_expiry_timestamp_seconds",
            "Unix time at which the current lease of a secret expires",
            m.lease_expiry.clone(),
        );
        r.register("lease_renewals", "Lease renewals by result (success, failure)", m.renewals.clone());
        r.register("credentials_issued", "Credentials obtained by result (success, failure)", m.issued.clone());
        r.register("lease_revocations", "Lease revocations by result (success, failure)", m.revocations.clone());
        r.register("auth_logins", "Vault logins by result (success, failure)", m.logins.clone());
        r.register(
            "auth_token_renewals",
            "Vault token renewals by result (success, failure)",
            m.token_renewals.clone(),
        );
        r.register(
            "auth_token_expiry_timestamp_seconds",
            "Unix time at which the current Vault token expires",
            m.token_expiry.clone(),
        );
        r.register(
            "vault_requests",
            "Requests to Vault by operation and HTTP status (0: no answer)",
            m.vault_requests.clone(),
        );
        r.register(
            "vault_request_duration_seconds",
            "Duration of requests to Vault by operation",
            m.vault_duration.clone(),
        );
        r.register("secret_ready", "1 when the secret's files hold unexpired credentials, else 0", m.ready.clone());
        r.register(
            "secret_consecutive_failures",
            "Failed attempts to issue, renew or write since the last success",
            m.consecutive_failures.clone(),
        );
        r.register(
            "credentials_expired",
            "Times a secret's credentials reached their end with nothing to replace them",
            m.expired.clone(),
        );
        r.register(
            "render_failures",
            "Times a secret's files could not be rendered or written (a template error, an unwritable directory)",
            m.render_failures.clone(),
        );
        r.register("notifications", "on_change hook runs by hook and result", m.notifications.clone());
        r.register("config_reloads", "Configuration reloads by result (success, rejected)", m.reloads.clone());
        r.register("build_info", "Build information; the value is always 1", m.build_info.clone());
        m.build_info.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").to_string() }).set(1);
        (m, r)
    }
}

/// The proxies' counters, by secret.
pub type Proxies = Arc<Mutex<BTreeMap<String, Arc<pgproxy::Stats>>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenerationLabels {
    secret: String,
    generation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    secret: String,
    direction: &'static str,
}

/// The `leasehold_proxy_*` families, registered like the others; none
/// while no secret has a proxy.
struct ProxyCollector(Proxies);

impl std::fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyCollector")
    }
}

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let proxies: Vec<(String, Arc<pgproxy::Stats>)> =
            crate::telemetry::lock(&self.0).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if proxies.is_empty() {
            return Ok(());
        }
        let counter = |v: u64| ConstCounter::new(v);
        let gauge = |v: u64| ConstGauge::new(v as i64);
        let each =
            |enc: &mut DescriptorEncoder, name: &str, help: &str, counts: bool, value: fn(&pgproxy::Stats) -> u64| {
                let kind = if counts { MetricType::Counter } else { MetricType::Gauge };
                let mut family = enc.encode_descriptor(name, help, None, kind)?;
                for (secret, stats) in &proxies {
                    let labels = SecretLabel { secret: secret.clone() };
                    let v = value(stats);
                    if counts {
                        counter(v).encode(family.encode_family(&labels)?)?;
                    } else {
                        gauge(v).encode(family.encode_family(&labels)?)?;
                    }
                }
                Ok::<(), std::fmt::Error>(())
            };
        each(&mut encoder, "proxy_connections_opened", "Client connections logged in upstream.", true, |s| {
            s.opened.load(Relaxed)
        })?;
        each(
            &mut encoder,
            "proxy_connections_failed",
            "Client connections that failed (bad client, upstream refused or unreachable).",
            true,
            |s| s.failed.load(Relaxed),
        )?;
        each(
            &mut encoder,
            "proxy_sessions_migrated",
            "Sessions moved to new credentials at an idle point, unseen by their client.",
            true,
            |s| s.migrated.load(Relaxed),
        )?;
        each(
            &mut encoder,
            "proxy_sessions_unmigratable",
            "Sessions found holding state that cannot move to new credentials (temporary tables, LISTEN, advisory locks, WITH HOLD cursors, SQL PREPARE).",
            true,
            |s| s.unmigratable.load(Relaxed),
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "proxy_connections_open",
                "Client connections open now, by credential generation: the current one, or replaced ones.",
                None,
                MetricType::Gauge,
            )?;
            for (secret, stats) in &proxies {
                let (current, replaced) = stats.open();
                for (generation, v) in [("current", current), ("replaced", replaced)] {
                    let labels = GenerationLabels { secret: secret.clone(), generation };
                    gauge(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        each(
            &mut encoder,
            "proxy_credential_generation",
            "How many credentials the proxy has logged in with (1 for the first), counting the current.",
            false,
            |s| s.generation.load(Relaxed),
        )?;
        let mut family = encoder.encode_descriptor("proxy_bytes", "Bytes relayed.", None, MetricType::Counter)?;
        for (secret, stats) in &proxies {
            for (direction, v) in [("up", stats.bytes_up.load(Relaxed)), ("down", stats.bytes_down.load(Relaxed))] {
                counter(v).encode(family.encode_family(&DirectionLabels { secret: secret.clone(), direction })?)?;
            }
        }
        Ok(())
    }
}

pub fn secret(name: &str) -> SecretLabel {
    SecretLabel { secret: name.to_string() }
}

pub fn secret_result(name: &str, ok: bool) -> SecretResult {
    SecretResult { secret: name.to_string(), result: outcome(ok).to_string() }
}

pub fn result(ok: bool) -> ResultLabel {
    ResultLabel { result: outcome(ok).to_string() }
}

fn outcome(ok: bool) -> &'static str {
    if ok { "success" } else { "failure" }
}
