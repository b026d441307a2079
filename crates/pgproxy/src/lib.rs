//! The local PostgreSQL proxy of a database secret (`proxy:`): the app
//! connects to `listen` with any user name, and no password or the local
//! one (`local_password`); every connection is opened upstream with the
//! secret's **current** credentials (SCRAM-SHA-256-PLUS or SCRAM-SHA-256;
//! md5 or cleartext only to a verified server: `auth.rs`), then the bytes
//! are relayed both ways. After a rotation new connections log in as the
//! new user; a connection of a replaced user is closed between
//! transactions when the supervisor drains its lease, and at once when the
//! lease is revoked. Cancel requests pass through for the keys the proxy
//! handed out: the server's own process id and key reach the client
//! unchanged, so a cancel names the right backend.
//!
//! - `wire.rs`: the few protocol messages the proxy reads and writes;
//! - `relay.rs`: relaying while following the framing, to know when a
//!   session is idle;
//! - `upstream.rs`: connecting, TLS and authenticating upstream;
//! - `auth.rs`: which authentication requests are answered (pure);
//! - `scram.rs`: SCRAM-SHA-256's client side;
//! - `binding.rs`: `tls-server-end-point` channel binding data.

pub mod auth;
pub mod binding;
pub mod migrate;
pub mod relay;
pub mod scram;
pub mod upstream;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use config::ProxyConfig;
use vault::secret::{ExposeSecret, SecretData, SecretString};

/// Anything a connection runs over (TCP, a Unix socket, TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PostgreSQL client ({0})")]
    NotPostgres(String),
    #[error("connecting to the upstream {addr}: {error}")]
    Connect { addr: String, error: String },
    #[error("the upstream {0} does not offer TLS, and upstream_tls requires it")]
    NoTls(String),
    #[error("TLS with the upstream: {0}")]
    Tls(String),
    #[error("the upstream refused the login: {0}")]
    Refused(String),
    /// The server's own `ErrorResponse` (its body), which the client gets
    /// unchanged.
    #[error("the upstream refused the login: {} ({})", wire::error_message(.0), wire::error_code(.0))]
    Server(Vec<u8>),
    #[error("{0}")]
    Unsupported(String),
    #[error("re-applying the session's state on new credentials failed: {0}")]
    Replay(String),
    #[error("the upstream answered what the proxy does not understand: {0}")]
    Protocol(String),
    #[error("password authentication failed (the proxy's local password)")]
    LocalPassword,
    #[error("no credentials yet")]
    NoCredentials,
    #[error("no startup packet within {0:?} (proxy.startup_timeout)")]
    StartupTimeout(std::time::Duration),
    #[error("too many connections ({0} open: proxy.max_connections)")]
    TooManyConnections(usize),
    #[error("too many connections (the descriptor limit is {0}, and {reserve} are kept for the agent's own work)", reserve = listen::RESERVE)]
    OutOfDescriptors(u64),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The credentials the proxy logs in with, and the users whose
/// connections must end: at their next idle point (`closing`: the
/// replacement is done) or at once (`revoked`: the lease is gone).
#[derive(Default)]
pub struct Creds {
    pub current: Option<Arc<SecretData>>,
    /// Counts publications: 1 for the first credentials.
    pub generation: u64,
    pub closing: Vec<String>,
    pub revoked: Vec<String>,
}

/// What the lease supervisor tells the proxy, and asks of it.
pub struct Feed {
    tx: watch::Sender<Creds>,
    stats: Arc<Stats>,
    /// The password clients must give, when `local_password` is on.
    local_password: Option<SecretString>,
}

/// Users remembered for closing connections: a few rotations' worth.
const USERS_KEPT: usize = 16;

fn remember(list: &mut Vec<String>, user: &str) {
    if !list.iter().any(|u| u == user) {
        list.push(user.to_string());
    }
    if list.len() > USERS_KEPT {
        list.remove(0);
    }
}

