//! Revoking leases and tokens in parallel: what a reload's replacement,
//! adoption and the teardown share. The order and the deadline are the
//! caller's.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::task::JoinSet;

use crate::auth::HeldToken;
use crate::lease::LiveLease;
use crate::telemetry::Telemetry;
use crate::telemetry::events::{Event as _, RevokeFailed, Revoked};
use vault::Vault;
use vault::secret::{Accessor, SecretString};

/// Revokes leases in parallel with `token`; returns those that failed.
pub async fn leases<V: Vault>(
    client: &V,
    leases: &[LiveLease],
    token: Option<&HeldToken>,
    telemetry: &Telemetry,
) -> Vec<LiveLease> {
    let mut revoked = vec![false; leases.len()];
    marking(client, leases, token, telemetry, &mut revoked).await;
    leases.iter().zip(revoked).filter(|(_, done)| !done).map(|(l, _)| l.clone()).collect()
}

/// Revokes leases in parallel with `token`, marking each in `revoked` (kept
/// by the caller, so a deadline that drops this future loses nothing).
pub async fn marking<V: Vault>(
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
                revoked[i] = true;
                Revoked { secret: &lease.secret, lease: &lease.lease_id }.emit(telemetry);
            }
            Err(e) => {
                let error = lease.lease_id.redact(&e.to_string());
                RevokeFailed { secret: &lease.secret, lease: &lease.lease_id, error: &error, replaced: false }
                    .emit(telemetry);
            }
        }
    }
}

/// revoke-self with every token but batch ones, marking each in `revoked`.
pub async fn tokens<V: Vault>(client: &V, tokens: &[Arc<HeldToken>], revoked: &mut HashSet<Accessor>) {
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
