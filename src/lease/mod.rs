//! The lease supervisor: one task per secret. It obtains the secret, renders
//! its files, renews the lease at `renew_at` of its TTL, re-issues before the
//! lease (or the token that created it) ends, and revokes a replaced lease
//! `revoke_replaced_after` later. Decisions come from `schedule`; this loop
//! sleeps until the instant it names and acts.

pub mod schedule;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::Method as HttpMethod;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthState, HeldToken};
use crate::backoff::Backoff;
use crate::config::{Method, SecretConfig};
use crate::render::{Context, Renderer, write_atomic};
use crate::secret::LeaseId;
use crate::vault::{Secret, VaultClient, VaultError, now};
use schedule::{Action, LeaseTimes, Policy};

/// A lease the agent is responsible for, as reported at shutdown.
#[derive(Debug, Clone)]
pub struct LiveLease {
    pub secret: String,
    pub lease_id: LeaseId,
    pub token_accessor: String,
}

/// Something the rest of the agent wants to know about.
#[derive(Debug, Clone)]
pub enum Event {
    /// Every file of the secret has been written with live credentials.
    Rendered { secret: String },
}

/// Credentials in hand.
struct Held {
    secret: Secret,
    times: LeaseTimes,
    token_accessor: String,
    issued_at: SystemTime,
    /// Where in the jitter window this grant's next action falls.
    sample: f64,
}

impl Held {
    fn has_lease(&self) -> bool {
        !self.secret.lease_id.is_empty() && !self.times.first_ttl.is_zero()
    }

    fn live(&self, name: &str) -> LiveLease {
        LiveLease {
            secret: name.to_string(),
            lease_id: self.secret.lease_id.clone(),
            token_accessor: self.token_accessor.clone(),
        }
    }
}

/// A replaced lease waiting for `revoke_replaced_after`.
struct Retired {
    lease: LiveLease,
    revoke_at: SystemTime,
    expires_at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Issue,
    Refresh,
    Renew,
    Reissue,
}

pub struct Supervisor {
    pub index: usize,
    pub cfg: SecretConfig,
    pub client: VaultClient,
    pub auth: watch::Receiver<AuthState>,
    pub relogin: Arc<Notify>,
    pub renderer: Arc<Renderer>,
    pub rerender: watch::Receiver<u64>,
    pub events: mpsc::UnboundedSender<Event>,
    pub cancel: CancellationToken,
}

/// Renewal answers meaning the lease cannot be renewed any more.
fn lease_gone(e: &VaultError) -> bool {
    [
        "lease not found",
        "lease expired",
        "lease is not renewable",
        "invalid lease",
        "past the max TTL",
    ]
    .iter()
    .any(|t| e.mentions(t))
}

impl Supervisor {
    fn policy(&self) -> Policy {
        Policy {
            renew_at: self.cfg.renew_at,
            jitter: self.cfg.jitter,
        }
    }

