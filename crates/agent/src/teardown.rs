//! The ordered teardown, from the cancelled stop token to an `Outcome`,
//! under one deadline (`shutdown.timeout`): supervisors stop (a renewal in
//! flight is dropped, an issue in flight gets half the budget, so its new
//! lease is known; a supervisor still busy after that is stopped and its
//! leases are taken from the state file, which records a lease before
//! anything else), the proxies and the auth loop are joined, then every
//! lease is revoked in parallel and `revoke-self` sent with every token but
//! batch ones in the last slice. What is not confirmed revoked is named;
//! the outcome says so, and `main` maps it to the exit code.

use std::collections::HashSet;
use std::time::Duration;

use config::ShutdownConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::AuthState;
use crate::lease::LiveLease;
use crate::revoke;
use crate::state::StateStore;
use crate::telemetry::Telemetry;
use vault::Vault;
use vault::secret::{Accessor, LeaseId};

/// How the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `--once`: every secret rendered; the leases stay for the sidecar.
    Rendered,
    /// `--once`: not every secret was rendered within `startup_timeout`.
    NotRendered,
    /// Stopped: every lease revoked, or kept by `shutdown.revoke: false`.
    Stopped,
    /// Stopped, but this many leases may still be alive (each named in
    /// the log; they end at their TTL).
    LeftAlive(usize),
}

impl Outcome {
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Rendered | Outcome::Stopped)
    }
}

/// Everything the running agent hands over when it stops.
pub struct Teardown<V> {
    pub client: V,
    /// Cancelled by the caller; cancelled again here, harmlessly.
    pub stop: CancellationToken,
    pub supervisors: Vec<(String, JoinHandle<Vec<LiveLease>>)>,
    /// The proxies (and anything else spawned beside the supervisors).
    pub tasks: TaskTracker,
    pub auth_task: JoinHandle<()>,
    pub auth: watch::Receiver<AuthState>,
    /// Leases alive that no supervisor holds (replaced by a reload).
    pub orphans: Vec<LiveLease>,
    pub telemetry: std::sync::Arc<Telemetry>,
    pub store: Option<std::sync::Arc<StateStore>>,
    pub shutdown: ShutdownConfig,
    /// `Some(rendered)` for `--once`.
    pub once: Option<bool>,
}

impl<V: Vault> Teardown<V> {
    pub async fn run(self) -> Outcome {
        let deadline = crate::clock::instant() + self.shutdown.timeout;
        let grace = deadline - self.shutdown.timeout / 2;
        self.stop.cancel();
        let mut live = self.orphans;
        live.extend(stop_supervisors(self.supervisors, grace, self.store.as_deref()).await);
        self.tasks.close();
        if tokio::time::timeout_at(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                event = "tasks_stopped",
                tasks = self.tasks.len(),
                "proxies still closing at the shutdown grace; left to end with the process"
            );
        }
        let mut auth_task = self.auth_task;
        if tokio::time::timeout_at(grace, &mut auth_task).await.is_err() {
            auth_task.abort();
        }
        let auth = self.auth.borrow().clone();
        match self.once {
            Some(false) => return Outcome::NotRendered,
            Some(true) => {
                tracing::info!(
                    event = "once_done",
                    leases = live.len(),
                    "rendered every secret; leases stay alive for the sidecar to adopt"
                );
                return Outcome::Rendered;
            }
            None => {}
        }
        if !self.shutdown.revoke {
            tracing::info!(
                event = "shutdown_done",
                leases = live.len(),
                "stopped without revoking (shutdown.revoke: false); state kept"
            );
            return Outcome::Stopped;
        }
        let maybe_alive = revoke_all(&self.client, &live, &auth, &self.telemetry, deadline).await;
        if maybe_alive.is_empty() {
            if let Some(store) = &self.store {
                store.remove();
            }
            tracing::info!(event = "shutdown_done", revoked = live.len(), "every lease revoked; exiting");
            return Outcome::Stopped;
        }
        for l in &maybe_alive {
            tracing::error!(event = "lease_left_alive", secret = %l.secret, lease = %l.lease_id, "lease may still be alive (it ends at its TTL)");
        }
        Outcome::LeftAlive(maybe_alive.len())
    }
}