impl Feed {
    pub fn new(cfg: &ProxyConfig, stats: Arc<Stats>) -> (Arc<Feed>, watch::Receiver<Creds>) {
        let (tx, rx) = watch::channel(Creds::default());
        let local_password = cfg.local_password.then(|| SecretString::from(random_password()));
        (Arc::new(Feed { tx, stats, local_password }), rx)
    }

    /// The credentials new connections use from now on.
    pub fn publish(&self, data: &SecretData) {
        self.tx.send_if_modified(|c| {
            if c.current.as_deref() == Some(data) {
                return false;
            }
            c.current = Some(Arc::new(data.clone()));
            c.generation += 1;
            self.stats.generation.store(c.generation, Ordering::Relaxed);
            true
        });
    }

    /// A replaced lease is about to be revoked: its user's connections end
    /// between transactions.
    pub fn close_when_idle(&self, data: &SecretData) {
        let Some(user) = data.str("username") else { return };
        self.tx.send_modify(|c| remember(&mut c.closing, user));
    }

    /// A replaced lease was revoked: its user's connections end now.
    pub fn revoked(&self, data: &SecretData) {
        let Some(user) = data.str("username") else { return };
        self.tx.send_modify(|c| remember(&mut c.revoked, user));
    }

    /// Connections open as the user of `data`.
    pub fn open_as(&self, data: &SecretData) -> u64 {
        data.str("username").map_or(0, |u| self.stats.open_as(u))
    }

    /// Woken when a connection of replaced credentials ends.
    pub fn replaced_closed(&self) -> &Notify {
        &self.stats.replaced_closed
    }

    pub fn local_password(&self) -> Option<&str> {
        self.local_password.as_ref().map(|p| p.expose_secret())
    }
}

/// 32 characters from 62: 190 bits.
fn random_password() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

/// A panic aborts the process (panic = "abort"): a poisoned lock's data is
/// never seen half-updated, so it is used as it is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
pub struct Stats {
    pub opened: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// The credential generation new connections log in with.
    pub generation: AtomicU64,
    /// Open connections by credential generation, with its user.
    open: Mutex<BTreeMap<u64, (String, u64)>>,
    replaced_closed: Notify,
    keys: Keys,
    /// Sessions moved to new credentials.
    pub migrated: AtomicU64,
    /// Sessions found holding state that cannot move (counted once each).
    pub unmigratable: AtomicU64,
}

/// The cancel keys handed out to the sessions open now, each with the key
/// of the server connection that serves the session at the moment (a
/// migration moves it).
#[derive(Default)]
pub struct Keys(Mutex<BTreeMap<Vec<u8>, Vec<u8>>>);

/// A key handed out, until its session ends.
pub struct HandedOut<'a> {
    keys: &'a Keys,
    client: Vec<u8>,
}

impl HandedOut<'_> {
    /// What the client got (`BackendKeyData`'s body).
    pub fn key(&self) -> &[u8] {
        &self.client
    }

    /// The session moved to a server connection with this key.
    pub fn moved_to(&self, backend: Vec<u8>) {
        lock(&self.keys.0).insert(self.client.clone(), backend);
    }
}

impl Drop for HandedOut<'_> {
    fn drop(&mut self) {
        lock(&self.keys.0).remove(&self.client);
    }
}

impl Keys {
    /// The server key a client's cancel key stands for, if the proxy
    /// handed it out to a live session.
    fn backend(&self, client: &[u8]) -> Option<Vec<u8>> {
        lock(&self.0).get(client).cloned()
    }

    /// A key for the client in place of `backend`'s: the server's process
    /// id (what `pg_backend_pid()` says, and what notifications name) and
    /// a secret of the proxy's own.
    pub fn hand_out(&self, backend: Vec<u8>) -> HandedOut<'_> {
        use rand::Rng;
        let mut keys = lock(&self.0);
        let pid = backend.get(..4).unwrap_or(&[0, 0, 0, 0]).to_vec();
        let client = loop {
            let mut k = pid.clone();
            k.extend_from_slice(&rand::rng().random::<[u8; 4]>());
            if !keys.contains_key(&k) {
                break k;
            }
        };
        keys.insert(client.clone(), backend);
        HandedOut { keys: self, client }
    }
}