    /// Runs until cancelled; returns the leases still alive.
    pub async fn run(mut self) -> Vec<LiveLease> {
        let name = self.cfg.name.clone();
        let mut held: Option<Held> = None;
        let mut retired: Vec<Retired> = Vec::new();
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut retry_at: Option<SystemTime> = None;
        let mut auth_open = true;
        let mut rerender_open = true;
        loop {
            let (step, due) = self.next_step(held.as_ref(), retry_at);
            let revoke_due = retired.iter().map(|r| r.revoke_at).min();
            let wake = revoke_due.map_or(due, |r| r.min(due));
            let wait = wake.duration_since(now()).unwrap_or_default();
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                changed = self.auth.changed(), if auth_open => {
                    auth_open = changed.is_ok();
                    continue;
                }
                changed = self.rerender.changed(), if rerender_open => {
                    rerender_open = changed.is_ok();
                    if let Some(h) = &held
                        && let Err(e) = self.render(h)
                    {
                        tracing::error!(event = "render_failed", secret = %name, error = %e, "re-rendering failed; files left as they were");
                    }
                    continue;
                }
            }
            self.revoke_retired(&mut retired).await;
            if now() < due {
                continue;
            }
            let outcome = match step {
                Step::Issue | Step::Reissue => self.issue_and_render(&mut held, &mut retired).await,
                Step::Refresh => self.refresh(&mut held).await,
                Step::Renew => self.renew(&mut held).await,
            };
            match outcome {
                Ok(()) => {
                    backoff.reset();
                    retry_at = None;
                }
                Err(delay) => retry_at = Some(now() + delay.unwrap_or_else(|| backoff.next())),
            }
        }
        let mut live: Vec<LiveLease> = retired.into_iter().map(|r| r.lease).collect();
        if let Some(h) = held.filter(Held::has_lease) {
            live.push(h.live(&name));
        }
        live
    }

    fn next_step(&self, held: Option<&Held>, retry_at: Option<SystemTime>) -> (Step, SystemTime) {
        let later = |t: SystemTime| retry_at.map_or(t, |r| r.max(t));
        let Some(h) = held else {
            return (Step::Issue, retry_at.unwrap_or_else(now));
        };
        if !h.has_lease() {
            return (
                Step::Refresh,
                later(h.times.granted_at + self.cfg.refresh_interval),
            );
        }
        let token_end = self.auth.borrow().token_end(&h.token_accessor);
        let next = schedule::next(&h.times, token_end, &self.policy(), h.sample);
        let step = match next.action {
            Action::Renew => Step::Renew,
            Action::Reissue => Step::Reissue,
        };
        (step, later(next.at))
    }

    async fn current_token(&mut self) -> Option<Arc<HeldToken>> {
        let state = self.auth.wait_for(|s| s.current.is_some()).await.ok()?;
        state.current.clone()
    }

    async fn read(&mut self) -> Result<(Secret, String), VaultError> {
        let token = self.current_token().await.ok_or(VaultError::Setup {
            op: "read secret",
            reason: "no Vault token".into(),
        })?;
        let method = match self.cfg.method {
            Method::Get => HttpMethod::GET,
            Method::Post => HttpMethod::POST,
        };
        let result = self
            .client
            .read_secret(
                &token.token.secret,
                method,
                &self.cfg.path,
                self.cfg.body.as_ref(),
            )
            .await;
        if let Err(e) = &result
            && e.is_permission_denied()
        {
            self.relogin.notify_one();
        }
        result.map(|s| (s, token.token.accessor.clone()))
    }

    /// Obtains new credentials and renders them. A previous lease is retired
    /// (revoked later); if rendering fails the new lease is revoked instead
    /// and the old credentials stay in place.
    async fn issue_and_render(
        &mut self,
        held: &mut Option<Held>,
        retired: &mut Vec<Retired>,
    ) -> Result<(), Option<Duration>> {
        let name = self.cfg.name.clone();
        let (secret, accessor) = match self.read().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(event = "issue_failed", secret = %name, error = %e, "obtaining credentials failed");
                return Err(None);
            }
        };
        let at = now();
        let fresh = Held {
            times: LeaseTimes::issued(at, secret.lease_duration, secret.renewable),
            secret,
            token_accessor: accessor,
            issued_at: at,
            sample: rand::random(),
        };
        tracing::info!(
            event = "issued",
            secret = %name,
            lease = %fresh.secret.lease_id,
            username = fresh.secret.data.str("username").unwrap_or(""),
            ttl_secs = fresh.times.ttl.as_secs(),
            renewable = fresh.times.renewable,
            warnings = ?fresh.secret.warnings,
            "obtained credentials"
        );
        if let Err(e) = self.render(&fresh) {
            tracing::error!(event = "render_failed", secret = %name, error = %e, "writing files failed; revoking the new lease and keeping the old files");
            if fresh.has_lease() {
                self.revoke(&fresh.live(&name)).await;
            }
            return Err(None);
        }
        let _ = self.events.send(Event::Rendered {
            secret: name.clone(),
        });
        if let Some(old) = held.take().filter(Held::has_lease) {
            let revoke_at = at + self.cfg.revoke_replaced_after;
            tracing::info!(event = "replaced", secret = %name, old_lease = %old.secret.lease_id, revoke_in_secs = self.cfg.revoke_replaced_after.as_secs(), "credentials replaced; old lease revoked later");
            retired.push(Retired {
                lease: old.live(&name),
                revoke_at,
                expires_at: old.times.expires_at(),
            });
        }
        *held = Some(fresh);
        Ok(())
    }

    /// Secrets without a lease (KV): re-read and re-render when changed.
    async fn refresh(&mut self, held: &mut Option<Held>) -> Result<(), Option<Duration>> {
        let (secret, accessor) = match self.read().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(event = "refresh_failed", secret = %self.cfg.name, error = %e, "re-reading the secret failed");
                return Err(None);
            }
        };
        let at = now();
        let fresh = Held {
            times: LeaseTimes::issued(at, secret.lease_duration, secret.renewable),
            secret,
            token_accessor: accessor,
            issued_at: at,
            sample: rand::random(),
        };
        if let Err(e) = self.render(&fresh) {
            tracing::error!(event = "render_failed", secret = %self.cfg.name, error = %e, "writing files failed; files left as they were");
            return Err(None);
        }
        *held = Some(fresh);
        Ok(())
    }

    async fn renew(&mut self, held: &mut Option<Held>) -> Result<(), Option<Duration>> {
        let name = self.cfg.name.clone();
        let Some(h) = held.as_mut() else {
            return Ok(());
        };
        let Some(token) = self.current_token().await else {
            return Err(None);
        };
        match self
            .client
            .renew_lease(&token.token.secret, &h.secret.lease_id, h.times.first_ttl)
            .await
        {
            Ok(r) => {
                h.times = h
                    .times
                    .renewed(now(), r.lease_duration, r.renewable, &r.warnings);
                h.sample = rand::random();
                tracing::info!(event = "renewed", secret = %name, lease = %h.secret.lease_id, ttl_secs = r.lease_duration.as_secs(), capped = h.times.capped, "renewed lease");
                if h.times.capped {
                    tracing::info!(event = "capped", secret = %name, lease = %h.secret.lease_id, "lease reached its max TTL; new credentials will be issued before it ends");
                }
                Ok(())
            }
            Err(e) if lease_gone(&e) => {
                tracing::warn!(event = "lease_gone", secret = %name, lease = %h.secret.lease_id, error = %e, "lease can no longer be renewed; issuing new credentials");
                // The old lease is dead: nothing to retire or revoke.
                h.times.renewable = false;
                h.times.ttl = Duration::ZERO;
                h.times.capped = true;
                Ok(())
            }
            Err(e) => {
                if e.is_permission_denied() {
                    self.relogin.notify_one();
                }
                tracing::warn!(event = "renew_failed", secret = %name, lease = %h.secret.lease_id, error = %e, "renewing the lease failed; will retry");
                let left = h
                    .times
                    .expires_at()
                    .duration_since(now())
                    .unwrap_or_default();
                Err(Some(
                    (left / 4).clamp(Duration::from_millis(200), Duration::from_secs(30)),
                ))
            }
        }
    }

    async fn revoke_retired(&mut self, retired: &mut Vec<Retired>) {
        let at = now();
        let mut keep = Vec::new();
        for r in std::mem::take(retired) {
            if r.revoke_at > at {
                keep.push(r);
            } else if r.expires_at <= at {
                // Vault already revoked it at expiry.
            } else if !self.revoke(&r.lease).await {
                keep.push(Retired {
                    revoke_at: at + Duration::from_secs(30),
                    ..r
                });
            }
        }
        *retired = keep;
    }

    async fn revoke(&mut self, lease: &LiveLease) -> bool {
        let Some(token) = self.current_token().await else {
            return false;
        };
        match self
            .client
            .revoke_lease(&token.token.secret, &lease.lease_id)
            .await
        {
            Ok(()) => {
                tracing::info!(event = "revoked", secret = %lease.secret, lease = %lease.lease_id, "revoked lease");
                true
            }
            Err(e) => {
                tracing::warn!(event = "revoke_failed", secret = %lease.secret, lease = %lease.lease_id, error = %e, "revoking a replaced lease failed");
                false
            }
        }
    }

    fn render(&self, h: &Held) -> Result<bool, crate::render::RenderError> {
        let ctx = Context {
            name: &self.cfg.name,
            data: &h.secret.data,
            lease_id: &h.secret.lease_id,
            lease_duration: h.times.ttl,
            issued_at: h.issued_at,
            expires_at: h.has_lease().then(|| h.times.expires_at()),
        };
        // Everything is rendered in memory first: a failing template writes nothing.
        let files = self.renderer.render(self.index, &ctx)?;
        let mut changed = 0;
        for (plan, text) in &files {
            if write_atomic(plan, text.as_bytes())? {
                changed += 1;
            }
        }
        tracing::info!(event = "rendered", secret = %self.cfg.name, files = files.len(), changed, "files written");
        Ok(changed > 0)
    }
}
