//! The local PostgreSQL proxy of a database secret (`proxy:`): the app
//! connects to `listen` with any user name and no password that matters;
//! every connection is opened upstream with the secret's **current**
//! credentials (SCRAM-SHA-256, md5 or cleartext, as the server asks), then
//! the bytes are relayed both ways. After a rotation new connections log in
//! as the new user; a connection of a replaced user is closed when its lease
//! is revoked. Cancel requests pass through: the server's own process id and
//! key reach the client unchanged, so a cancel names the right backend.
//!
//! - `wire.rs`: the few protocol messages the proxy reads and writes;
//! - `upstream.rs`: connecting, TLS and authenticating upstream;
//! - `scram.rs`: SCRAM-SHA-256's client side.

pub mod scram;
pub mod upstream;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ProxyConfig;
use crate::secret::SecretData;

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
    #[error("no credentials yet")]
    NoCredentials,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The credentials the proxy logs in with, and the users whose leases are
/// gone (their connections are closed).
#[derive(Default)]
pub struct Creds {
    pub current: Option<Arc<SecretData>>,
    pub revoked: Vec<String>,
}

/// What the lease supervisor tells the proxy.
pub struct Feed {
    tx: watch::Sender<Creds>,
}

/// Revoked users remembered for closing connections: a few rotations' worth.
const REVOKED_KEPT: usize = 16;

impl Feed {
    pub fn new() -> (Arc<Feed>, watch::Receiver<Creds>) {
        let (tx, rx) = watch::channel(Creds::default());
        (Arc::new(Feed { tx }), rx)
    }

    /// The credentials new connections use from now on.
    pub fn publish(&self, data: &SecretData) {
        self.tx.send_if_modified(|c| {
            if c.current.as_deref() == Some(data) {
                return false;
            }
            c.current = Some(Arc::new(data.clone()));
            true
        });
    }

    /// A replaced lease was revoked: its user's connections end.
    pub fn revoked(&self, data: &SecretData) {
        let Some(user) = data.str("username") else { return };
        self.tx.send_modify(|c| {
            c.revoked.push(user.to_string());
            if c.revoked.len() > REVOKED_KEPT {
                c.revoked.remove(0);
            }
        });
    }
}

#[derive(Default)]
pub struct Stats {
    pub opened: AtomicU64,
    pub failed: AtomicU64,
    pub open: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// Listens until `stop`; each connection in its own task.
pub async fn serve(
    secret: String,
    cfg: ProxyConfig,
    creds: watch::Receiver<Creds>,
    stats: Arc<Stats>,
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
    loop {
        let client = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(event = "proxy_accept_failed", secret = %secret, error = %e, "accepting a connection failed");
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let (secret, cfg, tls, creds, stats, stop) =
            (secret.clone(), cfg.clone(), tls.clone(), creds.clone(), stats.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(client, &cfg, tls, creds, &stats, stop).await {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(event = "proxy_connection_failed", secret = %secret, error = %e, "a proxied connection failed");
            }
        });
    }
}

async fn connection(
    mut client: Box<dyn Io>,
    cfg: &ProxyConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    mut creds: watch::Receiver<Creds>,
    stats: &Stats,
    stop: CancellationToken,
) -> Result<(), ProxyError> {
    let startup = match wire::read_startup(&mut client).await {
        Ok(s) => s,
        Err(e) => {
            let _ = client.write_all(&wire::error_response("08P01", &format!("leasehold proxy: {e}"))).await;
            // Read what the client still sends before closing: closing with
            // unread input resets the connection, and the error is lost.
            let _ = client.shutdown().await;
            let mut sink = [0u8; 1024];
            let drain = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
            return Err(e);
        }
    };
    let params = match startup {
        wire::Startup::Cancel(packet) => return upstream::cancel(cfg, tls, &packet).await,
        wire::Startup::Session(params) => params,
    };
    let data = creds.borrow().current.clone();
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
    stats.opened.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    let revoked = async {
        // Ends when this connection's user is revoked (or the feed is gone).
        let _ = creds.wait_for(|c| c.revoked.contains(&user)).await;
    };
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut server) => r.map(|(up, down)| {
            stats.bytes_up.fetch_add(up, Ordering::Relaxed);
            stats.bytes_down.fetch_add(down, Ordering::Relaxed);
        }),
        _ = revoked => {
            tracing::info!(event = "proxy_connection_closed", reason = "revoked", "the connection's credentials were revoked");
            Ok(())
        }
        _ = stop.cancelled() => Ok(()),
    };
    stats.open.fetch_sub(1, Ordering::Relaxed);
    let _ = server.shutdown().await;
    let _ = client.shutdown().await;
    result.or_else(|e| {
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
