//! Renewal timing that tokens and leases share: the policy, the renewal
//! point, how to tell a capped renewal and how long to wait before a
//! retry. Pure; `auth` and `lease::schedule` both build on it (so neither
//! imports the other for it).

use std::time::{Duration, SystemTime};

/// A secret's renewal policy (`renew_at`, `jitter` from the config).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Fraction of the TTL to let elapse before renewing (0.5).
    pub renew_at: f64,
    /// Renew up to this fraction of the TTL earlier, at random (0.05).
    pub jitter: f64,
    /// Failed renewals are retried until this fraction of the TTL (0.75):
    /// a renewal that succeeds after a short Vault gap keeps the same user.
    pub reissue_at: f64,
}

/// `fraction` of `d`, for `Duration`s of any length.
pub fn part(d: Duration, fraction: f64) -> Duration {
    Duration::from_secs_f64(d.as_secs_f64() * fraction.clamp(0.0, 1.0))
}

/// Vault capped the renewal: it granted less than asked, or said so.
pub fn renewal_capped(requested: Duration, granted: Duration, warnings: &[String]) -> bool {
    granted < requested || warnings.iter().any(|w| w.contains("exceeded the effective max_ttl"))
}

/// The point `renew_at` through a grant, moved earlier by up to `jitter` of
/// its TTL (`sample` in [0, 1) picks how much).
pub fn renew_point(granted_at: SystemTime, ttl: Duration, policy: &Policy, sample: f64) -> SystemTime {
    granted_at + part(ttl, policy.renew_at) - part(ttl, policy.jitter * sample)
}

/// How long to wait before retrying a failed renewal or issue, given the
/// backoff's draw and when the credentials in hand end (`None`: none in
/// hand yet, the first issue). A retry never waits more than a quarter of
/// what the credentials have left (as the token path does), so a short
/// Vault outage cannot outlast them by a backoff step; once they are dead,
/// retries come every 1–2 s (`sample` in [0, 1) spreads a fleet) until
/// Vault answers. A failed `database/creds` read creates nothing.
///
/// Never sooner than `MIN_RETRY`: the lease loop moves deadlines up to
/// `schedule::SLACK` earlier, and a quarter of a last few milliseconds
/// would become no wait at all (a storm of 43 issues in a lease's last
/// 100 ms). The token path uses the same rule.
pub fn retry_delay(backoff: Duration, now: SystemTime, creds_end: Option<SystemTime>, sample: f64) -> Duration {
    let delay = match creds_end.map(|end| end.duration_since(now).unwrap_or_default()) {
        None => backoff,
        Some(left) if left.is_zero() => DEAD_RETRY + DEAD_RETRY.mul_f64(sample.clamp(0.0, 1.0)),
        Some(left) => backoff.min(left / 4),
    };
    delay.max(MIN_RETRY)
}

/// The shortest wait before a retry: twice the lease loop's coalescing
/// slack (`schedule::SLACK`, asserted there), so a coalesced retry still
/// comes at least that long after the failure.
pub const MIN_RETRY: Duration = Duration::from_millis(256);

/// The retry period once credentials are dead (1–2 s with jitter).
pub const DEAD_RETRY: Duration = Duration::from_secs(1);

/// How far the backoff grows after a failure retrying cannot fix (a role
/// or a path Vault does not have): someone must change the configuration
/// first, and a fleet retrying every 30 s would only load Vault. It starts
/// as quickly as any backoff: right after a leader election a standby may
/// not know a role written a moment ago.
pub const PERMANENT_MAX: Duration = Duration::from_secs(300);
