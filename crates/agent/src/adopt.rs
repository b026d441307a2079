//! Adoption at start: tokens and leases recorded in the state file that
//! Vault still honours are used instead of a new login and new credentials,
//! so an init container followed by the sidecar, or a restarted container,
//! never creates a second database user.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::HeldToken;
use crate::clock::now;
use crate::lease::{Held, LiveLease};
use crate::state::{LeaseRecord, State, TokenRecord, secs, time};
use config::Config;
use vault::secret::SecretString;
use vault::{Token, Vault};

/// Recorded tokens that `lookup-self` still accepts, with their TTL left.
pub async fn tokens<V: Vault>(client: &V, records: &[TokenRecord]) -> Vec<Arc<HeldToken>> {
    let mut held = Vec::new();
    for r in records {
        let secret = SecretString::from(r.token.as_str().to_string());
        let recorded_end = time(r.granted_at) + secs(r.ttl);
        let (ttl, renewable) = match client.lookup_self(&secret).await {
            Ok(found) => found,
            // Only a refusal (403: expired, revoked) means gone. Vault
            // unreachable or an unreadable answer: trust the record, or the
            // token (and the leases it owns) would be left alive, unknown.
            Err(e) if !e.is_permission_denied() && recorded_end > now() => {
                (recorded_end.duration_since(now()).unwrap_or_default(), !r.final_expiry)
            }
            Err(e) => {
                tracing::info!(event = "token_not_adopted", accessor = %r.accessor, error = %e, "recorded token is no longer valid");
                continue;
            }
        };
        tracing::info!(event = "token_adopted", accessor = %r.accessor, ttl_secs = ttl.as_secs(), "adopted the recorded Vault token");
        held.push(Arc::new(HeldToken {
            token: Token { secret, accessor: r.accessor.clone(), ttl: secs(r.first_ttl), renewable, batch: r.batch },
            granted_at: now(),
            ttl,
            final_expiry: r.final_expiry || !renewable,
        }));
    }
    held
}

/// What adoption found for the configured secrets.
#[derive(Default)]
pub struct Leases {
    pub adopted: HashMap<String, Held>,
    /// Recorded leases to revoke now: replaced ones, and those of secrets no
    /// longer in the config.
    pub revoke: Vec<LiveLease>,
    /// Secrets recorded but no longer configured.
    pub removed: Vec<String>,
}

/// Checks each recorded lease with `sys/leases/lookup`; a live lease of a
/// secret whose path is unchanged is adopted, a dead one is re-issued.
pub async fn leases<V: Vault>(client: &V, token: &SecretString, state: &State, config: &Config) -> Leases {
    let mut out = Leases::default();
    for (name, record) in &state.secrets {
        let configured = config.secrets.iter().find(|s| &s.name == name);
        let live = |r: &LeaseRecord| LiveLease {
            secret: name.clone(),
            lease_id: r.lease_id.clone(),
            token_accessor: r.token_accessor.clone(),
        };
        out.revoke.extend(record.retired.iter().map(live));
        let Some(current) = &record.current else { continue };
        match configured {
            Some(cfg) if cfg.path == current.path => {
                if let Some(held) = check(client, token, name, current).await {
                    out.adopted.insert(name.clone(), held);
                }
            }
            _ => {
                tracing::info!(event = "lease_unconfigured", secret = %name, lease = %current.lease_id, "recorded lease is no longer configured; revoking it");
                out.revoke.push(live(current));
                if configured.is_none() {
                    out.removed.push(name.clone());
                }
            }
        }
    }
    out
}

async fn check<V: Vault>(client: &V, token: &SecretString, name: &str, r: &LeaseRecord) -> Option<Held> {
    match client.lookup_lease(token, &r.lease_id).await {
        Ok((ttl, renewable)) if ttl > Duration::ZERO => {
            tracing::info!(event = "lease_adopted", secret = %name, lease = %r.lease_id, ttl_secs = ttl.as_secs(), "adopted the recorded lease");
            Some(Held::adopted(r, ttl, renewable))
        }
        Ok(_) => {
            tracing::info!(event = "lease_not_adopted", secret = %name, lease = %r.lease_id, reason = "expired", "recorded lease has expired; issuing new credentials");
            None
        }
        // Only "gone" means gone.
        Err(e) if lease_gone(&e) => {
            tracing::info!(event = "lease_not_adopted", secret = %name, lease = %r.lease_id, reason = "gone", "recorded lease is gone; issuing new credentials");
            None
        }
        // Anything else (Vault unreachable, a policy without
        // sys/leases/lookup: 403) says nothing about the lease: while its
        // record says it lives, it is adopted unverified, never left alive
        // beside a second set.
        Err(e) if r.expires_at() > now() => {
            let error = r.lease_id.redact(&e.to_string());
            tracing::warn!(event = "lease_adopted_unverified", secret = %name, lease = %r.lease_id, error = %error, "cannot look the recorded lease up; adopting it as recorded");
            Some(Held::adopted(r, r.expires_at().duration_since(now()).unwrap_or_default(), r.renewable))
        }
        Err(_) => {
            tracing::info!(event = "lease_not_adopted", secret = %name, lease = %r.lease_id, reason = "expired", "recorded lease has expired; issuing new credentials");
            None
        }
    }
}

/// Vault's answers for a lease that does not exist (any more).
fn lease_gone(e: &vault::VaultError) -> bool {
    e.status() == Some(400) && (e.mentions("invalid lease") || e.mentions("lease not found"))
}
