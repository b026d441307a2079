//! Wiring: the auth loop, one supervisor per secret, signals, and the
//! ordered teardown (stop scheduling, revoke leases in parallel, revoke-self
//! every token, within `shutdown.timeout`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;

use crate::auth::{AuthLoop, AuthState, HeldToken};
use crate::config::Config;
use crate::lease::{Event, LiveLease, Supervisor};
use crate::render::Renderer;
use crate::shutdown::Signals;
use crate::vault::{ClientConfig, VaultClient};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;

pub struct Options {
    pub once: bool,
}

pub fn client(config: &Config) -> anyhow::Result<VaultClient> {
    let ca = match &config.vault.ca_cert {
        Some(p) => Some(
            std::fs::read(p).with_context(|| format!("reading vault.ca_cert {}", p.display()))?,
        ),
        None => None,
    };
    if config.vault.tls_skip_verify {
        tracing::warn!(
            event = "tls_skip_verify",
            "vault.tls_skip_verify is true: Vault's certificate is NOT verified; never use this in production"
        );
    }
    Ok(VaultClient::new(ClientConfig {
        address: config.vault.address.clone(),
        ca_cert_pem: ca,
        namespace: config.vault.namespace.clone(),
        request_timeout: config.vault.request_timeout,
        tls_skip_verify: config.vault.tls_skip_verify,
        max_retries: 3,
    })?)
}

/// Runs the agent until a signal (or, with `once`, until every secret is
/// rendered). Returns the process exit code.
pub async fn run(
    config: Config,
    config_path: &Path,
    signals: Signals,
    opts: Options,
) -> anyhow::Result<i32> {
    let client = client(&config)?;
    let renderer = Arc::new(Renderer::compile(&config, config_path)?);
    let (auth_tx, auth_rx) = watch::channel(AuthState::default());
    let relogin = Arc::new(Notify::new());
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // Children of the signal token, so `--once` can stop them itself.
    let stop = signals.shutdown.child_token();

    let k8s = &config.auth.kubernetes;
    let auth = AuthLoop {
        client: client.clone(),
        mount: k8s.mount.clone(),
        role: k8s.role.clone(),
        token_path: k8s.token_path.clone(),
        state: auth_tx,
        relogin: relogin.clone(),
    };
    let auth_task = tokio::spawn(auth.run(stop.clone()));

    let mut supervisors = JoinSet::new();
    for (index, cfg) in config.secrets.iter().enumerate() {
        supervisors.spawn(
            Supervisor {
                index,
                cfg: cfg.clone(),
                client: client.clone(),
                auth: auth_rx.clone(),
                relogin: relogin.clone(),
                renderer: renderer.clone(),
                rerender: signals.rerender.clone(),
                events: events_tx.clone(),
                cancel: stop.clone(),
            }
            .run(),
        );
    }
    drop(events_tx);

    let names: HashSet<String> = config.secrets.iter().map(|s| s.name.clone()).collect();
    let mut pending = names.clone();
    let startup = tokio::time::sleep(config.startup_timeout);
    tokio::pin!(startup);
    let mut startup_done = false;
    let mut once_failed = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            event = events.recv() => match event {
                Some(Event::Rendered { secret }) => {
                    pending.remove(&secret);
                    if pending.is_empty() && !startup_done {
                        startup_done = true;
                        tracing::info!(event = "ready", secrets = names.len(), "every secret is rendered");
                        if opts.once {
                            stop.cancel();
                        }
                    }
                }
                None => break,
            },
            _ = &mut startup, if !startup_done => {
                startup_done = true;
                let missing: Vec<&String> = pending.iter().collect();
                tracing::error!(event = "startup_timeout", missing = ?missing, timeout_secs = config.startup_timeout.as_secs(), "not every secret was rendered within startup_timeout");
                if opts.once {
                    once_failed = true;
                    stop.cancel();
                }
            }
        }
    }

    // Teardown: supervisors stop scheduling and report what is alive.
    stop.cancel();
    let mut live: Vec<LiveLease> = Vec::new();
    while let Some(result) = supervisors.join_next().await {
        match result {
            Ok(leases) => live.extend(leases),
            Err(e) => {
                tracing::error!(event = "supervisor_failed", error = %e, "a lease supervisor stopped abnormally")
            }
        }
    }
    let _ = auth_task.await;
    let auth_state = auth_rx.borrow().clone();

    if opts.once {
        if once_failed {
            return Ok(EXIT_FAILURE);
        }
        tracing::info!(
            event = "once_done",
            leases = live.len(),
            "rendered every secret; leaving leases alive for the sidecar"
        );
        return Ok(EXIT_OK);
    }
    if !config.shutdown.revoke {
        tracing::info!(
            event = "shutdown_done",
            leases = live.len(),
            "stopped without revoking (shutdown.revoke: false)"
        );
        return Ok(EXIT_OK);
    }
    let timeout = config.shutdown.timeout;
    let maybe_alive =
        match tokio::time::timeout(timeout, revoke_all(&client, &live, &auth_state)).await {
            Ok(left) => left,
            Err(_) => {
                tracing::error!(
                    event = "shutdown_timeout",
                    timeout_secs = timeout.as_secs(),
                    "revocation did not finish within shutdown.timeout"
                );
                live.clone()
            }
        };
    if maybe_alive.is_empty() {
        tracing::info!(
            event = "shutdown_done",
            revoked = live.len(),
            "every lease revoked; exiting"
        );
        Ok(EXIT_OK)
    } else {
        for l in &maybe_alive {
            tracing::error!(event = "lease_left_alive", secret = %l.secret, lease = %l.lease_id, "lease may still be alive (it ends at its TTL)");
        }
        Ok(EXIT_FAILURE)
    }
}