impl Stats {
    fn opened_as(&self, generation: u64, user: &str) {
        self.opened.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).entry(generation).or_insert_with(|| (user.to_string(), 0)).1 += 1;
    }

    fn closed(&self, generation: u64) {
        let mut open = lock(&self.open);
        if let Some(e) = open.get_mut(&generation) {
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                open.remove(&generation);
            }
        }
        drop(open);
        if generation != self.generation.load(Ordering::Relaxed) {
            self.replaced_closed.notify_one();
        }
    }

    /// A session moved from a replaced generation to `generation`.
    fn moved(&self, from: u64, generation: u64, user: &str) {
        self.migrated.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).entry(generation).or_insert_with(|| (user.to_string(), 0)).1 += 1;
        self.closed(from);
    }

    fn open_as(&self, user: &str) -> u64 {
        lock(&self.open).values().filter(|(u, _)| u == user).map(|(_, n)| n).sum()
    }

    /// Open connections: (of the current credentials, of replaced ones).
    pub fn open(&self) -> (u64, u64) {
        let current = self.generation.load(Ordering::Relaxed);
        lock(&self.open).iter().fold((0, 0), |(c, r), (g, (_, n))| if *g == current { (c + n, r) } else { (c, r + n) })
    }
}

/// Listens until `stop`; each connection in its own task.
pub async fn serve(
    secret: String,
    cfg: ProxyConfig,
    feed: Arc<Feed>,
    creds: watch::Receiver<Creds>,
    stop: CancellationToken,
) {
    let listener = match wire::Listener::bind(&cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(event = "proxy_failed", secret = %secret, listen = %cfg.listen, error = %e, "the proxy cannot listen");
            return;
        }
    };
    tracing::info!(event = "proxy_listening", secret = %secret, listen = %cfg.listen, upstream = %cfg.upstream, "proxying PostgreSQL connections");
    let cfg = Arc::new(cfg);
    let tls = match upstream::tls_config(&cfg) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(event = "proxy_failed", secret = %secret, error = %e, "the proxy's upstream TLS cannot be set up");
            return;
        }
    };
    let pod = Arc::new(Pod::from_env());
    let mut accept_errors = listen::AcceptErrors::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let mut turned_away = listen::Throttle::default();
    loop {
        let accept = || listener.accept();
        let Some(mut client) = listen::next(accept, &mut accept_errors, "proxy_accept_failed", &secret, &stop).await
        else {
            return;
        };
        // Two descriptors a connection: the client's and the upstream's.
        let admitted = match (slots.clone().try_acquire_owned(), listen::Descriptors::take(2)) {
            (Ok(slot), Ok(fds)) => Ok((slot, fds)),
            (Err(_), _) => Err(ProxyError::TooManyConnections(cfg.max_connections)),
            (_, Err(limit)) => Err(ProxyError::OutOfDescriptors(limit)),
        };
        let slot = match admitted {
            Ok(slot) => slot,
            Err(e) => {
                // Told why at once, not drained for long: the descriptor is
                // what the cap protects. Logged at most every 10 s.
                feed.stats.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(count) = turned_away.tick() {
                    tracing::warn!(event = "proxy_connections_capped", secret = %secret, error = %e, turned_away = count, "too many proxy connections: new ones are turned away");
                }
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_millis(200), refuse(&mut client, "53300", &e))
                            .await;
                });
                continue;
            }
        };
        let (secret, cfg, tls, creds, feed, stop, pod) =
            (secret.clone(), cfg.clone(), tls.clone(), creds.clone(), feed.clone(), stop.clone(), pod.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let result = connection(client, &cfg, tls, creds, &feed, &pod, stop).await;
            if let Err(e) = result.or_else(hung_up) {
                feed.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(event = "proxy_connection_failed", secret = %secret, error = %e, "a proxied connection failed");
            }
        });
    }
}

