//! Wiring: state and adoption, the auth loop, one supervisor per secret,
//! reload on SIGHUP or config change (the diff is `reload::diff`), and the
//! call into the ordered teardown (`teardown`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthLoop, AuthState};
use crate::config::{Config, Env, SecretConfig};
use crate::lease::{Event, Held, LiveLease, SecretSpec, Supervisor};
use crate::render::Renderer;
use crate::shutdown::Signals;
use crate::state::StateStore;
use crate::teardown::{self, revoke_leases};
use crate::telemetry::Telemetry;
use crate::vault::{ClientConfig, Vault, VaultClient};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;

/// Events closer together than this are one config change.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

pub struct Options {
    pub once: bool,
    /// Where `VAULT_*` overrides come from when the config is reloaded.
    pub env: Env<'static>,
}

pub fn client(config: &Config) -> anyhow::Result<VaultClient> {
    let ca = match (&config.vault.ca_cert, &config.vault.ca_cert_pem) {
        (Some(p), _) => Some(std::fs::read(p).with_context(|| format!("reading vault.ca_cert {}", p.display()))?),
        (None, Some(pem)) => Some(pem.clone().into_bytes()),
        (None, None) => None,
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

struct Running {
    cfg: SecretConfig,
    cancel: CancellationToken,
    spec: watch::Sender<Arc<SecretSpec>>,
    handle: JoinHandle<Vec<LiveLease>>,
}

/// The running agent's moving parts.
struct Agent<V> {
    config: Config,
    config_path: PathBuf,
    /// The config text plus the template files it names, as last loaded:
    /// a file event reloads only when this changed.
    fingerprint: String,
    env: Env<'static>,
    client: V,
    auth: watch::Receiver<AuthState>,
    relogin: Arc<Notify>,
    events: mpsc::UnboundedSender<Event>,
    store: Option<Arc<StateStore>>,
    stop: CancellationToken,
    running: HashMap<String, Running>,
    /// Leases of a secret whose source (path, method, body) a reload
    /// changed: revoked once the new credentials are rendered.
    replacing: HashMap<String, Vec<LiveLease>>,
    telemetry: Arc<Telemetry>,
}

/// The state key of the leases a changed secret is replacing (secret names
/// are `[a-z0-9_-]`, so it cannot clash; at adoption it is "not configured",
/// so its leases are revoked).
fn replaced_key(name: &str) -> String {
    format!("{name}@replaced")
}

impl<V: Vault> Agent<V> {
    fn start(&mut self, index: usize, cfg: SecretConfig, renderer: Arc<Renderer>, adopted: Option<Held>) {
        let cancel = self.stop.child_token();
        let files: Vec<PathBuf> = cfg.files.iter().map(|f| f.path.clone()).collect();
        self.telemetry.declare(&cfg.name, &cfg.path, &files);
        let proxy = cfg.proxy.clone().map(|p| {
            let (feed, creds) = crate::proxy::Feed::new(&p, self.telemetry.proxy_stats(&cfg.name));
            tokio::spawn(crate::proxy::serve(cfg.name.clone(), p, feed.clone(), creds, cancel.clone()));
            feed
        });
        let (spec_tx, spec_rx) = watch::channel(Arc::new(SecretSpec { index, cfg: cfg.clone(), renderer, proxy }));
        let supervisor = Supervisor {
            spec: spec_rx,
            client: self.client.clone(),
            auth: self.auth.clone(),
            relogin: self.relogin.clone(),
            events: self.events.clone(),
            store: self.store.clone(),
            adopted,
            telemetry: self.telemetry.clone(),
            cancel: cancel.clone(),
        };
        let handle = tokio::spawn(supervisor.run());
        self.running.insert(cfg.name.clone(), Running { cfg, cancel, spec: spec_tx, handle });
    }

    /// Stops a secret's supervisor keeping its files and leases, for a new
    /// one to replace: the leases wait in `replacing` (and in the state file
    /// under `replaced_key`) for the new credentials.
    async fn retire(&mut self, name: &str) {
        let Some(r) = self.running.remove(name) else { return };
        let record = self.store.as_ref().and_then(|s| s.snapshot().secrets.get(name).cloned());
        r.cancel.cancel();
        let leases = r.handle.await.unwrap_or_default();
        if let (Some(store), Some(record)) = (&self.store, record) {
            let mut old = record;
            old.retired.extend(old.current.take());
            if let Err(e) = store.set_secret(&replaced_key(name), old) {
                tracing::error!(event = "state_write_failed", secret = %name, error = %e, "recording the replaced leases failed");
            }
        }
        tracing::info!(event = "source_changed", secret = %name, leases = leases.len(), "the secret's path changed: issuing new credentials, then revoking the old");
        self.replacing.entry(name.to_string()).or_default().extend(leases);
    }

    /// New credentials of `name` are in its files: the leases it replaces go.
    async fn on_rendered(&mut self, name: &str) {
        let Some(old) = self.replacing.remove(name) else { return };
        let token = self.auth.borrow().current.clone();
        let failed = revoke_leases(&self.client, &old, token.as_deref(), &self.telemetry).await;
        if failed.is_empty() {
            if let Some(store) = &self.store {
                let _ = store.remove_secret(&replaced_key(name));
            }
        } else {
            self.replacing.insert(name.to_string(), failed);
        }
    }

    /// Stops a secret's supervisor, revokes its leases, removes its files.
    async fn remove(&mut self, name: &str) {
        let Some(r) = self.running.remove(name) else { return };
        r.cancel.cancel();
        let leases = r.handle.await.unwrap_or_default();
        let token = self.auth.borrow().current.clone();
        let failed = revoke_leases(&self.client, &leases, token.as_deref(), &self.telemetry).await;
        for f in &r.cfg.files {
            if let Err(e) = std::fs::remove_file(&f.path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(event = "remove_failed", secret = %name, file = %f.path.display(), error = %e, "removing a file of a removed secret failed");
            }
        }
        if failed.is_empty()
            && let Some(store) = &self.store
        {
            let _ = store.remove_secret(name);
        }
        self.telemetry.remove(name);
        tracing::info!(event = "secret_removed", secret = %name, revoked = leases.len() - failed.len(), "secret removed from the configuration");
    }

    /// Reloads the config: changed templates re-render from the credentials
    /// in hand, new secrets are issued, removed ones revoked. An invalid
    /// config is logged and the running one kept. `force` re-renders even
    /// when the file is unchanged (SIGHUP).
    async fn reload(&mut self, force: bool) {
        let mut added = 0usize;
        let text = match crate::config::read_source(&self.config_path, self.env) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(event = "config_rejected", error = %e, "cannot read the config; keeping the running one");
                return;
            }
        };
        if !force && crate::reload::fingerprint(&text, &self.config) == self.fingerprint {
            tracing::debug!(event = "config_unchanged", "a file event, but the config and its templates are unchanged");
            return;
        }
        let new = match Config::parse(&text, &self.config_path, self.env)
            .and_then(|c| Renderer::compile(&c, &self.config_path).map(|r| (c, Arc::new(r))))
        {
            Ok(parsed) => parsed,
            Err(e) => {
                self.telemetry.reloaded(false);
                tracing::error!(event = "config_rejected", error = %e, "the new config is invalid; keeping the running one");
                return;
            }
        };
        let (config, renderer) = new;
        if config.vault != self.config.vault || config.auth != self.config.auth {
            tracing::warn!(event = "restart_needed", "changes to `vault` or `auth` take effect after a restart");
        }
        let running: Vec<&SecretConfig> = self.running.values().map(|r| &r.cfg).collect();
        let diff = crate::reload::diff(&running, &config);
        for name in &diff.removed {
            self.remove(name).await;
        }
        // A secret read from somewhere else now: a re-issue. The new
        // supervisor issues and renders; the old leases are revoked after
        // that (`on_rendered`), and recorded meanwhile.
        for name in &diff.source_changed {
            self.retire(name).await;
        }
        for (index, cfg) in config.secrets.iter().enumerate() {
            match self.running.get_mut(&cfg.name) {
                Some(r) => {
                    for gone in r.cfg.files.iter().filter(|f| !cfg.files.iter().any(|n| n.path == f.path)) {
                        let _ = std::fs::remove_file(&gone.path);
                    }
                    let files: Vec<PathBuf> = cfg.files.iter().map(|f| f.path.clone()).collect();
                    self.telemetry.declare(&cfg.name, &cfg.path, &files);
                    if cfg.proxy != r.cfg.proxy {
                        tracing::warn!(event = "restart_needed", secret = %cfg.name, "changes to `proxy` take effect after a restart");
                    }
                    r.cfg = cfg.clone();
                    let proxy = r.spec.borrow().proxy.clone();
                    let _ = r.spec.send(Arc::new(SecretSpec {
                        index,
                        cfg: cfg.clone(),
                        renderer: renderer.clone(),
                        proxy,
                    }));
                }
                None => {
                    added += 1;
                    self.start(index, cfg.clone(), renderer.clone(), None);
                }
            }
        }
        tracing::info!(event = "config_reloaded", secrets = config.secrets.len(), added, "configuration reloaded");
        self.fingerprint = crate::reload::fingerprint(&text, &config);
        self.config = config;
    }
}

