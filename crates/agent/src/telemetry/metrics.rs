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
    pub logins: Family<ResultLabel, Counter>,
    pub token_renewals: Family<ResultLabel, Counter>,
    pub token_expiry: TimeGauge,
    pub vault_requests: Family<OpCode, Counter>,
    pub vault_duration: DurationFamily,
    pub notifications: Family<HookLabels, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub build_info: Family<BuildLabels, Gauge>,
}

impl Metrics {
    /// Every family: the secrets' (read from their status and `Counts` at
    /// each scrape) and the proxies' (from their `Stats`) among them.
    pub fn register(secrets: SecretCollector, proxies: Proxies) -> (Metrics, Registry) {
        let mut r = Registry::with_prefix("leasehold");
        r.register_collector(Box::new(secrets));
        r.register_collector(Box::new(ProxyCollector(proxies)));
        let m = Metrics {
            logins: Family::default(),
            token_renewals: Family::default(),
            token_expiry: TimeGauge::default(),
            vault_requests: Family::default(),
            vault_duration: DurationFamily::new_with_constructor(duration_histogram),
            notifications: Family::default(),
            reloads: Family::default(),
            build_info: Family::default(),
        };
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
        r.register("notifications", "on_change hook runs by hook and result", m.notifications.clone());
        r.register("config_reloads", "Configuration reloads by result (success, rejected)", m.reloads.clone());
        r.register("build_info", "Build information; the value is always 1", m.build_info.clone());
        m.build_info.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").to_string() }).set(1);
        (m, r)
    }
}

/// A secret's counters. Kept when the secret is removed (a counter does not
/// go back; its gauges go with its status).
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// By result: `[success, failure]`.
    pub issued: [u64; 2],
    pub renewals: [u64; 2],
    pub revocations: [u64; 2],
    pub expired: u64,
    pub render_failures: u64,
}

impl Counts {
    pub fn slot(ok: bool) -> usize {
        usize::from(!ok)
    }
}

/// The secrets' families, encoded at each scrape from what `Telemetry`
/// keeps anyway (each secret's status) and one `Counts` per secret: a
/// `Family` series per label set cost about 2 KiB a secret (1,000 secrets:
/// 2 MiB). Gauges are for declared secrets; `lease_expiry` only for a
/// secret with an end (a KV secret has none: a 0 would read as "expired in
/// 1970" to every alert on time left).
pub struct SecretCollector {
    pub status: Arc<Mutex<BTreeMap<String, super::SecretStatus>>>,
    pub counts: Arc<Mutex<BTreeMap<String, Counts>>>,
}

impl std::fmt::Debug for SecretCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretCollector")
    }
}

/// One declared secret's gauges at a scrape.
struct Gauges {
    labels: SecretLabel,
    expiry: Option<f64>,
    ready: i64,
    failures: i64,
}

impl Collector for SecretCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = crate::clock::now();
        // Copied out: no lock is held while encoding.
        let gauges: Vec<Gauges> = crate::telemetry::lock(&self.status)
            .values()
            .map(|s| Gauges {
                labels: SecretLabel { secret: s.name.clone() },
                expiry: s.expires.map(crate::clock::unix),
                ready: i64::from(s.evaluate(now).0),
                failures: i64::try_from(s.consecutive_failures).unwrap_or(i64::MAX),
            })
            .collect();
        let counts: Vec<(String, Counts)> =
            crate::telemetry::lock(&self.counts).iter().map(|(k, v)| (k.clone(), *v)).collect();
        {
            let mut family = encoder.encode_descriptor(
                "lease_expiry_timestamp_seconds",
                "Unix time at which the current lease of a secret expires",
                None,
                MetricType::Gauge,
            )?;
            for g in &gauges {
                if let Some(at) = g.expiry {
                    ConstGauge::new(at).encode(family.encode_family(&g.labels)?)?;
                }
            }
        }
        let by_result = |enc: &mut DescriptorEncoder, name: &str, help: &str, value: fn(&Counts) -> [u64; 2]| {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (secret, c) in &counts {
                for ok in [true, false] {
                    let labels = secret_result(secret, ok);
                    ConstCounter::new(value(c)[Counts::slot(ok)]).encode(family.encode_family(&labels)?)?;
                }
            }
            Ok::<(), std::fmt::Error>(())
        };
        by_result(&mut encoder, "lease_renewals", "Lease renewals by result (success, failure)", |c| c.renewals)?;
        by_result(&mut encoder, "credentials_issued", "Credentials obtained by result (success, failure)", |c| {
            c.issued
        })?;
        by_result(&mut encoder, "lease_revocations", "Lease revocations by result (success, failure)", |c| {
            c.revocations
        })?;
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, value: fn(&Gauges) -> i64| {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for g in &gauges {
                ConstGauge::new(value(g)).encode(family.encode_family(&g.labels)?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        gauge(&mut encoder, "secret_ready", "1 when the secret's files hold unexpired credentials, else 0", |g| {
            g.ready
        })?;
        gauge(
            &mut encoder,
            "secret_consecutive_failures",
            "Failed attempts to issue, renew or write since the last success",
            |g| g.failures,
        )?;
        let counter = |enc: &mut DescriptorEncoder, name: &str, help: &str, value: fn(&Counts) -> u64| {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (secret, c) in &counts {
                ConstCounter::new(value(c)).encode(family.encode_family(&SecretLabel { secret: secret.clone() })?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        counter(
            &mut encoder,
            "credentials_expired",
            "Times a secret's credentials reached their end with nothing to replace them",
            |c| c.expired,
        )?;
        counter(
            &mut encoder,
            "render_failures",
            "Times a secret's files could not be rendered or written (a template error, an unwritable directory)",
            |c| c.render_failures,
        )
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