/// Tells the client why it is turned away, then reads what it still sends
/// before closing: closing with unread input resets the connection, and the
/// error is lost.
async fn refuse(client: &mut Box<dyn Io>, code: &str, e: &ProxyError) {
    let _ = client.write_all(&wire::error_response(code, &format!("leasehold proxy: {e}"))).await;
    let _ = client.shutdown().await;
    let mut sink = [0u8; 1024];
    let drain = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

/// Why a relayed connection ended, or paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client or the server hung up.
    Peer,
    /// Replaced credentials: closed between transactions.
    Replaced,
    /// The lease is gone.
    Revoked,
    Stopped,
    /// Idle on replaced credentials: time to move the session.
    Migrate,
}

/// The pod a session comes from, for the upstream `application_name`
/// (`attribution`): the downward API's `POD_NAMESPACE` and `POD_NAME`.
#[derive(Debug, Clone, Default)]
pub struct Pod {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Pod {
    pub fn from_env() -> Pod {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Pod { namespace: var("POD_NAMESPACE"), name: var("POD_NAME") }
    }

    /// The client's parameters as sent upstream: `application_name` gets
    /// ` [namespace/pod]` after the client's own (or `leasehold`), the
    /// client's part shortened so the whole fits the server's 63 bytes.
    pub fn attribute(&self, mut params: BTreeMap<String, String>) -> BTreeMap<String, String> {
        let tag = match (&self.namespace, &self.name) {
            (Some(ns), Some(pod)) => format!(" [{ns}/{pod}]"),
            (None, Some(pod)) => format!(" [{pod}]"),
            _ => return params,
        };
        let app = params.remove("application_name").filter(|a| !a.is_empty()).unwrap_or_else(|| "leasehold".into());
        let room = 63usize.saturating_sub(tag.len());
        let mut cut = app.len().min(room);
        while !app.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut name = format!("{}{tag}", &app[..cut]);
        while name.len() > 63 {
            name.pop();
        }
        params.insert("application_name".into(), name);
        params
    }
}

/// How long an upstream login may take (connect, TLS, SCRAM, up to the
/// server's first ReadyForQuery).
const UPSTREAM_LOGIN: std::time::Duration = std::time::Duration::from_secs(15);

/// A logged-in session: the server connection serving it now, and what
/// the proxy knows of it.
struct Live<'k> {
    server: Box<dyn Io>,
    user: String,
    generation: u64,
    key: Option<HandedOut<'k>>,
    /// What kept it from moving, when something did.
    blocked: Option<Vec<String>>,
    attempts: u32,
    /// After a failed or refused migration: how long the next waits (the
    /// relay resumes right after the attempt).
    retry_in: Option<std::time::Duration>,
}

