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
pub mod relay;
pub mod scram;
pub mod upstream;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
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
}

/// The cancel keys (`BackendKeyData`: process id and secret) of the
/// sessions open now.
#[derive(Default)]
struct Keys(Mutex<BTreeSet<Vec<u8>>>);

/// A key handed out, until its session ends.
struct HandedOut<'a>(&'a Keys, Vec<u8>);

impl Drop for HandedOut<'_> {
    fn drop(&mut self) {
        lock(&self.0.0).remove(&self.1);
    }
}

impl Keys {
    fn handed_out(&self, key: &[u8]) -> bool {
        lock(&self.0).contains(key)
    }

    fn hand_out(&self, key: Vec<u8>) -> HandedOut<'_> {
        lock(&self.0).insert(key.clone());
        HandedOut(self, key)
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
        let (secret, cfg, tls, creds, feed, stop) =
            (secret.clone(), cfg.clone(), tls.clone(), creds.clone(), feed.clone(), stop.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(client, &cfg, tls, creds, &feed, stop).await {
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

/// Why a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client or the server hung up.
    Peer,
    /// Replaced credentials: closed between transactions.
    Replaced,
    /// The lease is gone.
    Revoked,
    Stopped,
}

async fn connection(
    mut client: Box<dyn Io>,
    cfg: &ProxyConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    mut creds: watch::Receiver<Creds>,
    feed: &Feed,
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
            refuse(&mut client, "08P01", &e).await;
            return Err(e);
        }
    };
    let params = match startup {
        // Only for a key the proxy handed out: anyone else's would open
        // upstream connections for nothing (the server would ignore it).
        wire::Startup::Cancel(packet) if feed.stats.keys.handed_out(&packet[8..]) => {
            return upstream::cancel(cfg, tls, &packet).await;
        }
        wire::Startup::Cancel(_) => {
            tracing::debug!(event = "proxy_cancel_ignored", "a cancel request for a key the proxy did not hand out");
            return Ok(());
        }
        wire::Startup::Session(params) => params,
    };
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
    let (data, generation) = {
        let c = creds.borrow_and_update();
        (c.current.clone(), c.generation)
    };
    let opened = match data {
        Some(d) => upstream::open(cfg, tls, &params, &d).await.map(|io| (io, d)),
        None => Err(ProxyError::NoCredentials),
    };
    let (mut server, data) = match opened {
        Ok(o) => o,
        Err(e) => {
            let code = if matches!(e, ProxyError::Refused(_)) { "28000" } else { "08006" };
            let _ = client.write_all(&wire::error_response(code, &format!("leasehold proxy: {e}"))).await;
            return Err(e);
        }
    };
    let user = data.str("username").unwrap_or_default().to_string();
    client.write_all(&wire::AUTHENTICATION_OK).await?;
    let key = upstream::until_ready(&mut server, &mut client).await?;
    let _key = key.map(|k| feed.stats.keys.hand_out(k));
    feed.stats.opened_as(generation, &user);
    let result = relay(&mut client, &mut server, &mut creds, &user, &feed.stats, stop).await;
    feed.stats.closed(generation);
    let why = match result {
        Ok(End::Replaced) => Some(("replaced", "replaced; reconnect")),
        Ok(End::Revoked) => Some(("revoked", "revoked")),
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
    result.map(|_| ()).or_else(|e| {
        // A client or server that hangs up is no failure of the proxy.
        if matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::UnexpectedEof
        ) {
            Ok(())
        } else {
            Err(e.into())
        }
    })
}

/// Relays both ways until a side hangs up, the user's connections are to
/// close (at the next idle point) or end (now), or the proxy stops.
async fn relay(
    client: &mut Box<dyn Io>,
    server: &mut Box<dyn Io>,
    creds: &mut watch::Receiver<Creds>,
    user: &str,
    stats: &Stats,
    stop: CancellationToken,
) -> std::io::Result<End> {
    let idle = relay::Idle::logged_in();
    let closing = AtomicBool::new(false);
    let (client_r, client_w) = tokio::io::split(client);
    let (server_r, server_w) = tokio::io::split(server);
    let up = relay::pump(client_r, server_w, relay::client_side(&idle), &stats.bytes_up);
    let down = relay::pump(server_r, client_w, relay::server_side(&idle, &closing), &stats.bytes_down);
    let told = async {
        let ends = |c: &Creds| c.revoked.iter().any(|u| u == user) || c.closing.iter().any(|u| u == user);
        if creds.wait_for(ends).await.is_err() {
            return std::future::pending().await;
        }
        closing.store(true, Ordering::Relaxed);
        if creds.borrow().revoked.iter().any(|u| u == user) {
            return End::Revoked;
        }
        if idle.is_idle() {
            return End::Replaced;
        }
        let _ = creds.wait_for(|c| c.revoked.iter().any(|u| u == user)).await;
        End::Revoked
    };
    tokio::select! {
        r = up => r.map(|_| End::Peer),
        // The server side stops early when idle while closing.
        r = down => r.map(|early| if early { End::Replaced } else { End::Peer }),
        end = told => Ok(end),
        _ = stop.cancelled() => Ok(End::Stopped),
    }
}
