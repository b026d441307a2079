//! Wiring: state and adoption (`start`), the auth loop, one supervisor per
//! secret, the event loop (`Agent::serve`: rendered secrets, the startup
//! deadline, reload on SIGHUP or config change, whose diff is
//! `reload::diff`), then the hand-over to the teardown, which owns
//! everything from the stop token to the `Outcome`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthLoop, AuthState};
use crate::lease::{Event, Held, LiveLease, SecretSpec, Supervisor};
use crate::render::Renderer;
use crate::signals::Signals;
use crate::state::{StateError, StateStore};
use crate::teardown::{Outcome, Teardown};
use crate::telemetry::Telemetry;
use crate::telemetry::events::{ConfigRejected, ConfigReloaded, Event as _};
use config::{Config, ConfigError, Env, SecretConfig};
use vault::{AuthMethod, ClientConfig, Vault, VaultClient, VaultError};

/// Events closer together than this are one config change.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

pub struct Options {
    pub once: bool,
    /// Where `VAULT_*` overrides come from when the config is reloaded.
    pub env: Env<'static>,
}

/// Why the agent could not start (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("telemetry.listen {addr}: cannot listen: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("reading vault.ca_cert {path}: {source}")]
    CaCert { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// A config as read once at start: its text (what a reload compares
/// with), the typed config and its compiled templates.
pub struct Loaded {
    pub text: String,
    pub config: Config,
    pub renderer: Renderer,
}

impl Loaded {
    pub fn read(path: &Path, env: Env) -> Result<Loaded, ConfigError> {
        let text = config::read_source(path, env)?;
        Self::parse(text, path, env)
    }

    pub fn parse(text: String, path: &Path, env: Env) -> Result<Loaded, ConfigError> {
        let config = Config::parse(&text, path, env)?;
        let renderer = Renderer::compile(&config, path)?;
        Ok(Loaded { text, config, renderer })
    }
}

pub fn client(config: &Config) -> Result<VaultClient, StartError> {
    let ca = match (&config.vault.ca_cert, &config.vault.ca_cert_pem) {
        (Some(p), _) => Some(std::fs::read(p).map_err(|source| StartError::CaCert { path: p.clone(), source })?),
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
        redirect_hosts: config.vault.redirect_hosts.clone(),
    })?)
}

fn auth_method(kind: config::AuthKind) -> AuthMethod {
    match kind {
        config::AuthKind::Kubernetes => AuthMethod::Kubernetes,
        config::AuthKind::Jwt => AuthMethod::Jwt,
    }
}

struct Running {
    /// Boxed: the map's spare slots then cost a pointer, not a config.
    cfg: Box<SecretConfig>,
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
    /// The proxies, joined by the teardown.
    tasks: TaskTracker,
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
    fn start(&mut self, cfg: SecretConfig, renderer: &Renderer, adopted: Option<Held>) {
        let cancel = self.stop.child_token();
        let files: Vec<PathBuf> = cfg.files.iter().map(|f| f.path.clone()).collect();
        self.telemetry.declare(&cfg.name, &cfg.path, &files);
        let proxy = cfg.proxy.clone().map(|p| {
            let (feed, creds) = pgproxy::Feed::new(&p, self.telemetry.proxy_stats(&cfg.name));
            self.tasks.spawn(pgproxy::serve(cfg.name.clone(), p, feed.clone(), creds, cancel.clone()));
            feed
        });
        let templates = renderer.templates(&cfg.name);
        let (spec_tx, spec_rx) = watch::channel(Arc::new(SecretSpec { cfg: cfg.clone(), templates, proxy }));
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
            request_timeout: self.config.vault.request_timeout,
            slow_retry: false,
        };
        let handle = tokio::spawn(supervisor.run());
        self.running.insert(cfg.name.clone(), Running { cfg: Box::new(cfg), cancel, spec: spec_tx, handle });
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
        let failed = crate::revoke::leases(&self.client, &old, token.as_deref(), &self.telemetry).await;
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
        let failed = crate::revoke::leases(&self.client, &leases, token.as_deref(), &self.telemetry).await;
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
        let text = match config::read_source(&self.config_path, self.env) {
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
        let loaded = match Loaded::parse(text, &self.config_path, self.env) {
            Ok(loaded) => loaded,
            Err(e) => {
                ConfigRejected { error: &e.to_string() }.emit(&self.telemetry);
                return;
            }
        };
        self.apply(loaded).await;
    }

