//! One struct per thing that happens to a secret's lease: `emit` writes its
//! log line and moves its metrics and status together (vector's
//! `internal_events` pattern), so the two can never disagree and a new call
//! site cannot do one without the other. Lease ids print shortened
//! (`LeaseId`'s `Display`); error texts arrive already redacted.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use vault::secret::{Accessor, LeaseId};

use super::Telemetry;

/// Something the agent did or saw, logged and counted at once.
pub trait Event {
    fn emit(self, telemetry: &Telemetry);
}

/// A lease was revoked.
pub struct Revoked<'a> {
    pub secret: &'a str,
    pub lease: &'a LeaseId,
}

impl Event for Revoked<'_> {
    fn emit(self, t: &Telemetry) {
        t.revoked(self.secret, true);
        tracing::info!(event = "revoked", secret = %self.secret, lease = %self.lease, "revoked lease");
    }
}

/// Revoking a lease failed; `replaced` when it was a replaced lease (the
/// supervisor's own), not one revoked at shutdown or by a reload.
pub struct RevokeFailed<'a> {
    pub secret: &'a str,
    pub lease: &'a LeaseId,
    pub error: &'a str,
    pub replaced: bool,
}

impl Event for RevokeFailed<'_> {
    fn emit(self, t: &Telemetry) {
        t.revoked(self.secret, false);
        tracing::warn!(event = "revoke_failed", secret = %self.secret, lease = %self.lease, replaced = self.replaced, error = %self.error, "revoking lease failed");
    }
}

/// A lease was renewed.
pub struct Renewed<'a> {
    pub secret: &'a str,
    pub lease: &'a LeaseId,
    pub ttl: Duration,
    pub renewable: bool,
    /// Vault capped the renewal at the max TTL.
    pub capped: bool,
    pub at: SystemTime,
}

impl Event for Renewed<'_> {
    fn emit(self, t: &Telemetry) {
        t.renewed(self.secret, self.ttl, self.renewable, self.at);
        tracing::info!(event = "renewed", secret = %self.secret, lease = %self.lease, ttl_secs = self.ttl.as_secs(), capped = self.capped, "renewed lease");
        if self.capped {
            tracing::info!(event = "capped", secret = %self.secret, lease = %self.lease, "lease reached its max TTL; new credentials will be issued before it ends");
        }
    }
}

/// A renewal failed in a way that may pass (retried with backoff, or the
/// credentials are replaced in time).
pub struct RenewFailed<'a> {
    pub secret: &'a str,
    pub lease: &'a LeaseId,
    pub error: &'a str,
}

impl Event for RenewFailed<'_> {
    fn emit(self, t: &Telemetry) {
        t.failed(self.secret, "renew", self.error);
        tracing::warn!(event = "renew_failed", secret = %self.secret, lease = %self.lease, error = %self.error, "renewing the lease failed; retrying with backoff, or issuing new credentials in time");
    }
}

/// Vault says the lease is gone: it ends now.
pub struct LeaseGone<'a> {
    pub secret: &'a str,
    pub lease: &'a LeaseId,
    pub error: &'a str,
    pub at: SystemTime,
}

impl Event for LeaseGone<'_> {
    fn emit(self, t: &Telemetry) {
        t.lease_ended(self.secret, self.at, self.error);
        tracing::warn!(event = "lease_gone", secret = %self.secret, lease = %self.lease, error = %self.error, "lease can no longer be renewed; issuing new credentials");
    }
}

/// Reading the secret (a first issue or a re-issue) failed.
pub struct IssueFailed<'a> {
    pub secret: &'a str,
    /// `issue_failed`, or `reissue_failed` when credentials are in hand.
    pub event: &'static str,
    pub error: &'a str,
    /// A mistake retrying cannot fix (`VaultError::permanent`).
    pub permanent: Option<&'static str>,
}

impl Event for IssueFailed<'_> {
    fn emit(self, t: &Telemetry) {
        match self.permanent {
            Some(reason) => {
                t.failed(self.secret, "issue", &format!("{} (permanent: {reason})", self.error));
                tracing::error!(event = self.event, secret = %self.secret, reason, permanent = true, error = %self.error, "reading the secret from Vault failed, and retrying will not help until the configuration is fixed");
            }
            None => {
                t.failed(self.secret, "issue", self.error);
                tracing::warn!(event = self.event, secret = %self.secret, reason = "transient", permanent = false, error = %self.error, "reading the secret from Vault failed");
            }
        }
    }
}

/// Every file of a secret was written (or already held this content).
pub struct Rendered<'a> {
    pub secret: &'a str,
    pub written: &'a [(PathBuf, bool)],
    pub expires_at: Option<SystemTime>,
    /// `schedule::rotation_window` of the credentials written.
    pub rotation_window: Option<std::time::Duration>,
    pub at: SystemTime,
}

impl Event for Rendered<'_> {
    fn emit(self, t: &Telemetry) {
        t.rendered(self.secret, self.written, self.rotation_window, self.at);
        let changed = self.written.iter().filter(|(_, c)| *c).count();
        tracing::info!(event = "rendered", secret = %self.secret, files = self.written.len(), changed, expires_at = %self.expires_at.map(crate::clock::rfc3339).unwrap_or_default(), "files written");
    }
}

