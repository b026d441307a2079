//! The local PostgreSQL proxy of a database secret (`proxy:`): the app
//! connects to `listen` with any user name, and no password or the local
//! one (`local_password`); every connection is opened upstream with the
//! secret's **current** credentials (SCRAM-SHA-256-PLUS or SCRAM-SHA-256;
//! md5 or cleartext only to a verified server: `auth.rs`), then the bytes
//! are relayed both ways. After a rotation new connections log in as the
//! new user, and open sessions move to it at their next idle point
//! (`replaced_connections: migrate`); a session that cannot move, or one of
//! `close`, is closed between transactions before its lease can end, and at
//! once when the lease is revoked. Cancel requests pass through for the
//! keys the proxy handed out (the server's process id, a secret of the
//! proxy's own), to whichever server connection serves the session.
//!
//! - `session.rs`: one client connection, from startup to its end;
//! - `migrate.rs`: moving an idle session to new credentials;
//! - `wire.rs`: the few protocol messages the proxy reads and writes;
//! - `relay.rs`: relaying while following the framing, to know when a
//!   session is idle;
//! - `upstream.rs`: connecting, TLS and authenticating upstream;
//! - `auth.rs`: which authentication requests are answered (pure);
//! - `scram.rs`: SCRAM-SHA-256's client side;
//! - `binding.rs`: `tls-server-end-point` channel binding data;
//! - `attribution.rs`: the pod in the upstream `application_name`.

pub mod attribution;
pub mod auth;
pub mod binding;
pub mod migrate;
pub mod relay;
pub mod scram;
mod session;
pub mod upstream;
pub mod wire;

pub use attribution::Pod;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
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
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_millis(200),
                        session::refuse(&mut client, "53300", &e),
                    )
                    .await;
                });
                continue;
            }
        };
        let (secret, cfg, tls, creds, feed, stop, pod) =
            (secret.clone(), cfg.clone(), tls.clone(), creds.clone(), feed.clone(), stop.clone(), pod.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let result = session::connection(client, &cfg, tls, creds, &feed, &pod, stop).await;
            if let Err(e) = result.or_else(session::hung_up) {
                feed.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(event = "proxy_connection_failed", secret = %secret, error = %e, "a proxied connection failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