fn open_store(config: &Config) -> anyhow::Result<Option<Arc<StateStore>>> {
    let Some(dir) = &config.state_dir else { return Ok(None) };
    let (store, warning) = StateStore::open(dir)?;
    if let Some(w) = warning {
        tracing::warn!(event = "state_set_aside", "{w}");
    }
    Ok(Some(Arc::new(store)))
}

/// Runs the agent until a signal (or, with `once`, until every secret is
/// rendered). Returns the process exit code.
pub async fn run(config: Config, config_path: &Path, signals: Signals, opts: Options) -> anyhow::Result<i32> {
    let telemetry = Telemetry::new();
    // Up before the first login, so probes answer (503) while credentials are obtained.
    let listener = tokio::net::TcpListener::bind(&config.telemetry.listen)
        .await
        .with_context(|| format!("telemetry.listen {}: cannot listen", config.telemetry.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(event = "telemetry_listening", addr = %addr, "serving /healthz, /readyz, /metrics and /v1/status");
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(crate::telemetry::server::serve(listener, telemetry.clone(), server_stop.clone()));
    let code = match client(&config) {
        Ok(c) => {
            let c = c.with_observer(telemetry.clone());
            // The watcher lives until the agent returns.
            let (_watcher, file_events) = watch_files(&config, config_path, opts.once);
            run_with(c, config, config_path, signals, opts, telemetry, file_events).await
        }
        Err(e) => Err(e),
    };
    server_stop.cancel();
    let _ = server.await;
    code
}

/// A watcher of the config and its template files (none for `--once`: it
/// exits soon anyway); keep the watcher while events are wanted.
fn watch_files(
    config: &Config,
    config_path: &Path,
    once: bool,
) -> (Option<notify::RecommendedWatcher>, mpsc::UnboundedReceiver<()>) {
    if once || crate::config::env_source(config_path).is_some() {
        return (None, mpsc::unbounded_channel().1);
    }
    let templates: Vec<PathBuf> =
        config.secrets.iter().flat_map(|s| &s.files).filter_map(|f| f.template_file.clone()).collect();
    match crate::reload::watch(config_path, &templates) {
        Ok((w, rx)) => (Some(w), rx),
        Err(e) => {
            tracing::warn!(event = "watch_failed", error = %e, "cannot watch the config file; SIGHUP still reloads");
            (None, mpsc::unbounded_channel().1)
        }
    }
}

/// The agent with `client` (a `VaultClient` but for in-process tests);
/// `file_events` says the config or a template file changed.
pub async fn run_with<V: Vault>(
    client: V,
    config: Config,
    config_path: &Path,
    signals: Signals,
    opts: Options,
    telemetry: Arc<Telemetry>,
    mut file_events: mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<i32> {
    let renderer = Arc::new(Renderer::compile(&config, config_path)?);
    for w in crate::check::chown_warnings(&config) {
        tracing::warn!(event = "cannot_chown", problem = %w, "a file's owner cannot be set");
    }
    let store = open_store(&config)?;
    let snapshot = store.as_ref().map(|s| s.snapshot()).unwrap_or_default();

    let adopted_tokens = crate::adopt::tokens(&client, &snapshot.tokens).await;
    let current = adopted_tokens.iter().rev().find(|t| !t.final_expiry).or(adopted_tokens.last()).cloned();
    let (auth_tx, auth_rx) = watch::channel(AuthState { current, held: adopted_tokens });
    let relogin = Arc::new(Notify::new());
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // Children of the signal token, so `--once` can stop them itself.
    let stop = signals.shutdown.child_token();

    let login = config.auth.login();
    let auth = AuthLoop {
        client: client.clone(),
        kind: login.kind,
        mount: login.mount,
        role: login.role,
        token_path: login.token_path,
        state: auth_tx,
        relogin: relogin.clone(),
        store: store.clone(),
        telemetry: telemetry.clone(),
    };
    let mut auth_task = tokio::spawn(auth.run(stop.clone()));

    // startup_timeout counts from here: the first token and adoption too.
    let startup = tokio::time::sleep(config.startup_timeout);
    tokio::pin!(startup);
    let mut startup_done = false;
    let mut once_failed = false;
    let mut adopted = crate::adopt::Leases::default();
    if !snapshot.secrets.is_empty() {
        let mut waiting = auth_rx.clone();
        let token = tokio::select! {
            t = waiting.wait_for(|s| s.current.is_some()) => t.ok().and_then(|s| s.current.clone()),
            _ = stop.cancelled() => None,
            // --once gives up; the sidecar keeps waiting (its startup probe
            // fails meanwhile), as issuing now would make a second set.
            _ = &mut startup, if opts.once => {
                startup_done = true;
                once_failed = true;
                tracing::error!(event = "startup_timeout", timeout_secs = config.startup_timeout.as_secs(), "no Vault token within startup_timeout to adopt the recorded leases with");
                stop.cancel();
                None
            }
        };
        if let Some(token) = token {
            adopted = crate::adopt::leases(&client, &token.token.secret, &snapshot, &config).await;
            let failed = revoke_leases(&client, &adopted.revoke, Some(&token), &telemetry).await;
            if failed.is_empty()
                && let Some(store) = &store
            {
                for name in &adopted.removed {
                    let _ = store.remove_secret(name);
                }
            }
        }
    }

    let config_text = crate::config::read_source(config_path, opts.env).unwrap_or_default();
    let fingerprint = crate::reload::fingerprint(&config_text, &config);
    let mut agent = Agent {
        config: config.clone(),
        config_path: config_path.to_path_buf(),
        fingerprint,
        env: opts.env,
        client: client.clone(),
        auth: auth_rx.clone(),
        relogin,
        events: events_tx,
        store: store.clone(),
        stop: stop.clone(),
        running: HashMap::new(),
        replacing: HashMap::new(),
        telemetry: telemetry.clone(),
    };
    for (index, cfg) in config.secrets.iter().enumerate() {
        let held = adopted.adopted.remove(&cfg.name);
        agent.start(index, cfg.clone(), renderer.clone(), held);
    }

    let mut reload_signal = signals.reload.clone();

    let mut pending: HashSet<String> = config.secrets.iter().map(|s| s.name.clone()).collect();
    // A file event arms the reload for RELOAD_DEBOUNCE later (a ConfigMap
    // swap is several events); the loop keeps serving signals meanwhile.
    let mut reload_at: Option<tokio::time::Instant> = None;
    loop {
        let reload_due = reload_at.unwrap_or_else(|| crate::clock::instant() + Duration::from_secs(3600));
        tokio::select! {
            _ = stop.cancelled() => break,
            event = events.recv() => match event {
                Some(Event::Rendered { secret }) => {
                    agent.on_rendered(&secret).await;
                    pending.remove(&secret);
                    if pending.is_empty() && !startup_done {
                        startup_done = true;
                        tracing::info!(event = "ready", secrets = agent.running.len(), "every secret is rendered");
                        if opts.once {
                            stop.cancel();
                        }
                    }
                }
                None => break,
            },
            _ = &mut startup, if !startup_done => {
                startup_done = true;
                let missing = pending.iter().cloned().collect::<Vec<_>>().join(", ");
                tracing::error!(event = "startup_timeout", missing = %missing, timeout_secs = config.startup_timeout.as_secs(), "not every secret was rendered within startup_timeout");
                if opts.once {
                    once_failed = true;
                    stop.cancel();
                }
            }
            changed = reload_signal.changed() => {
                if changed.is_ok() {
                    agent.reload(true).await;
                }
            }
            Some(()) = file_events.recv() => {
                reload_at.get_or_insert_with(|| crate::clock::instant() + RELOAD_DEBOUNCE);
            }
            _ = tokio::time::sleep_until(reload_due), if reload_at.is_some() => {
                reload_at = None;
                agent.reload(false).await;
            }
        }
    }

    // Teardown, all within one deadline (shutdown.timeout): see `teardown`.
    let deadline = crate::clock::instant() + config.shutdown.timeout;
    let grace = deadline - config.shutdown.timeout / 2;
    stop.cancel();
    let mut live: Vec<LiveLease> = agent.replacing.drain().flat_map(|(_, l)| l).collect();
    let handles = agent.running.drain().map(|(name, r)| (name, r.handle)).collect();
    live.extend(teardown::stop_supervisors(handles, grace, store.as_deref()).await);
    if tokio::time::timeout_at(grace, &mut auth_task).await.is_err() {
        auth_task.abort();
    }
    let auth_state = auth_rx.borrow().clone();

    if opts.once {
        if once_failed {
            return Ok(EXIT_FAILURE);
        }
        tracing::info!(
            event = "once_done",
            leases = live.len(),
            "rendered every secret; leases stay alive for the sidecar to adopt"
        );
        return Ok(EXIT_OK);
    }
    if !config.shutdown.revoke {
        tracing::info!(
            event = "shutdown_done",
            leases = live.len(),
            "stopped without revoking (shutdown.revoke: false); state kept"
        );
        return Ok(EXIT_OK);
    }
    Ok(teardown::revoke_and_exit(&client, &live, &auth_state, &telemetry, store.as_deref(), deadline).await)
}
