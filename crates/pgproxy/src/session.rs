//! One client connection: its startup (or cancel request), the local
//! password, the upstream login, then relaying and, when its credentials
//! are replaced, moving it (`migrate.rs`) or closing it at an idle point.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Creds, Feed, HandedOut, Io, Pod, ProxyError, Stats, migrate, relay, upstream, wire};
use config::ProxyConfig;

/// Tells the client why it is turned away, then reads what it still sends
/// before closing: closing with unread input resets the connection, and the
/// error is lost.
pub(crate) async fn refuse(client: &mut Box<dyn Io>, code: &str, e: &ProxyError) {
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

pub(crate) async fn connection(
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
pub(crate) fn hung_up(e: ProxyError) -> Result<(), ProxyError> {
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