async fn connection(
    mut client: Box<dyn Io>,
    cfg: &ProxyConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    mut creds: watch::Receiver<Creds>,
    feed: &Feed,
    pod: &Pod,
    stop: CancellationToken,
) -> Result<(), ProxyError> {
    // A client that says nothing holds a task and a descriptor: only for
    // `startup_timeout`, the local password included.
    let deadline = tokio::time::sleep(cfg.startup_timeout);
    tokio::pin!(deadline);
    let timed_out = || ProxyError::StartupTimeout(cfg.startup_timeout);
    let startup = tokio::select! {
        s = wire::read_startup(&mut client) => s,
        _ = &mut deadline => Err(timed_out()),
    };
    let startup = match startup {
        Ok(s) => s,
        Err(e) => {
            let code = if matches!(e, ProxyError::Unsupported(_)) { "0A000" } else { "08P01" };
            refuse(&mut client, code, &e).await;
            return Err(e);
        }
    };
    let session = match startup {
        // Only for a key the proxy handed out: anyone else's would open
        // upstream connections for nothing (the server would ignore it).
        wire::Startup::Cancel(packet) => match feed.stats.keys.backend(&packet[8..]) {
            Some(backend) => return upstream::cancel(cfg, tls, &backend).await,
            None => {
                tracing::debug!(
                    event = "proxy_cancel_ignored",
                    "a cancel request for a key the proxy did not hand out"
                );
                return Ok(());
            }
        },
        wire::Startup::Gone => return Ok(()),
        wire::Startup::Session(s) => s,
    };
    if let Some(v) = session.negotiation() {
        client.write_all(&v).await?;
    }
    let password = async {
        match feed.local_password() {
            Some(want) => tokio::select! {
                r = wire::check_password(&mut client, want) => r,
                _ = &mut deadline => Err(timed_out()),
            },
            None => Ok(()),
        }
    };
    if let Err(e) = password.await {
        let code = if matches!(e, ProxyError::LocalPassword) { "28P01" } else { "08P01" };
        refuse(&mut client, code, &e).await;
        return Err(e);
    }
    let params = if cfg.attribution { pod.attribute(session.params) } else { session.params };
    let (data, generation) = {
        let c = creds.borrow_and_update();
        (c.current.clone(), c.generation)
    };
    // A server that accepts and then says nothing holds the client, a task
    // and two descriptors: the login is bounded as the startup is.
    let login = async {
        match data {
            Some(d) => upstream::open(cfg, tls.clone(), &params, &d).await.map(|io| (io, d)),
            None => Err(ProxyError::NoCredentials),
        }
    };
    let opened = tokio::time::timeout(UPSTREAM_LOGIN, login).await.unwrap_or_else(|_| {
        Err(ProxyError::Connect { addr: cfg.upstream.clone(), error: format!("no login within {UPSTREAM_LOGIN:?}") })
    });
    let (mut server, data) = match opened {
        Ok(o) => o,
        Err(e) => {
            let answer = match &e {
                ProxyError::Server(body) => wire::message(b'E', body),
                ProxyError::Refused(_) => wire::error_response("28000", &format!("leasehold proxy: {e}")),
                _ => wire::error_response("08006", &format!("leasehold proxy: {e}")),
            };
            let _ = client.write_all(&answer).await;
            return Err(e);
        }
    };
    let user = data.str("username").unwrap_or_default().to_string();
    client.write_all(&wire::AUTHENTICATION_OK).await?;
    let ready = upstream::until_ready(&mut server, &mut client, &feed.stats.keys);
    let key = tokio::time::timeout(UPSTREAM_LOGIN, ready).await.unwrap_or_else(|_| {
        Err(ProxyError::Connect {
            addr: cfg.upstream.clone(),
            error: format!("no ReadyForQuery within {UPSTREAM_LOGIN:?}"),
        })
    })?;
    feed.stats.opened_as(generation, &user);
    let mut live = Live { server, user, generation, key, blocked: None, attempts: 0, retry_in: None };
    let idle = relay::Idle::logged_in();
    let result = loop {
        let end = relay(&mut client, &mut live, &idle, &mut creds, cfg, &feed.stats, stop.clone()).await;
        if end.as_ref().is_ok_and(|e| *e == End::Migrate) {
            match migrate(&mut client, &mut live, cfg, tls.clone(), &params, &creds, &feed.stats).await {
                Ok(()) => continue,
                Err(end) => break Ok(end),
            }
        }
        break end;
    };
    feed.stats.closed(live.generation);
    let server = &mut live.server;
    let why = match (&result, &live.blocked) {
        (Ok(End::Replaced), Some(what)) => {
            Some(("unmigratable", format!("ended; its {} cannot move to new ones; reconnect", what.join(", "))))
        }
        (Ok(End::Replaced), None) => Some(("replaced", "replaced; reconnect".to_string())),
        (Ok(End::Revoked), _) => Some(("revoked", "revoked".to_string())),
        _ => None,
    };
    if let Some((reason, why)) = why {
        // What the server itself says when it ends a session (57P01): pools
        // drop the connection and open a new one.
        let bye = wire::error_response("57P01", &format!("leasehold proxy: the connection's credentials were {why}"));
        let _ = client.write_all(&bye).await;
        let _ = server.write_all(&wire::TERMINATE).await;
        tracing::info!(event = "proxy_connection_closed", reason, "closed a connection of replaced credentials");
    }
    let _ = server.shutdown().await;
    let _ = client.shutdown().await;
    result.map(|_| ()).map_err(ProxyError::Io)
}