    /// Applies a new, valid config to the running supervisors.
    async fn apply(&mut self, Loaded { text, config, renderer }: Loaded) {
        if config.vault != self.config.vault || config.auth != self.config.auth {
            tracing::warn!(event = "restart_needed", "changes to `vault` or `auth` take effect after a restart");
        }
        let running: Vec<&SecretConfig> = self.running.values().map(|r| &*r.cfg).collect();
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
        let mut added = 0usize;
        for cfg in &config.secrets {
            let Some(r) = self.running.get_mut(&cfg.name) else {
                added += 1;
                self.start(cfg.clone(), &renderer, None);
                continue;
            };
            for gone in r.cfg.files.iter().filter(|f| !cfg.files.iter().any(|n| n.path == f.path)) {
                let _ = std::fs::remove_file(&gone.path);
            }
            let files: Vec<PathBuf> = cfg.files.iter().map(|f| f.path.clone()).collect();
            self.telemetry.declare(&cfg.name, &cfg.path, &files);
            if cfg.proxy != r.cfg.proxy {
                tracing::warn!(event = "restart_needed", secret = %cfg.name, "changes to `proxy` take effect after a restart");
            }
            *r.cfg = cfg.clone();
            let proxy = r.spec.borrow().proxy.clone();
            let _ =
                r.spec.send(Arc::new(SecretSpec { cfg: cfg.clone(), templates: renderer.templates(&cfg.name), proxy }));
        }
        ConfigReloaded { secrets: config.secrets.len(), added }.emit(&self.telemetry);
        self.fingerprint = crate::reload::fingerprint(&text, &config);
        self.config = config;
    }

    /// The event loop, until the stop token is cancelled (a signal, or
    /// `--once` done). Returns, for `--once`, whether every secret rendered.
    async fn serve(
        &mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut file_events: mpsc::UnboundedReceiver<()>,
        mut reload_signal: watch::Receiver<u64>,
        mut startup: Startup,
    ) -> bool {
        let stop = self.stop.clone();
        let mut pending: HashSet<String> = self.config.secrets.iter().map(|s| s.name.clone()).collect();
        // A file event arms the reload for RELOAD_DEBOUNCE later (a ConfigMap
        // swap is several events); the loop keeps serving signals meanwhile.
        let mut reload_at: Option<tokio::time::Instant> = None;
        loop {
            let reload_due = reload_at.unwrap_or_else(|| crate::clock::instant() + Duration::from_secs(3600));
            tokio::select! {
                _ = stop.cancelled() => break,
                event = events.recv() => match event {
                    Some(Event::Rendered { secret }) => {
                        self.on_rendered(&secret).await;
                        pending.remove(&secret);
                        if pending.is_empty() && !startup.done {
                            startup.done = true;
                            tracing::info!(event = "ready", secrets = self.running.len(), "every secret is rendered");
                            if startup.once {
                                stop.cancel();
                            }
                        }
                    }
                    None => break,
                },
                _ = &mut startup.deadline, if !startup.done => {
                    startup.done = true;
                    let missing = pending.iter().cloned().collect::<Vec<_>>().join(", ");
                    tracing::error!(event = "startup_timeout", missing = %missing, timeout_secs = self.config.startup_timeout.as_secs(), "not every secret was rendered within startup_timeout");
                    if startup.once {
                        startup.failed = true;
                        stop.cancel();
                    }
                }
                changed = reload_signal.changed() => {
                    if changed.is_ok() {
                        self.reload(true).await;
                    }
                }
                Some(()) = file_events.recv() => {
                    reload_at.get_or_insert_with(|| crate::clock::instant() + RELOAD_DEBOUNCE);
                }
                _ = tokio::time::sleep_until(reload_due), if reload_at.is_some() => {
                    reload_at = None;
                    self.reload(false).await;
                }
            }
        }
        !startup.failed
    }

    /// Everything the teardown needs, the agent's own parts taken apart.
    fn into_teardown(mut self, auth_task: JoinHandle<()>, once: bool, rendered: bool) -> Teardown<V> {
        Teardown {
            client: self.client,
            stop: self.stop,
            supervisors: self.running.drain().map(|(name, r)| (name, r.handle)).collect(),
            tasks: self.tasks,
            auth_task,
            auth: self.auth,
            orphans: self.replacing.drain().flat_map(|(_, l)| l).collect(),
            telemetry: self.telemetry,
            store: self.store,
            shutdown: self.config.shutdown.clone(),
            once: once.then_some(rendered),
        }
    }
}

/// The startup deadline (`startup_timeout`, from the first login on).
struct Startup {
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    done: bool,
    failed: bool,
    once: bool,
}

fn open_store(config: &Config) -> Result<Option<Arc<StateStore>>, StateError> {
    let Some(dir) = &config.state_dir else { return Ok(None) };
    let (store, warning) = StateStore::open(dir)?;
    if let Some(w) = warning {
        tracing::warn!(event = "state_set_aside", "{w}");
    }
    Ok(Some(Arc::new(store)))
}

/// Runs the agent until a signal (or, with `once`, until every secret is
/// rendered).
pub async fn run(loaded: Loaded, config_path: &Path, signals: Signals, opts: Options) -> Result<Outcome, StartError> {
    let telemetry = Telemetry::new();
    let listen = loaded.config.telemetry.listen;
    // Up before the first login, so probes answer (503) while credentials are obtained.
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|source| StartError::Listen { addr: listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: listen, source })?;
    tracing::info!(event = "telemetry_listening", addr = %addr, "serving /healthz, /readyz, /metrics and /v1/status");
    let server_stop = CancellationToken::new();
    let access = loaded.config.telemetry.status;
    let server =
        tokio::spawn(crate::telemetry::server::serve(listener, telemetry.clone(), access, server_stop.clone()));
    let outcome = match client(&loaded.config) {
        Ok(c) => {
            let c = c.with_observer(telemetry.clone());
            // The watcher lives until the agent returns.
            let (_watcher, file_events) = watch_files(&loaded.config, config_path, opts.once);
            run_with(c, loaded, config_path, signals, opts, telemetry, file_events).await
        }
        Err(e) => Err(e),
    };
    server_stop.cancel();
    let _ = server.await;
    outcome
}

