//! The expiration manager: lease renewal and revocation, revocation at expiry
//! with Vault's retry schedule, and the token→lease coupling (a token's
//! revocation or expiry revokes every lease it created).

use std::sync::Arc;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use rand::Rng;
use serde_json::json;

use crate::api::{Envelope, Failure, Outcome, Reply};
use crate::core::{Core, LeaseEntry, LeaseKind, State};
use crate::database;

/// Vault gives up after this many failed revocation attempts and marks the
/// lease irrevocable.
const MAX_REVOKE_ATTEMPTS: u32 = 6;

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

pub async fn renew(core: &Arc<Core>, lease_id: &str, increment: i64) -> Outcome {
    if lease_id.is_empty() {
        return Err(Failure::resp(400, "lease_id must be specified"));
    }
    if lease_id.starts_with("auth/") {
        return Err(Failure::resp(400, "tokens cannot be renewed through this endpoint"));
    }
    let now = Utc::now();
    let (plan, lease) = {
        let state = core.state();
        let Some(lease) = state.leases.get(lease_id).cloned() else {
            return Err(Failure::resp(400, "lease not found"));
        };
        if lease.irrevocable.is_some() {
            return Err(Failure::resp(400, "lease is expired and has failed previous revocation attempts"));
        }
        if lease.expire_time <= now {
            return Err(Failure::resp(400, "lease expired"));
        }
        if !lease.renewable {
            return Err(Failure::resp(400, "lease is not renewable"));
        }
        let plan = database::plan_renew(&state, &lease, increment, now).map_err(renew_failed)?;
        (plan, lease)
    };
    if plan.ttl.ttl > 0 {
        let valid_until = now + Duration::seconds(plan.ttl.ttl + database::EXPIRATION_BUFFER_SECS);
        plan.plugin
            .update_expiration(&lease.username, valid_until, &plan.renew_statements)
            .await
            .map_err(renew_failed)?;
    }
    {
        let mut state = core.state();
        let Some(entry) = state.leases.get_mut(lease_id) else {
            return Err(Failure::resp(400, "lease not found"));
        };
        entry.expire_time = now + Duration::seconds(plan.ttl.ttl);
        entry.last_renewal = Some(now);
    }
    core.expiry_wake.notify_one();
    Ok(Reply::Envelope(Envelope {
        lease_id: lease_id.to_string(),
        renewable: true,
        lease_duration: plan.ttl.ttl,
        warnings: plan.ttl.warnings,
        ..Default::default()
    }))
}

fn renew_failed(cause: String) -> Failure {
    Failure::resp(400, format!("failed to renew entry: resp: (*logical.Response)(nil) err: {cause}"))
}

pub fn lookup(core: &Arc<Core>, lease_id: &str) -> Outcome {
    if lease_id.is_empty() {
        return Err(Failure::resp(400, "lease_id must be specified"));
    }
    let state = core.state();
    let Some(lease) = state.leases.get(lease_id) else {
        return Err(Failure::resp(400, "invalid lease"));
    };
    let ttl = (lease.expire_time - Utc::now()).num_seconds().max(0);
    Ok(Reply::Envelope(Envelope::data(json!({
        "id": lease.id,
        "path": lease.id.rsplit_once('/').map_or("", |(p, _)| p),
        "issue_time": rfc3339(lease.issue_time),
        "expire_time": rfc3339(lease.expire_time),
        "last_renewal": lease.last_renewal.map(rfc3339),
        "renewable": lease.renewable && lease.irrevocable.is_none(),
        "ttl": ttl,
    }))))
}

/// Synchronous revocation (`sync=true`, Vault's default): the backend drops
/// the credentials before the lease is deleted. Unknown ids succeed.
pub async fn revoke_now(core: &Arc<Core>, lease_id: &str) -> Result<(), String> {
    let _guard = core.lease_locks.lock(lease_id).await;
    let result = revoke_locked(core, lease_id).await;
    core.lease_locks.forget_if_gone(core, lease_id);
    result
}

async fn revoke_locked(core: &Arc<Core>, lease_id: &str) -> Result<(), String> {
    let plan = {
        let mut state = core.state();
        if let Some(token_id) = state.tokens.values().find(|t| t.lease_id == lease_id).map(|t| t.id.clone()) {
            revoke_token_locked(&mut state, &token_id, Utc::now());
            drop(state);
            core.expiry_wake.notify_one();
            return Ok(());
        }
        let Some(lease) = state.leases.get(lease_id).cloned() else {
            return Ok(());
        };
        plan_revoke(&state, &lease)
    };
    let result = match plan {
        Ok(plan) => plan.run(core).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            core.state().leases.remove(lease_id);
            Ok(())
        }
        Err(e) => Err(format!("failed to revoke entry: resp: (*logical.Response)(nil) err: {e}")),
    }
}

/// What revoking a lease will do, taken from the state before the lock is
/// released (the database call runs without it).
enum RevokePlan {
    Database(database::RevokePlan),
    Pki { mount: String, serial: String },
}

impl RevokePlan {
    async fn run(self, core: &Core) -> Result<(), String> {
        match self {
            RevokePlan::Database(plan) => plan.run().await,
            RevokePlan::Pki { mount, serial } => {
                crate::pki::revoke(core, &mount, &serial);
                Ok(())
            }
        }
    }
}

fn plan_revoke(state: &State, lease: &LeaseEntry) -> Result<RevokePlan, String> {
    match &lease.kind {
        LeaseKind::Database => database::plan_revoke(state, lease).map(RevokePlan::Database),
        LeaseKind::Pki { serial } => Ok(RevokePlan::Pki { mount: lease.mount.clone(), serial: serial.clone() }),
    }
}