/// Revokes every lease in parallel, then revoke-self every token still held
/// (which also revokes any lease it created: the fallback when the policy
/// lacks `sys/leases/revoke`). Returns the leases that may still be alive.
async fn revoke_all(client: &VaultClient, live: &[LiveLease], auth: &AuthState) -> Vec<LiveLease> {
    let current = auth.current.clone();
    let mut tasks = JoinSet::new();
    if let Some(token) = &current {
        for lease in live.iter().cloned() {
            let client = client.clone();
            let secret = token.token.secret.clone();
            tasks.spawn(async move {
                let result = client.revoke_lease(&secret, &lease.lease_id).await;
                (lease, result)
            });
        }
    }
    let mut failed: Vec<LiveLease> = if current.is_none() {
        live.to_vec()
    } else {
        Vec::new()
    };
    while let Some(joined) = tasks.join_next().await {
        let Ok((lease, result)) = joined else {
            continue;
        };
        match result {
            Ok(()) => {
                tracing::info!(event = "revoked", secret = %lease.secret, lease = %lease.lease_id, "revoked lease")
            }
            Err(e) => {
                tracing::warn!(event = "revoke_failed", secret = %lease.secret, lease = %lease.lease_id, error = %e, "revoking lease failed; its token's revocation is the fallback");
                failed.push(lease);
            }
        }
    }
    let revoked_tokens = revoke_tokens(client, &auth.held).await;
    failed.retain(|l| !revoked_tokens.contains(&l.token_accessor));
    failed
}

async fn revoke_tokens(client: &VaultClient, tokens: &[Arc<HeldToken>]) -> HashSet<String> {
    let mut tasks = JoinSet::new();
    for t in tokens.iter().cloned() {
        let client = client.clone();
        tasks.spawn(async move {
            let result = client.revoke_self(&t.token.secret).await;
            (t.token.accessor.clone(), result)
        });
    }
    let mut revoked = HashSet::new();
    while let Some(joined) = tasks.join_next().await {
        let Ok((accessor, result)) = joined else {
            continue;
        };
        match result {
            Ok(()) => {
                tracing::info!(event = "token_revoked", accessor = %accessor, "revoked Vault token");
                revoked.insert(accessor);
            }
            // An expired token is gone already, and its leases with it.
            Err(e) if e.is_permission_denied() => {
                revoked.insert(accessor);
            }
            Err(e) => {
                tracing::warn!(event = "token_revoke_failed", accessor = %accessor, error = %e, "revoking Vault token failed")
            }
        }
    }
    revoked
}
