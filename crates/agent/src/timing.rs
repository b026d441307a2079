//! Renewal timing that tokens and leases share: the policy, the renewal
//! point and how to tell a capped renewal. Pure; `auth` and
//! `lease::schedule` both build on it (so neither imports the other for it).

use std::time::{Duration, SystemTime};

/// A secret's renewal policy (`renew_at`, `jitter` from the config).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Fraction of the TTL to let elapse before renewing (0.5).
    pub renew_at: f64,
    /// Renew up to this fraction of the TTL earlier, at random (0.05).
    pub jitter: f64,
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
