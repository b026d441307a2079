//! The auth loop: Kubernetes or JWT login (reading the JWT at every login, since
//! projected tokens rotate), renew-self at half the token's TTL, and a new
//! login when the token can no longer be renewed (capped at its max TTL,
//! not renewable, refused with 403). Tokens are published on a `watch`
//! channel; old tokens stay listed until they expire, because Vault revokes
//! a token's leases with it and the lease supervisors must know when.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::clock::now;
use crate::state::{StateStore, TokenRecord, unix};
use crate::telemetry::Telemetry;
use crate::telemetry::events::{Event as _, LoggedIn, LoginFailed, TokenRenewFailed, TokenRenewed};
use crate::timing::{Policy, renew_point, renewal_capped, retry_delay};
use vault::AuthMethod;
use vault::secret::{Accessor, ExposeSecret, SecretString};
use vault::{Token, Vault, VaultClient, VaultError};

/// Tokens are renewed at half their TTL, up to 5 % earlier.
const TOKEN_POLICY: Policy = Policy { renew_at: 0.5, jitter: 0.05, reissue_at: 0.75 };

/// A token the agent holds.
#[derive(Debug, Clone)]
pub struct HeldToken {
    /// `token.ttl` is the TTL first granted, the renewal increment.
    pub token: Token,
    pub granted_at: SystemTime,
    /// TTL of the last grant (login or renewal).
    pub ttl: Duration,
    /// The expiry cannot be extended any more (capped, not renewable, or
    /// the token was refused): leases it created end with it.
    pub final_expiry: bool,
}

#[derive(Debug, Clone, Default)]
pub struct AuthState {
    pub current: Option<Arc<HeldToken>>,
    /// Every token not yet expired, the current one included.
    pub held: Vec<Arc<HeldToken>>,
}

impl HeldToken {
    pub fn expires_at(&self) -> SystemTime {
        self.granted_at + self.ttl
    }

    pub fn record(&self) -> TokenRecord {
        TokenRecord {
            token: zeroize::Zeroizing::new(self.token.secret.expose_secret().to_string()),
            accessor: self.token.accessor.clone(),
            first_ttl: self.token.ttl.as_secs_f64(),
            granted_at: unix(self.granted_at),
            ttl: self.ttl.as_secs_f64(),
            final_expiry: self.final_expiry,
            batch: self.token.batch,
        }
    }
}

