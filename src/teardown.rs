//! The ordered teardown at SIGTERM, under one deadline (`shutdown.timeout`):
//! supervisors stop (a renewal in flight is dropped, an issue in flight gets
//! half the budget, so its new lease is known; a supervisor still busy after
//! that is stopped and its leases are taken from the state file, which
//! records a lease before anything else), then every lease is revoked in
//! parallel and `revoke-self` sent with every token but batch ones in the
//! last slice. What is not confirmed revoked is named; the exit code says so.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};

use crate::agent::{EXIT_FAILURE, EXIT_OK};
use crate::auth::{AuthState, HeldToken};
use crate::lease::LiveLease;
use crate::secret::{LeaseId, SecretString};
use crate::state::StateStore;
use crate::telemetry::Telemetry;
use crate::vault::Vault;

/// Waits for each supervisor until `grace`; one still running then is
/// aborted and its leases read from the state file. Returns the leases alive.
pub async fn stop_supervisors(
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

/// Revokes `live` and the tokens by `deadline`; removes the state when
/// everything went, names what may be alive otherwise. The exit code.
pub async fn revoke_and_exit<V: Vault>(
    client: &V,
    live: &[LiveLease],
    auth: &AuthState,
    telemetry: &Telemetry,
    store: Option<&StateStore>,
    deadline: tokio::time::Instant,
) -> i32 {
    let maybe_alive = revoke_all(client, live, auth, telemetry, deadline).await;
    if maybe_alive.is_empty() {
        if let Some(store) = store {
            store.remove();
        }
        tracing::info!(event = "shutdown_done", revoked = live.len(), "every lease revoked; exiting");
        EXIT_OK
    } else {
        for l in &maybe_alive {
            tracing::error!(event = "lease_left_alive", secret = %l.secret, lease = %l.lease_id, "lease may still be alive (it ends at its TTL)");
        }
        EXIT_FAILURE
    }
}

/// The leases of a supervisor stopped mid-call: those the state file
/// records for `secret` (current and retired), plus one whose id nobody
/// knows, since the call may have been a credentials request Vault
/// answered too late. Only a `revoke-self` of the token that made it can
/// take that one down.
fn recorded_leases(store: Option<&StateStore>, secret: &str) -> Vec<LiveLease> {
    tracing::warn!(event = "lease_unknown", secret = %secret, "a credentials request may have been in flight: its lease, if any, goes with its token's revoke-self");
    let unknown =
        LiveLease { secret: secret.to_string(), lease_id: LeaseId::new(String::new()), token_accessor: String::new() };
    let record = store.and_then(|s| s.snapshot().secrets.get(secret).cloned()).unwrap_or_default();
    record
        .current
        .iter()
        .chain(&record.retired)
        .map(|r| LiveLease {
            secret: secret.to_string(),
            lease_id: r.lease_id.clone(),
            token_accessor: r.token_accessor.clone(),
        })
        .chain(std::iter::once(unknown))
        .collect()
}

/// Revokes leases in parallel with `token`; returns those that failed.
pub async fn revoke_leases<V: Vault>(
    client: &V,
    leases: &[LiveLease],
    token: Option<&HeldToken>,
    telemetry: &Telemetry,
) -> Vec<LiveLease> {
    let mut revoked = vec![false; leases.len()];
    revoke_marking(client, leases, token, telemetry, &mut revoked).await;
    leases.iter().zip(revoked).filter(|(_, done)| !done).map(|(l, _)| l.clone()).collect()
}

/// Revokes leases in parallel with `token`, marking each in `revoked` (kept
/// by the caller, so a deadline that drops this future loses nothing).
async fn revoke_marking<V: Vault>(
    client: &V,
    leases: &[LiveLease],
    token: Option<&HeldToken>,
    telemetry: &Telemetry,
    revoked: &mut [bool],
) {
    let Some(token) = token else { return };
    let mut tasks = JoinSet::new();
    for (i, lease) in leases.iter().cloned().enumerate().filter(|(_, l)| !l.lease_id.is_empty()) {
        let client = client.clone();
        let secret: SecretString = token.token.secret.clone();
        tasks.spawn(async move {
            let result = client.revoke_lease(&secret, &lease.lease_id).await;
            (i, lease, result)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let Ok((i, lease, result)) = joined else { continue };
        match result {
            Ok(()) => {
                telemetry.revoked(&lease.secret, true);
                revoked[i] = true;
                tracing::info!(event = "revoked", secret = %lease.secret, lease = %lease.lease_id, "revoked lease")
            }
            Err(e) => {
                telemetry.revoked(&lease.secret, false);
                let e = lease.lease_id.redact(&e.to_string());
                tracing::warn!(event = "revoke_failed", secret = %lease.secret, lease = %lease.lease_id, error = %e, "revoking lease failed");
            }
        }
    }
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
    let leases = revoke_marking(client, live, auth.current.as_deref(), telemetry, &mut revoked);
    let in_time = tokio::time::timeout_at(deadline - slice, leases).await.is_ok();
    let mut revoked_tokens = HashSet::new();
    let tokens_in_time =
        tokio::time::timeout_at(deadline, revoke_tokens(client, &auth.held, &mut revoked_tokens)).await.is_ok();
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

/// revoke-self with every token but batch ones, marking each in `revoked`.
async fn revoke_tokens<V: Vault>(client: &V, tokens: &[Arc<HeldToken>], revoked: &mut HashSet<String>) {
    let mut tasks = JoinSet::new();
    // Batch tokens cannot be revoked ("batch tokens cannot be revoked"):
    // their leases were revoked one by one, the rest end with the token.
    for t in tokens.iter().filter(|t| !t.token.batch).cloned() {
        let client = client.clone();
        tasks.spawn(async move {
            let result = client.revoke_self(&t.token.secret).await;
            (t.token.accessor.clone(), result)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let Ok((accessor, result)) = joined else { continue };
        match result {
            Ok(()) => {
                tracing::info!(event = "token_revoked", accessor = %accessor, "revoked Vault token");
                revoked.insert(accessor);
            }
            // An expired or revoked token is gone already, and its leases with it.
            Err(e) if e.is_permission_denied() => {
                revoked.insert(accessor);
            }
            Err(e) => {
                tracing::warn!(event = "token_revoke_failed", accessor = %accessor, error = %e, "revoking Vault token failed")
            }
        }
    }
}
