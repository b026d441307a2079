//! The lease supervisor: one task per secret. It obtains the secret (or
//! adopts the lease recorded in the state file), renders its files, renews
//! the lease at `renew_at` of its TTL, re-issues before the lease (or the
//! token that created it) ends, and revokes a replaced lease
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
use crate::clock::now;
use crate::files::write_all;
use crate::render::{Context, Templates};
use crate::state::{LeaseRecord, SecretRecord, StateStore, secs, time, unix};
use crate::telemetry::Telemetry;
use crate::telemetry::events::{
    Event as _, HookRan, IssueFailed, LeaseExpired, LeaseGone, RenderFailed, Rendered as RenderedEvent, RenewFailed,
    Renewed, RevokeFailed, Revoked,
};
use crate::timing::PERMANENT_MAX;
use config::{Method, ReplacedConnections, SecretConfig};
use schedule::{Action, Bound, LeaseTimes, Policy, RetiredAction, RetiredLease};
use vault::secret::{Accessor, LeaseId, SecretData};
use vault::{Secret, Vault, VaultClient, VaultError};

/// A lease the agent is responsible for, as reported when a supervisor stops.
#[derive(Debug, Clone)]
pub struct LiveLease {
    pub secret: String,
    pub lease_id: LeaseId,
    pub token_accessor: Accessor,
}

/// Something the rest of the agent wants to know about.
#[derive(Debug, Clone)]
pub enum Event {
    /// Every file of the secret has been written with live credentials.
    Rendered { secret: String },
}

/// A secret's configuration and the templates compiled for it; replaced
/// on reload.
pub struct SecretSpec {
    pub cfg: SecretConfig,
    pub templates: Arc<Templates>,
    /// The secret's proxy, told of new and revoked credentials.
    pub proxy: Option<Arc<pgproxy::Feed>>,
}

/// Credentials in hand.
#[derive(Clone)]
pub struct Held {
    pub secret: Secret,
    pub times: LeaseTimes,
    pub token_accessor: Accessor,
    pub issued_at: SystemTime,
    /// Where in the jitter window this grant's next action falls.
    pub sample: f64,
    /// Granted after failures (an outage): the next renewal is drawn over
    /// the whole window before `renew_at` (`schedule::spread_renewal`).
    pub spread: bool,
}

impl Held {
    fn has_lease(&self) -> bool {
        !self.secret.lease_id.is_empty() && !self.times.first_ttl.is_zero()
    }

    /// The lease's end, or for a secret without one the `expiration` its
    /// data may carry (PKI certificates).
    fn expires_at(&self) -> Option<SystemTime> {
        if self.has_lease() { Some(self.times.expires_at()) } else { self.secret.data.expiration() }
    }

    /// Until when these credentials can be counted on: a lease's safe end
    /// (a second before the end Vault reported), else `expires_at`.
    fn usable_until(&self) -> Option<SystemTime> {
        if self.has_lease() { Some(self.times.safe_end()) } else { self.secret.data.expiration() }
    }

    fn live(&self, name: &str) -> LiveLease {
        LiveLease {
            secret: name.to_string(),
            lease_id: self.secret.lease_id.clone(),
            token_accessor: self.token_accessor.clone(),
        }
    }

    pub fn record(&self, path: &str) -> LeaseRecord {
        LeaseRecord {
            path: path.to_string(),
            lease_id: self.secret.lease_id.clone(),
            token_accessor: self.token_accessor.clone(),
            issued_at: unix(self.issued_at),
            first_ttl: self.times.first_ttl.as_secs_f64(),
            granted_at: unix(self.times.granted_at),
            ttl: self.times.ttl.as_secs_f64(),
            renewable: self.times.renewable,
            capped: self.times.capped,
            data: self.secret.data.clone(),
        }
    }

    /// A recorded lease that Vault confirmed alive with `ttl` left.
    pub fn adopted(r: &LeaseRecord, ttl: Duration, renewable: bool) -> Held {
        Held {
            secret: Secret {
                lease_id: r.lease_id.clone(),
                lease_duration: ttl,
                renewable,
                data: r.data.clone(),
                warnings: vec![],
            },
            times: LeaseTimes { first_ttl: secs(r.first_ttl), granted_at: now(), ttl, renewable, capped: r.capped },
            token_accessor: r.token_accessor.clone(),
            issued_at: time(r.issued_at),
            sample: rand::random(),
            spread: false,
        }
    }
}