impl AuthState {
    /// When the token with `accessor` ends for good, if it does: `Some` for a
    /// final token, and the epoch for one no longer held (it is gone, and
    /// its leases with it).
    pub fn token_end(&self, accessor: &Accessor) -> Option<SystemTime> {
        match self.held.iter().find(|t| &t.token.accessor == accessor) {
            Some(t) if t.final_expiry => Some(t.expires_at()),
            Some(_) => None,
            None => Some(SystemTime::UNIX_EPOCH),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the ServiceAccount token {path}: {reason}")]
    Jwt { path: PathBuf, reason: String },
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl AuthError {
    /// A mistake retrying cannot fix: the token file is missing or
    /// unreadable (`token_file`), or Vault's (`VaultError::permanent`).
    pub fn permanent(&self) -> Option<&'static str> {
        match self {
            AuthError::Jwt { .. } => Some("token_file"),
            AuthError::Vault(e) => e.permanent(),
        }
    }
}

pub struct AuthLoop<V = VaultClient> {
    pub client: V,
    pub kind: AuthMethod,
    pub mount: String,
    pub role: String,
    pub token_path: PathBuf,
    pub state: watch::Sender<AuthState>,
    /// Poked by a supervisor that got a 403 (the token may be revoked), or
    /// that needs a token outliving the current, final one.
    pub relogin: Arc<Notify>,
    pub store: Option<Arc<StateStore>>,
    pub telemetry: Arc<Telemetry>,
}

impl<V: Vault> AuthLoop<V> {
    pub fn read_jwt(path: &PathBuf) -> Result<SecretString, AuthError> {
        let fail = |reason: String| AuthError::Jwt { path: path.clone(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let jwt = text.trim();
        if jwt.is_empty() {
            return Err(fail("the file is empty".into()));
        }
        Ok(SecretString::from(jwt.to_string()))
    }

    pub async fn login(&self) -> Result<HeldToken, AuthError> {
        let jwt = Self::read_jwt(&self.token_path)?;
        let token = self.client.login(self.kind, &self.mount, &self.role, &jwt).await?;
        let renewable = token.renewable && !token.ttl.is_zero();
        Ok(HeldToken { granted_at: now(), ttl: token.ttl, final_expiry: !renewable, token })
    }

    /// Publishes a token as the current one.
    pub fn publish(&self, held: HeldToken) {
        let held = Arc::new(held);
        self.state.send_modify(|s| {
            s.held.retain(|t| t.token.accessor != held.token.accessor);
            s.held.push(held.clone());
            s.current = Some(held);
        });
        self.persist();
    }

    fn persist(&self) {
        let Some(store) = &self.store else { return };
        let records = self.state.borrow().held.iter().map(|t| t.record()).collect();
        if let Err(e) = store.set_tokens(records) {
            tracing::error!(event = "state_write_failed", error = %e, "recording tokens failed");
        }
    }

    fn replace_current(&self, update: impl FnOnce(&HeldToken) -> HeldToken) {
        self.state.send_modify(|s| {
            if let Some(cur) = s.current.take() {
                let new = Arc::new(update(&cur));
                for t in s.held.iter_mut() {
                    if t.token.accessor == new.token.accessor {
                        *t = new.clone();
                    }
                }
                s.current = Some(new);
            }
        });
        self.persist();
    }

    fn prune(&self) {
        let now = now();
        let pruned = self.state.send_if_modified(|s| {
            let before = s.held.len();
            s.held.retain(|t| t.expires_at() > now || s.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, t)));
            s.held.len() != before
        });
        if pruned {
            self.persist();
        }
    }

    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut sample = rand::random::<f64>();
        // A supervisor needs a token that outlives the final one.
        let mut login_now = false;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            self.prune();
            let current = self.state.borrow().current.clone();
            // Renewable: renewed at `renew_at` of its TTL. Final (batch, not
            // renewable, capped, refused): replaced by a new login at
            // `renew_at` of its life, never in a loop; a refused one (TTL 0)
            // at once.
            let due = current.as_ref().map(|t| renew_point(t.granted_at, t.ttl, &TOKEN_POLICY, sample));
            let needs_login = match (&current, due) {
                (Some(t), Some(at)) if t.final_expiry => login_now || now() >= at,
                (Some(_), _) => false,
                (None, _) => true,
            };
            if needs_login {
                login_now = false;
                match self.login().await {
                    Ok(held) => {
                        let (accessor, ttl, expires_at) = (&held.token.accessor, held.token.ttl, held.expires_at());
                        LoggedIn { accessor, ttl, renewable: !held.final_expiry, expires_at }.emit(&self.telemetry);
                        self.publish(held);
                        backoff.reset();
                        sample = rand::random();
                        continue;
                    }
                    Err(e) => {
                        let permanent = e.permanent();
                        LoginFailed { error: &e.to_string(), permanent }.emit(&self.telemetry);
                        // Bounded by what the token in hand has left, and
                        // every 1-2 s once it is dead: never a 30 s step. A
                        // role Vault does not have backs off further (to
                        // 5 min); a token file the kubelet is swapping, or a
                        // binding being set up, is named but retried at the
                        // normal pace.
                        let end = current.as_ref().map(|t| t.expires_at());
                        let step = match permanent {
                            Some("unknown_role" | "unknown_path") => {
                                backoff.next_delay_up_to(crate::timing::PERMANENT_MAX)
                            }
                            _ => backoff.next_delay(),
                        };
                        let delay = retry_delay(step, now(), end, rand::random());
                        if !self.sleep(delay, &cancel).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let (Some(current), Some(due)) = (current, due) else { continue };
            let wait = due.duration_since(now()).unwrap_or_default();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.relogin.notified() => {
                    if current.final_expiry {
                        login_now = true;
                    } else {
                        self.check_current(&current).await;
                    }
                    continue;
                }
                _ = tokio::time::sleep(wait) => {}
            }
            if current.final_expiry {
                // Due: the next turn logs in.
                continue;
            }
            match self.client.renew_self(&current.token.secret, current.token.ttl).await {
                Ok(r) => {
                    let capped = renewal_capped(current.token.ttl, r.ttl, &r.warnings) || !r.renewable;
                    let at = now();
                    let accessor = &current.token.accessor;
                    TokenRenewed { accessor, ttl: r.ttl, capped, expires_at: at + r.ttl }.emit(&self.telemetry);
                    self.replace_current(|t| HeldToken {
                        granted_at: at,
                        ttl: r.ttl,
                        final_expiry: capped,
                        token: t.token.clone(),
                    });
                    backoff.reset();
                    sample = rand::random();
                }
                Err(e) if e.is_permission_denied() => {
                    let error = e.to_string();
                    TokenRenewFailed { accessor: &current.token.accessor, error: &error, refused: true }
                        .emit(&self.telemetry);
                    self.replace_current(|t| HeldToken {
                        granted_at: now(),
                        ttl: Duration::ZERO,
                        final_expiry: true,
                        token: t.token.clone(),
                    });
                }
                Err(e) => {
                    let error = e.to_string();
                    TokenRenewFailed { accessor: &current.token.accessor, error: &error, refused: false }
                        .emit(&self.telemetry);
                    let delay = retry_delay(backoff.next_delay(), now(), Some(current.expires_at()), rand::random());
                    if !self.sleep(delay, &cancel).await {
                        return;
                    }
                }
            }
        }
    }

    /// After a supervisor saw a 403: is the current token still valid?
    async fn check_current(&self, current: &HeldToken) {
        match self.client.lookup_self(&current.token.secret).await {
            Err(e) if e.is_permission_denied() => {
                tracing::warn!(event = "token_refused", accessor = %current.token.accessor, "Vault no longer accepts the token; logging in again");
                self.replace_current(|t| HeldToken {
                    granted_at: now(),
                    ttl: Duration::ZERO,
                    final_expiry: true,
                    token: t.token.clone(),
                });
            }
            _ => {}
        }
    }

    /// A retry's wait: cut short when Vault answers again (another loop's
    /// request succeeded). False when cancelled.
    async fn sleep(&self, d: Duration, cancel: &CancellationToken) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
            _ = self.telemetry.vault_back() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vault::secret::SecretString;

    fn held(accessor: &str, expires_in: u64, final_expiry: bool) -> Arc<HeldToken> {
        Arc::new(HeldToken {
            token: Token {
                secret: SecretString::from("t".to_string()),
                accessor: accessor.into(),
                ttl: Duration::from_secs(expires_in),
                renewable: true,
                batch: false,
            },
            granted_at: SystemTime::UNIX_EPOCH,
            ttl: Duration::from_secs(expires_in),
            final_expiry,
        })
    }

    #[test]
    fn token_end_bounds_only_final_tokens() {
        let state = AuthState { current: None, held: vec![held("a", 100, false), held("b", 50, true)] };
        assert_eq!(state.token_end(&"a".into()), None);
        assert_eq!(state.token_end(&"b".into()), Some(SystemTime::UNIX_EPOCH + Duration::from_secs(50)));
        assert_eq!(state.token_end(&"gone".into()), Some(SystemTime::UNIX_EPOCH));
    }
}