/// Waits for each supervisor until `grace`; one still running then is
/// aborted and its leases read from the state file. Returns the leases alive.
async fn stop_supervisors(
    handles: Vec<(String, JoinHandle<Vec<LiveLease>>)>,
    grace: tokio::time::Instant,
    store: Option<&StateStore>,
) -> Vec<LiveLease> {
    let mut live = Vec::new();
    for (name, mut handle) in handles {
        match tokio::time::timeout_at(grace, &mut handle).await {
            Ok(Ok(leases)) => live.extend(leases),
            Ok(Err(e)) => {
                tracing::error!(event = "supervisor_failed", error = %e, "a lease supervisor stopped abnormally")
            }
            Err(_) => {
                handle.abort();
                tracing::warn!(event = "supervisor_stopped", secret = %name, "a Vault call was still under way at the shutdown grace; stopped it");
                live.extend(recorded_leases(store, &name));
            }
        }
    }
    live
}

/// The leases of a supervisor stopped mid-call: those the state file
/// records for `secret` (current and retired), plus one whose id nobody
/// knows, since the call may have been a credentials request Vault
/// answered too late. Only a `revoke-self` of the token that made it can
/// take that one down.
fn recorded_leases(store: Option<&StateStore>, secret: &str) -> Vec<LiveLease> {
    tracing::warn!(event = "lease_unknown", secret = %secret, "a credentials request may have been in flight: its lease, if any, goes with its token's revoke-self");
    let unknown = LiveLease {
        secret: secret.to_string(),
        lease_id: LeaseId::new(String::new()),
        token_accessor: Accessor::default(),
    };
    let record = store.and_then(|s| s.snapshot().secrets.get(secret).cloned()).unwrap_or_default();
    // As the supervisor's own stop: a lease past its end is gone with it.
    let at = crate::clock::now();
    record
        .current
        .iter()
        .chain(&record.retired)
        .filter(|r| r.expires_at() > at)
        .map(|r| LiveLease {
            secret: secret.to_string(),
            lease_id: r.lease_id.clone(),
            token_accessor: r.token_accessor.clone(),
        })
        .chain(std::iter::once(unknown))
        .collect()
}

/// Revokes every lease in parallel, then revoke-self every token still held
/// (which also revokes any lease it created: the fallback when the policy
/// lacks `sys/leases/revoke`), by `deadline`: the last fifth of the time
/// left (at least 500 ms) is kept for revoke-self. Returns the leases that
/// may still be alive.
async fn revoke_all<V: Vault>(
    client: &V,
    live: &[LiveLease],
    auth: &AuthState,
    telemetry: &Telemetry,
    deadline: tokio::time::Instant,
) -> Vec<LiveLease> {
    let left = deadline.saturating_duration_since(crate::clock::instant());
    let slice = (left / 5).max(Duration::from_millis(500)).min(left / 2);
    let mut revoked = vec![false; live.len()];
    let leases = revoke::marking(client, live, auth.current.as_deref(), telemetry, &mut revoked);
    let in_time = tokio::time::timeout_at(deadline - slice, leases).await.is_ok();
    let mut revoked_tokens = HashSet::new();
    let tokens_in_time =
        tokio::time::timeout_at(deadline, revoke::tokens(client, &auth.held, &mut revoked_tokens)).await.is_ok();
    if !(in_time && tokens_in_time) {
        tracing::error!(event = "shutdown_timeout", "revocation did not finish within shutdown.timeout");
    }
    // A lease of unknown id (an issue cut short) is gone when every token
    // that could have made it was revoked.
    let every_token = auth.held.iter().all(|t| !t.token.batch && revoked_tokens.contains(&t.token.accessor));
    live.iter()
        .zip(revoked)
        .filter(|(l, done)| !done && !revoked_tokens.contains(&l.token_accessor))
        .filter(|(l, _)| !(l.lease_id.is_empty() && every_token))
        .map(|(l, _)| l.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LeaseRecord, SecretRecord};

    #[test]
    fn recorded_leases_past_their_end_are_not_alive() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let at = crate::state::unix(crate::clock::now());
        let record = |id: &str, granted_ago: f64| LeaseRecord {
            path: "database/creds/app".into(),
            lease_id: LeaseId::new(format!("database/creds/app/{id}")),
            token_accessor: "acc".into(),
            issued_at: at - granted_ago,
            first_ttl: 60.0,
            granted_at: at - granted_ago,
            ttl: 60.0,
            renewable: true,
            capped: false,
            data: Default::default(),
        };
        let secret = SecretRecord { current: Some(record("current", 10.0)), retired: vec![record("ended", 61.0)] };
        store.set_secret("db", secret).unwrap();
        let live = recorded_leases(Some(&store), "db");
        let ids: Vec<&str> = live.iter().map(|l| l.lease_id.expose()).collect();
        // The live one, and the unknown one a cut-short issue may have made.
        assert_eq!(ids, ["database/creds/app/current", ""]);
    }
}