/// A replaced lease waiting for `revoke_replaced_after` (and, with a proxy,
/// for its connections).
#[derive(Clone)]
pub struct Retired {
    pub held: Held,
    pub revoke_at: SystemTime,
    /// When its proxied connections were asked to close.
    pub draining_since: Option<SystemTime>,
}

/// How far a render got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rendered {
    All,
    /// Nothing was replaced.
    Nothing,
    /// Some files were replaced before one failed.
    Partly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Issue,
    Refresh,
    Renew,
    Reissue(Bound),
    /// Write the files of credentials in hand that were never written.
    Render,
}

pub struct Supervisor<V = VaultClient> {
    pub spec: watch::Receiver<Arc<SecretSpec>>,
    pub client: V,
    pub auth: watch::Receiver<AuthState>,
    pub relogin: Arc<Notify>,
    pub events: mpsc::UnboundedSender<Event>,
    pub store: Option<Arc<StateStore>>,
    /// A lease adopted from the state file.
    pub adopted: Option<Held>,
    pub telemetry: Arc<Telemetry>,
    pub cancel: CancellationToken,
    /// `vault.request_timeout`: the longest a renewal or an issue may take
    /// (`schedule::call_deadline` shortens it as the lease runs out).
    pub request_timeout: Duration,
    /// The last failure was a mistake retrying cannot fix: the backoff
    /// grows to `timing::PERMANENT_MAX` instead of 30 s. Starts false.
    pub slow_retry: bool,
}

/// The secret's renewal timing, as the schedule takes it.
fn policy(cfg: &SecretConfig) -> Policy {
    Policy { renew_at: cfg.renew_at, jitter: cfg.jitter, reissue_at: cfg.reissue_at() }
}

/// This process's offset on the `schedule::coalesce` grid: its lines are
/// whole cells after the clock's anchor, on slot boundaries of tokio's
/// timer wheel (`clock::start`).
fn phase() -> Duration {
    crate::clock::grid_phase(schedule::SLACK)
}

/// Renewal answers meaning the lease cannot be renewed any more.
fn lease_gone(e: &VaultError) -> bool {
    ["lease not found", "lease expired", "lease is not renewable", "invalid lease", "past the max TTL"]
        .iter()
        .any(|t| e.mentions(t))
}

impl<V: Vault> Supervisor<V> {
    fn cfg(&self) -> SecretConfig {
        self.spec.borrow().cfg.clone()
    }

    fn name(&self) -> String {
        self.spec.borrow().cfg.name.clone()
    }

