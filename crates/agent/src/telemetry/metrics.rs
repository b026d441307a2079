//! Prometheus metrics (OpenMetrics text via prometheus-client). Names are
//! part of the contract (DESIGN.md, docs/observability.md).

use std::sync::atomic::AtomicU64;

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
    pub notifications: Family<HookLabels, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub build_info: Family<BuildLabels, Gauge>,
}

impl Metrics {
    pub fn register() -> (Metrics, Registry) {
        let mut r = Registry::with_prefix("leasehold");
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
            "Failed attempts to issue or renew since the last success",
            m.consecutive_failures.clone(),
        );
        r.register("notifications", "on_change hook runs by hook and result", m.notifications.clone());
        r.register("config_reloads", "Configuration reloads by result (success, rejected)", m.reloads.clone());
        r.register("build_info", "Build information; the value is always 1", m.build_info.clone());
        m.build_info.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").to_string() }).set(1);
        (m, r)
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