/// A client or server that hangs up, at any point, is no failure of the
/// proxy.
fn hung_up(e: ProxyError) -> Result<(), ProxyError> {
    match &e {
        ProxyError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            Ok(())
        }
        _ => Err(e),
    }
}

/// Moves an idle session to the current credentials; `Err` with how the
/// session ends when it must (its old connection lost, or `unmigratable:
/// close`).
async fn migrate(
    client: &mut Box<dyn Io>,
    live: &mut Live<'_>,
    cfg: &ProxyConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    params: &BTreeMap<String, String>,
    creds: &watch::Receiver<Creds>,
    stats: &Stats,
) -> Result<(), End> {
    let (data, generation) = {
        let c = creds.borrow();
        (c.current.clone(), c.generation)
    };
    let Some(data) = data else { return Ok(()) };
    // Bounded: the client waits meanwhile, its next statement unread.
    let moved = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let state = migrate::snapshot(&mut live.server, client).await?;
        if !state.blockers.is_empty() {
            return Err(migrate::Failed::Blocked(state.blockers));
        }
        let new = migrate::login(cfg, tls, params, &data, &state).await.map_err(migrate::Failed::Again)?;
        Ok((state, new))
    })
    .await
    .unwrap_or_else(|_| Err(migrate::Failed::Lost(ProxyError::Protocol("no answer within 10s".into()))));
    match moved {
        Ok((state, new)) => {
            let news = migrate::news(&state.reported, &new.reported);
            if client.write_all(&news).await.is_err() {
                return Err(End::Peer);
            }
            let mut old = std::mem::replace(&mut live.server, new.server);
            // The old backend's role is about to be dropped: it goes now.
            let _ = old.write_all(&wire::TERMINATE).await;
            let _ = old.shutdown().await;
            if let (Some(k), Some(backend)) = (&live.key, new.key) {
                k.moved_to(backend);
            }
            let user = data.str("username").unwrap_or_default().to_string();
            stats.moved(live.generation, generation, &user);
            tracing::info!(
                event = "proxy_session_migrated",
                settings = state.settings.len(),
                prepared = state.prepared.len(),
                generation,
                "moved a session to the new credentials"
            );
            (live.user, live.generation, live.blocked, live.attempts, live.retry_in) =
                (user, generation, None, 0, None);
            Ok(())
        }
        Err(migrate::Failed::Lost(e)) => {
            tracing::warn!(event = "proxy_migration_failed", error = %e, "a session could not be moved, and its connection is in a state the proxy cannot know: closing it");
            Err(End::Revoked)
        }
        Err(migrate::Failed::Blocked(what)) => {
            if live.blocked.is_none() {
                stats.unmigratable.fetch_add(1, Ordering::Relaxed);
                tracing::info!(event = "proxy_session_unmigratable", holds = %what.join(", "), fallback = ?cfg.unmigratable, "a session holds state that cannot move to new credentials");
            }
            live.blocked = Some(what);
            if cfg.unmigratable == config::Unmigratable::Close {
                return Err(End::Replaced);
            }
            live.retry_in = Some(migrate::retry_after(live.attempts));
            live.attempts += 1;
            Ok(())
        }
        Err(migrate::Failed::Again(e)) => {
            tracing::warn!(event = "proxy_migration_failed", error = %e, retry_in_secs = migrate::retry_after(live.attempts).as_secs(), "a session could not be moved to new credentials yet; it stays on the old ones");
            live.retry_in = Some(migrate::retry_after(live.attempts));
            live.attempts += 1;
            Ok(())
        }
    }
}