/// A watcher of the config and its template files (none for `--once`: it
/// exits soon anyway); keep the watcher while events are wanted.
fn watch_files(
    config: &Config,
    config_path: &Path,
    once: bool,
) -> (Option<notify::RecommendedWatcher>, mpsc::UnboundedReceiver<()>) {
    if once || config::env_source(config_path).is_some() {
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
    loaded: Loaded,
    config_path: &Path,
    signals: Signals,
    opts: Options,
    telemetry: Arc<Telemetry>,
    file_events: mpsc::UnboundedReceiver<()>,
) -> Result<Outcome, StartError> {
    for w in crate::files::chown_warnings(&loaded.config) {
        tracing::warn!(event = "cannot_chown", problem = %w, "a file's owner cannot be set");
    }
    let store = open_store(&loaded.config)?;
    let snapshot = store.as_ref().map(|s| s.snapshot()).unwrap_or_default();

    let adopted_tokens = crate::adopt::tokens(&client, &snapshot.tokens).await;
    let current = adopted_tokens.iter().rev().find(|t| !t.final_expiry).or(adopted_tokens.last()).cloned();
    let (auth_tx, auth_rx) = watch::channel(AuthState { current, held: adopted_tokens });
    let relogin = Arc::new(Notify::new());
    let (events_tx, events) = mpsc::unbounded_channel();
    // Children of the signal token, so `--once` can stop them itself.
    let stop = signals.shutdown.child_token();

    let login = loaded.config.auth.login();
    let auth = AuthLoop {
        client: client.clone(),
        kind: auth_method(login.kind),
        mount: login.mount,
        role: login.role,
        token_path: login.token_path,
        state: auth_tx,
        relogin: relogin.clone(),
        store: store.clone(),
        telemetry: telemetry.clone(),
    };
    let auth_task = tokio::spawn(auth.run(stop.clone()));

    // startup_timeout counts from here: the first token and adoption too.
    let mut startup = Startup {
        deadline: Box::pin(tokio::time::sleep(loaded.config.startup_timeout)),
        done: false,
        failed: false,
        once: opts.once,
    };
    let adopted = adopt(&client, &auth_rx, &snapshot, &loaded.config, &store, &telemetry, &stop, &mut startup).await;

    let fingerprint = crate::reload::fingerprint(&loaded.text, &loaded.config);
    let Loaded { config, renderer, .. } = loaded;
    let mut agent = Agent {
        config: config.clone(),
        config_path: config_path.to_path_buf(),
        fingerprint,
        env: opts.env,
        client,
        auth: auth_rx,
        relogin,
        events: events_tx,
        store,
        stop,
        running: HashMap::new(),
        tasks: TaskTracker::new(),
        replacing: HashMap::new(),
        telemetry,
    };
    let mut adopted = adopted;
    for cfg in &config.secrets {
        let held = adopted.adopted.remove(&cfg.name);
        agent.start(cfg.clone(), &renderer, held);
    }
    let rendered = agent.serve(events, file_events, signals.reload.clone(), startup).await;
    Ok(agent.into_teardown(auth_task, opts.once, rendered).run().await)
}

/// Adopts the recorded leases once a token is there (the sidecar waits for
/// one: issuing now would make a second set; `--once` gives up at the
/// startup deadline), revoking those no longer wanted.
#[allow(clippy::too_many_arguments)]
async fn adopt<V: Vault>(
    client: &V,
    auth: &watch::Receiver<AuthState>,
    snapshot: &crate::state::State,
    config: &Config,
    store: &Option<Arc<StateStore>>,
    telemetry: &Telemetry,
    stop: &CancellationToken,
    startup: &mut Startup,
) -> crate::adopt::Leases {
    if snapshot.secrets.is_empty() {
        return crate::adopt::Leases::default();
    }
    let mut waiting = auth.clone();
    let token = tokio::select! {
        t = waiting.wait_for(|s| s.current.is_some()) => t.ok().and_then(|s| s.current.clone()),
        _ = stop.cancelled() => None,
        _ = &mut startup.deadline, if startup.once => {
            startup.done = true;
            startup.failed = true;
            tracing::error!(event = "startup_timeout", timeout_secs = config.startup_timeout.as_secs(), "no Vault token within startup_timeout to adopt the recorded leases with");
            stop.cancel();
            None
        }
    };
    let Some(token) = token else { return crate::adopt::Leases::default() };
    let adopted = crate::adopt::leases(client, &token.token.secret, snapshot, config).await;
    let failed = crate::revoke::leases(client, &adopted.revoke, Some(&token), telemetry).await;
    if failed.is_empty()
        && let Some(store) = store
    {
        for name in &adopted.removed {
            let _ = store.remove_secret(name);
        }
    }
    adopted
}