/// Lease and token-lease ids starting with `prefix`, sorted.
pub fn ids_with_prefix(core: &Arc<Core>, prefix: &str) -> Vec<String> {
    let state = core.state();
    let mut ids: Vec<String> = state.leases.keys().filter(|id| id.starts_with(prefix)).cloned().collect();
    ids.extend(
        state
            .tokens
            .values()
            .filter(|t| !t.lease_id.is_empty() && t.lease_id.starts_with(prefix))
            .map(|t| t.lease_id.clone()),
    );
    ids.sort();
    ids
}

/// Marks leases under `prefix` to expire now; the loop revokes them.
pub fn expire_prefix(core: &Arc<Core>, prefix: &str) {
    let now = Utc::now();
    for lease in core.state().leases.values_mut().filter(|l| l.id.starts_with(prefix)) {
        lease.expire_time = now;
    }
    core.expiry_wake.notify_one();
}

pub fn expire_prefix_exact(core: &Arc<Core>, lease_id: &str) {
    if let Some(lease) = core.state().leases.get_mut(lease_id) {
        lease.expire_time = Utc::now();
    }
    core.expiry_wake.notify_one();
}

/// Removes a token and its children; their leases expire now (Vault revokes
/// them asynchronously).
pub fn revoke_token_locked(state: &mut State, token_id: &str, now: DateTime<Utc>) {
    let mut doomed = vec![token_id.to_string()];
    let mut idx = 0;
    while idx < doomed.len() {
        let parent = doomed[idx].clone();
        doomed.extend(state.tokens.values().filter(|t| t.parent.as_deref() == Some(&parent)).map(|t| t.id.clone()));
        idx += 1;
    }
    for id in &doomed {
        state.tokens.remove(id);
    }
    for lease in state.leases.values_mut() {
        if lease.token.as_ref().is_some_and(|t| doomed.contains(t)) && lease.expire_time > now {
            lease.expire_time = now;
        }
    }
}

/// The background loop: sleeps until the next token or lease deadline, or
/// until woken by a change.
pub async fn run(core: Arc<Core>) {
    loop {
        let next = tick(&core);
        let wait = next.map(|t| (t - Utc::now()).to_std().unwrap_or_default());
        match wait {
            Some(wait) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = core.expiry_wake.notified() => {}
                }
            }
            None => core.expiry_wake.notified().await,
        }
    }
}

fn tick(core: &Arc<Core>) -> Option<DateTime<Utc>> {
    let now = Utc::now();
    let mut state = core.state();
    let expired: Vec<String> =
        state.tokens.values().filter(|t| t.expire_time.is_some_and(|e| e <= now)).map(|t| t.id.clone()).collect();
    for id in expired {
        revoke_token_locked(&mut state, &id, now);
    }
    let mut due = Vec::new();
    let mut next: Option<DateTime<Utc>> = state.tokens.values().filter_map(|t| t.expire_time).min();
    for lease in state.leases.values_mut() {
        if lease.revoking || lease.irrevocable.is_some() {
            continue;
        }
        let at = lease.next_attempt.unwrap_or(lease.expire_time).max(lease.expire_time);
        if at <= now {
            lease.revoking = true;
            due.push(lease.id.clone());
        } else {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    drop(state);
    for id in due {
        let core = core.clone();
        tokio::spawn(async move { revoke_expired(core, id).await });
    }
    next
}

async fn revoke_expired(core: Arc<Core>, lease_id: String) {
    let _guard = core.lease_locks.lock(&lease_id).await;
    revoke_expired_locked(&core, &lease_id).await;
    core.lease_locks.forget_if_gone(&core, &lease_id);
}

async fn revoke_expired_locked(core: &Arc<Core>, lease_id: &str) {
    let plan = {
        let state = core.state();
        let Some(lease) = state.leases.get(lease_id).cloned() else {
            return;
        };
        plan_revoke(&state, &lease)
    };
    let result = match plan {
        Ok(plan) => plan.run(core).await,
        Err(e) => Err(e),
    };
    let mut state = core.state();
    match result {
        Ok(()) => {
            state.leases.remove(lease_id);
        }
        Err(e) => {
            if let Some(lease) = state.leases.get_mut(lease_id) {
                lease.revoking = false;
                lease.attempts += 1;
                tracing::warn!(lease = %short(lease_id), attempt = lease.attempts, error = %e, "failed to revoke lease");
                if lease.attempts >= MAX_REVOKE_ATTEMPTS {
                    tracing::warn!(lease = %short(lease_id), error = %e, "lease is now irrevocable");
                    lease.irrevocable = Some(e);
                } else {
                    lease.next_attempt = Some(Utc::now() + retry_delay(lease.attempts));
                }
            }
        }
    }
    drop(state);
    core.expiry_wake.notify_one();
}

/// `2^attempt × 10 s`, randomised ±50 % (Vault's revocation job backoff).
fn retry_delay(attempt: u32) -> Duration {
    let base = 10_000f64 * 2f64.powi(attempt as i32);
    let factor = rand::rng().random_range(0.5..1.5);
    Duration::milliseconds((base * factor) as i64)
}

/// Lease ids in logs are shortened so they cannot be used.
fn short(id: &str) -> String {
    match id.rsplit_once('/') {
        Some((prefix, tail)) => format!("{prefix}/{}…", &tail[..tail.len().min(4)]),
        None => "…".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn retry_delays_grow() {
        let d1 = super::retry_delay(1).num_milliseconds();
        assert!((10_000..=30_000).contains(&d1));
        let d5 = super::retry_delay(5).num_milliseconds();
        assert!((160_000..=480_000).contains(&d5));
    }
}