/// Relays both ways until a side hangs up, the user's connections are to
/// close (at the next idle point) or end (now), the session is idle on
/// replaced credentials (`migrate`), or the proxy stops.
async fn relay(
    client: &mut Box<dyn Io>,
    live: &mut Live<'_>,
    idle: &relay::Idle,
    creds: &mut watch::Receiver<Creds>,
    cfg: &ProxyConfig,
    stats: &Stats,
    stop: CancellationToken,
) -> std::io::Result<End> {
    let stop_at_idle = AtomicBool::new(false);
    let (user, generation, retry_in) = (live.user.clone(), live.generation, live.retry_in);
    let migrating = cfg.replaced_connections == config::ReplacedConnections::Migrate;
    let (client_r, client_w) = tokio::io::split(client);
    let (server_r, server_w) = tokio::io::split(&mut live.server);
    let up = relay::pump(client_r, server_w, relay::client_side(idle), &stats.bytes_up, idle.writing(true));
    let down = relay::pump(
        server_r,
        client_w,
        relay::server_side(idle, &stop_at_idle),
        &stats.bytes_down,
        idle.writing(false),
    );
    let revoked = |c: &Creds| c.revoked.contains(&user);
    let closing = |c: &Creds| revoked(c) || c.closing.contains(&user);
    let replaced = |c: &Creds| migrating && c.generation != generation && c.current.is_some();
    let why = |c: &Creds| if closing(c) { End::Replaced } else { End::Migrate };
    let told = async {
        if creds.wait_for(|c| closing(c) || replaced(c)).await.is_err() {
            return std::future::pending().await;
        }
        if let Some(delay) = retry_in.filter(|_| !closing(&creds.borrow())) {
            // A migration failed or was refused: the next attempt waits.
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = creds.wait_for(closing) => {}
            }
        }
        stop_at_idle.store(true, Ordering::Relaxed);
        if revoked(&creds.borrow()) {
            return End::Revoked;
        }
        if idle.is_idle() {
            return why(&creds.borrow());
        }
        let _ = creds.wait_for(revoked).await;
        End::Revoked
    };
    let end = tokio::select! {
        r = up => r.map(|_| End::Peer),
        // The server side stops early when idle while asked to.
        r = down => r.map(|early| if early { End::Migrate } else { End::Peer }),
        end = told => Ok(end),
        _ = stop.cancelled() => Ok(End::Stopped),
    };
    // Stopped at an idle point: closing, if that is what was asked.
    match end {
        Ok(End::Migrate) => Ok(why(&creds.borrow())),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_name_says_which_pod_within_63_bytes() {
        let pod = Pod { namespace: Some("shop".into()), name: Some("api-7d9f-x2x".into()) };
        let params = |app: Option<&str>| {
            let mut p = BTreeMap::from([("user".to_string(), "app".to_string())]);
            if let Some(a) = app {
                p.insert("application_name".into(), a.into());
            }
            p
        };
        let name = |p: BTreeMap<String, String>| p["application_name"].clone();
        assert_eq!(name(pod.attribute(params(Some("psql")))), "psql [shop/api-7d9f-x2x]");
        assert_eq!(name(pod.attribute(params(None))), "leasehold [shop/api-7d9f-x2x]");
        // A long (multibyte) name is cut, never the pod.
        let long = name(pod.attribute(params(Some(&"é".repeat(60)))));
        assert!(long.len() <= 63 && long.ends_with(" [shop/api-7d9f-x2x]"), "{long}");
        // Outside Kubernetes (no downward API): as the client sent it.
        assert_eq!(Pod::default().attribute(params(Some("psql"))), params(Some("psql")));
    }

    #[test]
    fn cancel_keys_keep_the_pid_and_follow_the_session() {
        let keys = Keys::default();
        let handed = keys.hand_out(vec![0, 0, 1, 2, 9, 9, 9, 9]);
        let client = handed.key().to_vec();
        assert_eq!(&client[..4], &[0, 0, 1, 2], "the server's process id");
        assert_ne!(&client[4..], &[9, 9, 9, 9], "a secret of the proxy's own");
        assert_eq!(keys.backend(&client), Some(vec![0, 0, 1, 2, 9, 9, 9, 9]));
        handed.moved_to(vec![0, 0, 3, 4, 7, 7, 7, 7]);
        assert_eq!(keys.backend(&client), Some(vec![0, 0, 3, 4, 7, 7, 7, 7]), "after a migration");
        drop(handed);
        assert_eq!(keys.backend(&client), None, "the session ended");
    }
}