    /// Runs until cancelled; returns the leases still alive.
    pub async fn run(mut self) -> Vec<LiveLease> {
        let name = self.name();
        let mut held: Option<Held> = self.adopted.take();
        let mut retired: Vec<Retired> = Vec::new();
        // The steps' futures are boxed where they are awaited: the task
        // (one per secret, alive for the pod's life) then holds only this
        // loop's state, not the largest step's (1,000 secrets: 4 MiB).
        Box::pin(self.resume(&name, &held)).await;
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut retry_at: Option<SystemTime> = None;
        // Set while renewals of the current lease fail: when to try again.
        let mut renew_retry: Option<SystemTime> = None;
        let mut auth_open = true;
        let mut spec_open = true;
        let mut warned_token_bound = false;
        // The end of the credentials in hand, until it has been reported
        // passed (`LeaseExpired`, once per set of credentials).
        let mut watched_end: Option<SystemTime> = None;
        // The credentials in hand have never been written (`render_pending`).
        let mut unrendered = false;
        loop {
            let end = self.watch_end(&name, held.as_ref(), &mut watched_end);
            let (step, due) = self.next_step(held.as_ref(), retry_at, renew_retry, unrendered);
            let due = schedule::coalesce(due, phase());
            let retired_due = retired.iter().map(|r| self.retired_step(r, now()).1).min();
            // Also at the credentials' end, to say they died then.
            let wake = [Some(due), retired_due, end].into_iter().flatten().min().unwrap_or(due);
            let feed = self.spec.borrow().proxy.clone();
            let replaced_closed = async {
                match &feed {
                    Some(f) => f.replaced_closed().notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = crate::clock::sleep_until(wake) => {}
                // The last connection of a replaced lease may have ended.
                _ = replaced_closed, if !retired.is_empty() => {}
                // Vault answers again: a retry waiting out its backoff goes now.
                _ = self.telemetry.vault_back(), if retry_at.is_some() || renew_retry.is_some() => {
                    retry_at = retry_at.map(|_| now());
                    renew_retry = renew_retry.map(|_| now());
                    continue;
                }
                changed = self.auth.changed(), if auth_open => {
                    auth_open = changed.is_ok();
                    continue;
                }
                changed = self.spec.changed(), if spec_open => {
                    spec_open = changed.is_ok();
                    if let Some(h) = &held {
                        let _ = Box::pin(self.render(h, retired.last().map(|r| &r.held.secret.data))).await;
                    }
                    continue;
                }
            }
            if !retired.is_empty() && Box::pin(self.tend_retired(&mut retired, unrendered)).await {
                self.persist(&held, &retired);
                // `previous` is gone from templates once its lease is.
                if let Some(h) = &held {
                    let _ = Box::pin(self.render(h, retired.last().map(|r| &r.held.secret.data))).await;
                }
            }
            if now() < due {
                continue;
            }
            if step == Step::Reissue(Bound::Refused) {
                tracing::warn!(event = "renewals_failing", secret = %name, "renewals keep failing; issuing new credentials before the lease ends");
            }
            if step == Step::Reissue(Bound::Token) && !warned_token_bound {
                warned_token_bound = true;
                self.warn_token_bound(held.as_ref());
            }
            let outcome = match step {
                // An issue in flight is let finish (the teardown bounds it):
                // dropped, it could leave a lease nothing records.
                Step::Issue | Step::Reissue(_) => {
                    let before = held.as_ref().map(|h| h.issued_at);
                    let r = Box::pin(self.issue_and_render(&mut held, &mut retired)).await;
                    // Failed, yet credentials changed hands: kept unwritten.
                    unrendered = r.is_err() && held.as_ref().map(|h| h.issued_at) != before;
                    r
                }
                Step::Render => match held.as_ref() {
                    Some(h)
                        if Box::pin(self.render(h, retired.last().map(|r| &r.held.secret.data))).await
                            == Rendered::All =>
                    {
                        unrendered = false;
                        let _ = self.events.send(Event::Rendered { secret: name.clone() });
                        Ok(())
                    }
                    _ => Err(None),
                },
                Step::Refresh => Box::pin(self.refresh(&mut held)).await,
                // A renewal is dropped at shutdown: the lease gets revoked.
                Step::Renew => {
                    let cancel = self.cancel.clone();
                    tokio::select! {
                        r = Box::pin(self.renew(&mut held)) => r,
                        _ = cancel.cancelled() => break,
                    }
                }
            };
            self.persist(&held, &retired);
            match (outcome, step) {
                (Ok(()), step) => {
                    // A step that succeeded only on a retry (Vault failing
                    // meanwhile): an outage may have synchronised a fleet,
                    // and this grant's renewal spreads it. A re-issue after
                    // refused renewals succeeded at once: no outage.
                    let retried = match step {
                        Step::Renew => renew_retry.is_some(),
                        Step::Render => false,
                        _ => retry_at.is_some(),
                    };
                    if let Some(h) = held.as_mut().filter(|_| retried) {
                        h.spread = true;
                    }
                    backoff.reset();
                    self.slow_retry = false;
                    retry_at = None;
                    renew_retry = None;
                }
                // The schedule weighs a renewal retry against replacing the
                // lease; every retry is bounded by the life left in hand.
                (Err(after), Step::Renew) => {
                    renew_retry = Some(now() + self.retry_delay(&mut backoff, held.as_ref(), after));
                }
                (Err(after), _) => retry_at = Some(now() + self.retry_delay(&mut backoff, held.as_ref(), after)),
            }
        }
        // A lease past its end is gone with it (Vault revokes at expiry; a
        // revoke of it answers 204): not one to revoke, nor to report alive
        // when Vault is out of reach at the shutdown.
        let at = now();
        let alive = |h: &Held| h.has_lease() && h.times.expires_at() > at;
        let mut live: Vec<LiveLease> =
            retired.into_iter().filter(|r| alive(&r.held)).map(|r| r.held.live(&name)).collect();
        live.extend(held.filter(alive).map(|h| h.live(&name)));
        live
    }

    /// Adopted credentials: counted, their files written again (they may be
    /// missing or stale after a restart), recorded.
    async fn resume(&mut self, name: &str, held: &Option<Held>) {
        let Some(h) = held else { return };
        self.telemetry.adopted(name, &h.secret.lease_id, h.times.ttl, h.times.renewable, h.times.granted_at);
        let _ = self.render(h, None).await;
        let _ = self.events.send(Event::Rendered { secret: name.to_string() });
        self.persist(held, &[]);
    }

    /// Says the credentials in hand died (`LeaseExpired`) once their end has
    /// passed, once per set; returns their end while it is still to come,
    /// for the loop to wake at.
    fn watch_end(&self, name: &str, held: Option<&Held>, watched: &mut Option<SystemTime>) -> Option<SystemTime> {
        let h = held?;
        let end = h.expires_at()?;
        if *watched == Some(end) {
            return None;
        }
        if now() < end {
            return Some(end);
        }
        *watched = Some(end);
        let dead_for = now().duration_since(end).unwrap_or_default();
        let since_grant = now().duration_since(h.times.granted_at).unwrap_or_default();
        LeaseExpired { secret: name, lease: &h.secret.lease_id, dead_for, since_grant }.emit(&self.telemetry);
        None
    }

    /// The backoff's next delay, or Vault's `Retry-After` when longer,
    /// bounded by what the credentials in hand have left
    /// (`schedule::retry_delay`).
    fn retry_delay(&self, backoff: &mut Backoff, held: Option<&Held>, retry_after: Option<Duration>) -> Duration {
        let next = if self.slow_retry { backoff.next_delay_up_to(PERMANENT_MAX) } else { backoff.next_delay() };
        let step = next.max(retry_after.unwrap_or_default());
        schedule::retry_delay(step, now(), held.and_then(Held::usable_until), rand::random())
    }

    /// Bounds a call to Vault by `schedule::call_deadline`: a request that
    /// hangs on a dead link gives up when something else must be tried.
    ///
    /// The call comes boxed: every supervisor's task is as large as its
    /// largest state, and an HTTP request's future held inline (twice, with
    /// the timeout around it) cost 2.3 KiB per secret while idle (1,000
    /// secrets: 15.1 -> 17.4 MiB). Boxed, it is on the heap only while in
    /// flight.
    fn within<'a, T: 'a>(
        &'a self,
        op: &'static str,
        until: Option<SystemTime>,
        call: std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, VaultError>> + Send + 'a>>,
    ) -> impl std::future::Future<Output = Result<T, VaultError>> + 'a {
        let limit = schedule::call_deadline(now(), until, self.request_timeout);
        async move {
            tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
                Err(VaultError::Transport {
                    op,
                    reason: format!("no answer within {:.1} s, all the lease allowed", limit.as_secs_f64()),
                    unsent: false,
                })
            })
        }
    }

    fn persist(&self, held: &Option<Held>, retired: &[Retired]) {
        self.persist_leases(held.as_ref(), retired.iter().map(|r| &r.held));
    }

    fn persist_leases<'a>(&self, current: Option<&Held>, retired: impl Iterator<Item = &'a Held>) {
        let Some(store) = &self.store else { return };
        let cfg = self.cfg();
        let record = SecretRecord {
            current: current.filter(|h| h.has_lease()).map(|h| h.record(&cfg.path)),
            retired: retired.filter(|h| h.has_lease()).map(|h| h.record(&cfg.path)).collect(),
        };
        if let Err(e) = store.set_secret(&cfg.name, record) {
            tracing::error!(event = "state_write_failed", secret = %cfg.name, error = %e, "recording state failed");
        }
    }

    /// Once per run: credentials replaced early because their token ends
    /// first is a Vault setup problem (the complaint about Vault Agent
    /// re-issuing on every re-login), so say how to fix it.
    fn warn_token_bound(&self, held: Option<&Held>) {
        let Some(h) = held else { return };
        let token_end = self.auth.borrow().token_end(&h.token_accessor);
        tracing::warn!(
            event = "token_bounds_lease",
            secret = %self.name(),
            lease = %h.secret.lease_id,
            token_expires_at = %token_end.map(crate::clock::rfc3339).unwrap_or_default(),
            lease_expires_at = %crate::clock::rfc3339(h.times.expires_at()),
            "the Vault token that created these credentials expires for good before they could; issuing new ones early. \
             Set the auth role's token_max_ttl to at least the database role's max_ttl"
        );
    }

    /// `unrendered`: the credentials in hand were never written; writing
    /// them is retried on the backoff, before anything else falls due.
    fn next_step(
        &self,
        held: Option<&Held>,
        retry_at: Option<SystemTime>,
        renew_retry: Option<SystemTime>,
        unrendered: bool,
    ) -> (Step, SystemTime) {
        let (step, due) = self.lease_step(held, retry_at, renew_retry);
        match retry_at.unwrap_or_else(now) {
            at if unrendered && at <= due => (Step::Render, at),
            _ => (step, due),
        }
    }

    /// The lease's own next step.
    fn lease_step(
        &self,
        held: Option<&Held>,
        retry_at: Option<SystemTime>,
        renew_retry: Option<SystemTime>,
    ) -> (Step, SystemTime) {
        let later = |t: SystemTime| retry_at.map_or(t, |r| r.max(t));
        let Some(h) = held else { return (Step::Issue, retry_at.unwrap_or_else(now)) };
        let cfg = self.cfg();
        let policy = policy(&cfg);
        if let Some(ttl) = h.secret.data.rotates_in().filter(|_| !h.has_lease()) {
            return (Step::Refresh, later(schedule::static_reread_at(h.times.granted_at, ttl, h.sample)));
        }
        if !h.has_lease() {
            let at = schedule::refresh_at(
                h.times.granted_at,
                h.secret.data.expiration(),
                cfg.refresh_interval,
                &policy,
                h.sample,
            );
            return (Step::Refresh, later(at));
        }
        let token_end = self.auth.borrow().token_end(&h.token_accessor);
        let mut next = schedule::next(&h.times, token_end, &policy, h.sample, renew_retry);
        if h.spread && renew_retry.is_none() {
            next = schedule::spread_renewal(next, &h.times, &policy, h.sample);
        }
        let step = match next.action {
            Action::Renew => Step::Renew,
            Action::Reissue(bound) => Step::Reissue(bound),
        };
        (step, later(next.at))
    }

    async fn current_token(&mut self) -> Option<Arc<HeldToken>> {
        self.token_other_than(None).await
    }

    /// The current token, once there is one other than `avoid` (the final
    /// token that bounds the lease being replaced: credentials issued under
    /// it would die with it too). Asks the auth loop for a new login first.
    /// None when stopped.
    async fn token_other_than(&mut self, avoid: Option<&Accessor>) -> Option<Arc<HeldToken>> {
        let usable = |s: &AuthState| s.current.as_ref().is_some_and(|c| Some(&c.token.accessor) != avoid);
        if avoid.is_some() && !usable(&self.auth.borrow()) {
            self.relogin.notify_one();
        }
        let cancel = self.cancel.clone();
        tokio::select! {
            state = self.auth.wait_for(usable) => state.ok()?.current.clone(),
            _ = cancel.cancelled() => None,
        }
    }

    async fn read(
        &mut self,
        avoid: Option<&Accessor>,
        until: Option<SystemTime>,
    ) -> Result<(Secret, Accessor), VaultError> {
        let cfg = self.cfg();
        let token = self
            .token_other_than(avoid)
            .await
            .ok_or(VaultError::Setup { op: "read secret", reason: "no Vault token".into() })?;
        let method = match cfg.method {
            Method::Get => HttpMethod::GET,
            Method::Post => HttpMethod::POST,
        };
        let call = self.client.read_secret(&token.token.secret, method, &cfg.path, cfg.body.as_ref());
        let result = self.within("read secret", until, Box::pin(call)).await;
        if let Err(e) = &result
            && e.is_permission_denied()
        {
            self.relogin.notify_one();
        }
        result.map(|s| (s, token.token.accessor.clone()))
    }

    /// Reads the secret and counts it; a failure is counted and logged as
    /// `failed_event`, and gives Vault's `Retry-After` if it sent one. The
    /// read gives up when `in_hand` (the credentials it replaces) end.
    async fn fetch(
        &mut self,
        failed_event: &'static str,
        avoid: Option<&Accessor>,
        in_hand: Option<&Held>,
    ) -> Result<Held, Option<Duration>> {
        let name = self.name();
        match self.read(avoid, in_hand.and_then(Held::usable_until)).await {
            Ok((secret, accessor)) => {
                let at = now();
                let fresh = Held {
                    times: LeaseTimes::issued(at, secret.lease_duration, secret.renewable),
                    secret,
                    token_accessor: accessor,
                    issued_at: at,
                    sample: rand::random(),
                    spread: false,
                };
                let t = &fresh.times;
                self.telemetry.issued(&name, &fresh.secret.lease_id, t.ttl, t.renewable, at, fresh.expires_at());
                Ok(fresh)
            }
            Err(e) => {
                let permanent = e.permanent();
                IssueFailed { secret: &name, event: failed_event, error: &e.to_string(), permanent }
                    .emit(&self.telemetry);
                // A role or path Vault does not have: ever more slowly (a
                // denial may be a revoked token, which a new login fixes).
                self.slow_retry = matches!(permanent, Some("unknown_role" | "unknown_path"));
                Err(e.retry_after())
            }
        }
    }

    /// Obtains new credentials and renders them. A previous lease is retired
    /// (revoked later); if writing fails the new lease is revoked instead and
    /// the old credentials stay in place.
    async fn issue_and_render(
        &mut self,
        held: &mut Option<Held>,
        retired: &mut Vec<Retired>,
    ) -> Result<(), Option<Duration>> {
        let cfg = self.cfg();
        let name = cfg.name.clone();
        // Files that cannot be written would make Vault create a user for
        // nothing, again at every retry: nothing is asked until they can.
        if let Err(error) = crate::files::probe(cfg.files.iter().map(|f| f.path.as_path())) {
            RenderFailed { secret: &name, error: &format!("{error}; nothing requested from Vault"), partial: false }
                .emit(&self.telemetry);
            return Err(None);
        }
        // Replacing credentials that die with a final token: not under it.
        let avoid = held.as_ref().filter(|h| self.auth.borrow().token_end(&h.token_accessor).is_some());
        let avoid = avoid.map(|h| h.token_accessor.clone());
        let fresh = self.fetch("issue_failed", avoid.as_ref(), held.as_ref()).await?;
        let at = fresh.issued_at;
        tracing::info!(
            event = "issued",
            secret = %name,
            lease = %fresh.secret.lease_id,
            username = fresh.secret.data.str("username").unwrap_or(""),
            ttl_secs = fresh.times.ttl.as_secs(),
            expires_at = %crate::clock::rfc3339(fresh.times.expires_at()),
            renewable = fresh.times.renewable,
            warnings = %fresh.secret.warnings.join("; "),
            "obtained credentials"
        );
        // Write-ahead: the new lease is on disk before any file names it, so
        // a kill -9 from here on leaves a lease the next start adopts, not an
        // orphan. The old one is recorded as retired until then.
        self.persist_leases(Some(&fresh), retired.iter().map(|r| &r.held).chain(held.as_ref()));
        let replaced = held.as_ref().filter(|h| h.has_lease()).map(|h| &h.secret.data);
        match self.render(&fresh, replaced).await {
            Rendered::All => {}
            // The new credentials are kept (renewed on their schedule) and
            // only the writing is retried (`Step::Render`): issuing again
            // would make Vault create and drop a user at every retry. The
            // old lease, which the files still name, is retired but not
            // revoked before they are written or it ends (`tend_retired`).
            Rendered::Nothing => {
                tracing::error!(event = "render_pending", secret = %name, lease = %fresh.secret.lease_id, "keeping the new lease; writing its files is retried alone");
                if let Some(old) = held.take().filter(Held::has_lease) {
                    retired.push(Retired {
                        held: old,
                        revoke_at: at + cfg.revoke_replaced_after,
                        draining_since: None,
                    });
                }
                *held = Some(fresh);
                return Err(None);
            }
            // Some files name the new credentials, others the old: both stay
            // alive (the new one current, the old retired as after any
            // replacement); the next render completes the set.
            Rendered::Partly => {
                tracing::error!(event = "render_partial", secret = %name, "some files hold the new credentials: keeping both leases");
            }
        }
        let _ = self.events.send(Event::Rendered { secret: name.clone() });
        if let Some(old) = held.take().filter(Held::has_lease) {
            let revoke_at = at + cfg.revoke_replaced_after;
            tracing::info!(event = "replaced", secret = %name, old_lease = %old.secret.lease_id, revoke_in_secs = cfg.revoke_replaced_after.as_secs(), "credentials replaced; old lease revoked later");
            retired.push(Retired { held: old, revoke_at, draining_since: None });
        }
        *held = Some(fresh);
        Ok(())
    }

    /// Secrets without a lease (KV): re-read and re-render when changed.
    async fn refresh(&mut self, held: &mut Option<Held>) -> Result<(), Option<Duration>> {
        let fresh = self.fetch("refresh_failed", None, held.as_ref()).await?;
        // A static role read again before its rotation: only `ttl` moved,
        // and the files stay as they are.
        let unchanged = held.as_ref().is_some_and(|h| h.secret.data.same_static_credentials(&fresh.secret.data));
        if unchanged {
            tracing::debug!(event = "unchanged", secret = %self.name(), "the static role's password has not rotated yet");
        } else if self.render(&fresh, None).await == Rendered::Nothing {
            return Err(None);
        }
        *held = Some(fresh);
        Ok(())
    }

    async fn renew(&mut self, held: &mut Option<Held>) -> Result<(), Option<Duration>> {
        let name = self.name();
        let Some(h) = held.as_mut() else { return Ok(()) };
        let Some(token) = self.current_token().await else { return Err(None) };
        let until = {
            let policy = policy(&self.spec.borrow().cfg);
            let token_end = self.auth.borrow().token_end(&h.token_accessor);
            schedule::replace_by(&h.times, token_end, &policy, h.sample)
        };
        let call = self.client.renew_lease(&token.token.secret, &h.secret.lease_id, h.times.first_ttl);
        match self.within("renew lease", Some(until), Box::pin(call)).await {
            Ok(r) => {
                let at = now();
                h.times = h.times.renewed(at, r.lease_duration, r.renewable, &r.warnings);
                h.sample = rand::random();
                h.spread = false;
                let (ttl, renewable, capped) = (r.lease_duration, r.renewable, h.times.capped);
                Renewed { secret: &name, lease: &h.secret.lease_id, ttl, renewable, capped, at }.emit(&self.telemetry);
                Ok(())
            }
            Err(e) if lease_gone(&e) => {
                let error = h.secret.lease_id.redact(&e.to_string());
                LeaseGone { secret: &name, lease: &h.secret.lease_id, error: &error, at: now() }.emit(&self.telemetry);
                // The old lease is dead: it ends now, so the schedule re-issues.
                h.times.renewable = false;
                h.times.ttl = Duration::ZERO;
                h.times.granted_at = now();
                Ok(())
            }
            Err(e) => {
                if e.is_permission_denied() {
                    self.relogin.notify_one();
                }
                let error = h.secret.lease_id.redact(&e.to_string());
                RenewFailed { secret: &name, lease: &h.secret.lease_id, error: &error }.emit(&self.telemetry);
                Err(e.retry_after())
            }
        }
    }

    /// A replaced lease's next step (`schedule::retired`).
    fn retired_step(&self, r: &Retired, at: SystemTime) -> (RetiredAction, SystemTime) {
        let spec = self.spec.borrow();
        // Under `migrate`, connections still open on a replaced lease are
        // sessions that could not move: kept like `keep`'s.
        let keep = spec.cfg.proxy.as_ref().is_some_and(|p| p.replaced_connections != ReplacedConnections::Close);
        let open = spec.proxy.as_ref().map_or(0, |f| f.open_as(&r.held.secret.data));
        let safe_end = r.held.times.safe_end();
        let end = self.auth.borrow().token_end(&r.held.token_accessor).map_or(safe_end, |t| t.min(safe_end));
        let policy = policy(&spec.cfg);
        let lease = RetiredLease {
            times: r.held.times,
            revoke_at: r.revoke_at,
            draining_since: r.draining_since,
            sample: r.held.sample,
        };
        schedule::retired(at, &lease, open, keep, end, &policy)
    }

    /// Drains, renews and revokes the replaced leases that are due; true
    /// when any left the list. `files_name_them`: the current credentials'
    /// files are not written yet, so none is revoked before its end.
    async fn tend_retired(&mut self, retired: &mut Vec<Retired>, files_name_them: bool) -> bool {
        let name = self.name();
        let at = now();
        let before = retired.len();
        let mut keep = Vec::new();
        let feed = self.spec.borrow().proxy.clone();
        for mut r in std::mem::take(retired) {
            match self.retired_step(&r, at).0 {
                RetiredAction::Wait => keep.push(r),
                RetiredAction::Drain => {
                    tracing::info!(event = "draining", secret = %name, old_lease = %r.held.secret.lease_id, "closing the proxied connections of replaced credentials between transactions");
                    if let Some(feed) = &feed {
                        feed.close_when_idle(&r.held.secret.data);
                    }
                    r.draining_since = Some(at);
                    keep.push(r);
                }
                RetiredAction::Renew => {
                    self.renew_retired(&mut r.held).await;
                    keep.push(r);
                }
                // The files still name it (the new ones could not be
                // written yet): kept until they are, or it ends.
                RetiredAction::Revoke if files_name_them && r.held.times.expires_at() > at => {
                    keep.push(Retired { revoke_at: at + Duration::from_secs(1), draining_since: None, ..r });
                }
                RetiredAction::Revoke => {
                    // Vault already revoked it at expiry, or we do now.
                    let gone = r.held.times.expires_at() <= at || self.revoke(&r.held.live(&name)).await;
                    if !gone {
                        keep.push(Retired { revoke_at: at + Duration::from_secs(30), draining_since: None, ..r });
                    } else if let Some(feed) = &feed {
                        feed.revoked(&r.held.secret.data);
                    }
                }
            }
        }
        *retired = keep;
        retired.len() != before
    }

    /// Keeps a replaced lease alive for the proxied connections that still
    /// use it (`replaced_connections: keep`). A failed renewal is not
    /// retried: the connections are closed before the lease ends instead.
    async fn renew_retired(&mut self, h: &mut Held) {
        let name = self.name();
        let Some(token) = self.current_token().await else { return };
        let call = self.client.renew_lease(&token.token.secret, &h.secret.lease_id, h.times.first_ttl);
        // Bounded like the current lease's renewals: a hung one must not
        // hold up the loop that tends the current credentials.
        match self.within("renew lease", h.usable_until(), Box::pin(call)).await {
            Ok(r) => {
                h.times = h.times.renewed(now(), r.lease_duration, r.renewable, &r.warnings);
                h.sample = rand::random();
                tracing::info!(event = "renewed_replaced", secret = %name, lease = %h.secret.lease_id, ttl_secs = r.lease_duration.as_secs(), "renewed replaced credentials that proxied connections still use");
            }
            Err(e) => {
                let error = h.secret.lease_id.redact(&e.to_string());
                tracing::warn!(event = "renew_failed", secret = %name, lease = %h.secret.lease_id, error = %error, "renewing replaced credentials failed; their connections close before the lease ends");
                h.times.capped = true;
                if lease_gone(&e) {
                    h.times.ttl = Duration::ZERO;
                    h.times.granted_at = now();
                }
            }
        }
    }

    async fn revoke(&mut self, lease: &LiveLease) -> bool {
        let Some(token) = self.current_token().await else { return false };
        match self.client.revoke_lease(&token.token.secret, &lease.lease_id).await {
            Ok(()) => {
                Revoked { secret: &lease.secret, lease: &lease.lease_id }.emit(&self.telemetry);
                true
            }
            Err(e) => {
                let error = lease.lease_id.redact(&e.to_string());
                RevokeFailed { secret: &lease.secret, lease: &lease.lease_id, error: &error, replaced: true }
                    .emit(&self.telemetry);
                false
            }
        }
    }

    /// Renders every file, then notifies the application if any changed.
    /// False when a file could not be rendered or written (logged).
    /// `previous`: the credentials being replaced, for templates that give
    /// the app both.
    async fn render(&self, h: &Held, previous: Option<&SecretData>) -> Rendered {
        let spec = self.spec.borrow().clone();
        let ctx = Context {
            name: &spec.cfg.name,
            data: &h.secret.data,
            lease_id: &h.secret.lease_id,
            lease_duration: h.times.ttl,
            issued_at: h.issued_at,
            expires_at: h.expires_at(),
            previous,
            proxy: spec.cfg.proxy.as_ref().map(|p| (&p.listen, spec.proxy.as_ref().and_then(|f| f.local_password()))),
            rotation_window: h.has_lease().then(|| {
                schedule::rotation_window(h.times.first_ttl, &policy(&spec.cfg), spec.cfg.revoke_replaced_after)
            }),
        };
        // Everything is rendered in memory first: a failing template writes
        // nothing; then every file is staged before any is renamed.
        let written = match spec.templates.render(&ctx) {
            Ok(files) => write_all(&files).map_err(|e| (e.to_string(), e.partial)),
            Err(error) => Err((error.to_string(), false)),
        };
        match written {
            Ok(written) => {
                if let Some(feed) = &spec.proxy {
                    feed.publish(&h.secret.data);
                }
                let changed = written.iter().filter(|(_, c)| *c).count();
                let secret = &spec.cfg.name;
                let rotation_window = ctx.rotation_window;
                RenderedEvent { secret, written: &written, expires_at: ctx.expires_at, rotation_window, at: now() }
                    .emit(&self.telemetry);
                if changed > 0
                    && let Some(hooks) = &spec.cfg.on_change
                {
                    for (hook, result) in crate::hooks::run(&spec.cfg.name, hooks, &h.secret.data).await {
                        let error = result.err().map(|e| e.to_string());
                        HookRan { secret: &spec.cfg.name, hook, error: error.as_deref() }.emit(&self.telemetry);
                    }
                }
                Rendered::All
            }
            Err((e, partial)) => {
                RenderFailed { secret: &spec.cfg.name, error: &e, partial }.emit(&self.telemetry);
                if partial { Rendered::Partly } else { Rendered::Nothing }
            }
        }
    }
}