/// A secret's files could not all be rendered or written; `partial` when
/// some were already replaced.
pub struct RenderFailed<'a> {
    pub secret: &'a str,
    pub error: &'a str,
    pub partial: bool,
}

impl Event for RenderFailed<'_> {
    fn emit(self, t: &Telemetry) {
        t.render_failed(self.secret, self.error);
        if self.partial {
            tracing::error!(event = "render_failed", secret = %self.secret, error = %self.error, "writing files failed after some were replaced");
        } else {
            tracing::error!(event = "render_failed", secret = %self.secret, error = %self.error, "writing files failed; files left as they were");
        }
    }
}

/// Logged in to Vault.
pub struct LoggedIn<'a> {
    pub accessor: &'a Accessor,
    pub ttl: Duration,
    pub renewable: bool,
    pub expires_at: SystemTime,
}

impl Event for LoggedIn<'_> {
    fn emit(self, t: &Telemetry) {
        t.login(true);
        t.token(self.accessor, self.expires_at);
        tracing::info!(event = "login", accessor = %self.accessor, ttl_secs = self.ttl.as_secs(), renewable = self.renewable, "logged in to Vault");
    }
}

/// A login failed (retried with backoff; slowly when `permanent` names a
/// mistake that retrying cannot fix).
pub struct LoginFailed<'a> {
    pub error: &'a str,
    pub permanent: Option<&'static str>,
}

impl Event for LoginFailed<'_> {
    fn emit(self, t: &Telemetry) {
        t.login(false);
        match self.permanent {
            Some(reason) => {
                tracing::error!(event = "login_failed", reason, permanent = true, error = %self.error, "login to Vault failed, and retrying will not help until the configuration is fixed")
            }
            None => {
                tracing::warn!(event = "login_failed", reason = "transient", permanent = false, error = %self.error, "login to Vault failed")
            }
        }
    }
}

/// The Vault token was renewed.
pub struct TokenRenewed<'a> {
    pub accessor: &'a Accessor,
    pub ttl: Duration,
    pub capped: bool,
    pub expires_at: SystemTime,
}

impl Event for TokenRenewed<'_> {
    fn emit(self, t: &Telemetry) {
        t.token_renewed(true);
        t.token(self.accessor, self.expires_at);
        tracing::info!(event = "token_renewed", accessor = %self.accessor, ttl_secs = self.ttl.as_secs(), capped = self.capped, "renewed Vault token");
    }
}

/// Renewing the token failed: `refused` when Vault refused the token
/// itself (a new login follows), else retried with backoff.
pub struct TokenRenewFailed<'a> {
    pub accessor: &'a Accessor,
    pub error: &'a str,
    pub refused: bool,
}

impl Event for TokenRenewFailed<'_> {
    fn emit(self, t: &Telemetry) {
        t.token_renewed(false);
        if self.refused {
            tracing::warn!(event = "token_refused", accessor = %self.accessor, error = %self.error, "Vault refused the token; logging in again");
        } else {
            tracing::warn!(event = "token_renew_failed", error = %self.error, "renewing the Vault token failed");
        }
    }
}

/// A reloaded configuration was applied.
pub struct ConfigReloaded {
    pub secrets: usize,
    pub added: usize,
}

impl Event for ConfigReloaded {
    fn emit(self, t: &Telemetry) {
        t.reloaded(true);
        tracing::info!(event = "config_reloaded", secrets = self.secrets, added = self.added, "configuration reloaded");
    }
}

/// A new configuration was invalid; the running one is kept.
pub struct ConfigRejected<'a> {
    pub error: &'a str,
}

impl Event for ConfigRejected<'_> {
    fn emit(self, t: &Telemetry) {
        t.reloaded(false);
        tracing::error!(event = "config_rejected", error = %self.error, "the new config is invalid; keeping the running one");
    }
}

/// An `on_change` hook ran.
pub struct HookRan<'a> {
    pub secret: &'a str,
    pub hook: &'static str,
    /// The failure, if it failed.
    pub error: Option<&'a str>,
}

impl Event for HookRan<'_> {
    fn emit(self, t: &Telemetry) {
        t.notified(self.secret, self.hook, self.error.is_none());
        match self.error {
            None => tracing::info!(event = "notified", secret = %self.secret, hook = self.hook, "application notified"),
            Some(e) => {
                tracing::warn!(event = "notify_failed", secret = %self.secret, hook = self.hook, error = %e, "notifying the application failed")
            }
        }
    }
}

/// The credentials in hand passed their end with nothing to replace them:
/// the app's logins fail from now on. Once per set of credentials.
pub struct LeaseExpired<'a> {
    pub secret: &'a str,
    pub lease: &'a LeaseId,
    /// How long ago the end passed (the supervisor wakes at it; more when it
    /// was busy in a Vault call then).
    pub dead_for: Duration,
    /// Since the last successful grant (issue or renewal).
    pub since_grant: Duration,
}

impl Event for LeaseExpired<'_> {
    fn emit(self, t: &Telemetry) {
        t.expired(self.secret);
        tracing::error!(event = "lease_expired", secret = %self.secret, lease = %self.lease, dead_for_ms = self.dead_for.as_millis() as u64, since_grant_secs = self.since_grant.as_secs(), "the credentials expired with nothing to replace them: the application's logins fail until Vault answers");
    }
}
