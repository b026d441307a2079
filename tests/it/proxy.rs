//! The local PostgreSQL proxy (`proxy:`), with the real binary, OpenBao and
//! PostgreSQL 15 (SCRAM-SHA-256): `psql` through the proxy across
//! rotations, what bad clients and upstreams get, and no role left after
//! SIGTERM.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::{Env, Ttls, eventually};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A port for a listener the agent binds itself. Below the kernel's
/// ephemeral range (32768–60999): a port taken with `bind(":0")` and let go
/// could be handed to another test's `bind(":0")` before the agent binds it
/// (a fake server then answered psql once). Each is handed out once per run.
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 64) * 150;
    loop {
        let port = (base + NEXT.fetch_add(1, Ordering::Relaxed) % 9_600) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `psql` through the proxy as a user name that means nothing, no password:
/// the user the server saw (`pg_stat_activity`), or psql's error.
pub(crate) async fn query(port: u16) -> Result<String, String> {
    let out = tokio::process::Command::new("psql")
        .args([
            &format!("host=127.0.0.1 port={port} user=whoever dbname=postgres sslmode=prefer connect_timeout=5"),
            "-Atc",
            "SELECT usename FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        ])
        .env_remove("PGPASSWORD")
        .output()
        .await
        .map_err(|e| format!("psql: {e} (scripts/test installs PostgreSQL's client)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

pub(crate) fn proxied(name: &str, env: &Env, port: u16, upstream: &str, tls: &str) -> String {
    format!(
        "  - name: {name}\n    path: database/creds/app\n    revoke_replaced_after: 1s\n    files:\n      - path: {}/{name}.json\n        format: json\n    proxy:\n      listen: 127.0.0.1:{port}\n      upstream: {upstream}\n      upstream_tls: {tls}\n",
        env.secrets().display()
    )
}

/// OpenBao and PostgreSQL with these database TTLs, and an agent whose one
/// secret `secret(env, port, upstream)` is, once its JSON file is written.
pub(crate) async fn proxy_agent(
    db_ttl: &str,
    db_max: &str,
    secret: impl Fn(&Env, u16, &str) -> String,
) -> (Env, crate::support::Agent, u16) {
    let env = Env::new(Ttls { db_ttl, db_max, token_ttl: "1h", token_max: "2h" }).await;
    let port = free_port();
    let upstream = format!("127.0.0.1:{}", env.pg.port);
    let agent = env.spawn(&env.config_with_secrets(&secret(&env, port, &upstream))).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    (env, agent, port)
}

pub(crate) async fn metrics(agent: &crate::support::Agent) -> String {
    let url = format!("http://{}/metrics", agent.telemetry_addr().unwrap());
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_through_the_proxy_never_fail_across_rotations() {
    let (env, mut agent, port) = proxy_agent("2s", "4s", |env, port, up| proxied("db", env, port, up, "disable")).await;

    // A query every 100 ms, each on a new connection, until three rotations.
    let mut users: Vec<String> = Vec::new();
    let mut failures = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while users.iter().collect::<BTreeSet<_>>().len() < 4 && Instant::now() < deadline {
        match query(port).await {
            Ok(user) => users.push(user),
            Err(e) => failures.push(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let distinct: BTreeSet<&String> = users.iter().collect();
    assert!(failures.is_empty(), "failed queries: {failures:?}\n{}", agent.output());
    assert!(distinct.len() >= 4, "three rotations seen: {distinct:?}\n{}", agent.output());
    // Each rotation's new connections log in as the new user, in order: no
    // connection after a rotation went back to a replaced user.
    let mut order: Vec<&String> = Vec::new();
    for u in &users {
        if order.last() != Some(&u) {
            assert!(!order.contains(&u), "{u} came back after it was replaced: {users:?}");
            order.push(u);
        }
    }
    for u in &distinct {
        assert!(u.starts_with("v-"), "a Vault-made user: {u}");
    }
    let metrics = metrics(&agent).await;
    let opened = format!("leasehold_proxy_connections_opened_total{{secret=\"db\"}} {}", users.len());
    assert!(metrics.contains(&opened), "{opened} in\n{metrics}");

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    for u in distinct {
        assert!(!env.pg.role_exists(u).await, "{u} dropped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_and_upstreams_get_clear_errors_and_others_are_served() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let (good, refused, no_tls) = (free_port(), free_port(), free_port());
    let upstream = format!("127.0.0.1:{}", env.pg.port);
    let closed = format!("127.0.0.1:{}", free_port());
    // A server that answers SSLRequest with 'N', as one without TLS does.
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = plain.accept().await {
            let mut request = [0u8; 8];
            if s.read_exact(&mut request).await.is_ok() {
                let _ = s.write_all(b"N").await;
            }
        }
    });
    let secrets = [
        proxied("db", &env, good, &upstream, "disable"),
        proxied("refused", &env, refused, &closed, "disable"),
        proxied("notls", &env, no_tls, &plain_addr, "require"),
    ]
    .concat();
    let mut agent = env.spawn(&env.config_with_secrets(&secrets)).await;
    assert!(eventually(20, async || env.read_json("notls.json").is_some()).await, "{}", agent.output());
    assert!(eventually(10, async || query(good).await.is_ok()).await, "{}", agent.output());

    // Not PostgreSQL: an ErrorResponse naming it, then the connection ends.
    let mut http = tokio::net::TcpStream::connect(("127.0.0.1", good)).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), http.read_to_end(&mut answer)).await.expect("closed").unwrap();
    assert_eq!(answer.first(), Some(&b'E'), "{answer:?}");
    assert!(String::from_utf8_lossy(&answer).contains("not a PostgreSQL client"));

    let e = query(refused).await.expect_err("no upstream");
    assert!(e.contains("leasehold proxy: connecting to the upstream"), "{e}");
    let e = query(no_tls).await.expect_err("no TLS upstream");
    assert!(e.contains("does not offer TLS"), "{e}");

    // The others are still served.
    query(good).await.expect("the good proxy still serves");
    // Each failure logged (the bad client's once its input is drained).
    let failed = async || agent.events("proxy_connection_failed").len() >= 3;
    assert!(eventually(5, failed).await, "{}", agent.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

/// A bare protocol-3 session, as a pool keeps one: connected once, queried
/// many times.
pub(crate) struct Session {
    pub(crate) s: tokio::net::TcpStream,
    /// `BackendKeyData`'s body: what a CancelRequest names.
    pub(crate) key: Vec<u8>,
}

/// An `ErrorResponse`'s SQLSTATE and message.
#[derive(Debug)]
pub(crate) struct PgError {
    pub(crate) code: String,
    pub(crate) message: String,
}

/// One message from a server (or the proxy): its type and body.
pub(crate) async fn read_message(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    let kind = s.read_u8().await.unwrap();
    let len = s.read_i32().await.unwrap();
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body).await.unwrap();
    (kind, body)
}

pub(crate) fn pg_error(body: &[u8]) -> PgError {
    let field = |f: u8| {
        body.split(|c| *c == 0)
            .find_map(|x| x.strip_prefix(&[f]))
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .unwrap_or_default()
    };
    PgError { code: field(b'C'), message: field(b'M') }
}

impl Session {
    pub(crate) async fn message(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let kind = self.s.read_u8().await?;
        let len = self.s.read_i32().await?;
        let mut body = vec![0u8; len as usize - 4];
        self.s.read_exact(&mut body).await?;
        Ok((kind, body))
    }

    pub(crate) async fn send(&mut self, kind: u8, body: &[u8]) {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        self.s.write_all(&m).await.unwrap();
    }

    pub(crate) async fn connect(port: u16, password: Option<&str>) -> Result<Session, PgError> {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut me = Session { s, key: Vec::new() };
        let mut body = 196_608i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0whoever\0database\0postgres\0\0");
        let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        startup.extend_from_slice(&body);
        me.s.write_all(&startup).await.unwrap();
        loop {
            let (kind, body) = me.message().await.unwrap();
            match kind {
                b'R' if body == [0, 0, 0, 3] => {
                    let p = format!("{}\0", password.unwrap_or_default());
                    me.send(b'p', p.as_bytes()).await;
                }
                b'E' => return Err(pg_error(&body)),
                b'K' => me.key = body,
                b'Z' => return Ok(me),
                _ => {}
            }
        }
    }

    /// Runs `sql` and, half a second in, sends a CancelRequest with this
    /// session's key: the error the query ends with.
    pub(crate) async fn cancelled_query(&mut self, port: u16, sql: &str) -> PgError {
        let key = self.key.clone();
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Session::cancel(port, &key).await;
        });
        let e = self.query(sql).await.expect_err("cancelled");
        cancel.await.unwrap();
        e
    }

    /// Sends a CancelRequest for `key` on a connection of its own.
    pub(crate) async fn cancel(port: u16, key: &[u8]) {
        let mut packet = 16i32.to_be_bytes().to_vec();
        packet.extend_from_slice(&80_877_102i32.to_be_bytes());
        packet.extend_from_slice(key);
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
        let _ = s.write_all(&packet).await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }

    /// The first column of every row, or the error.
    pub(crate) async fn query(&mut self, sql: &str) -> Result<Vec<String>, PgError> {
        self.send(b'Q', format!("{sql}\0").as_bytes()).await;
        self.rows().await
    }

    /// The first column of every row up to `ReadyForQuery`, or the error.
    pub(crate) async fn rows(&mut self) -> Result<Vec<String>, PgError> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (kind, body) = match self.message().await {
                Ok(m) => m,
                Err(e) => return Err(error.unwrap_or(PgError { code: "eof".into(), message: e.to_string() })),
            };
            match kind {
                b'D' => {
                    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                    rows.push(String::from_utf8_lossy(&body[6..6 + len.max(0) as usize]).into_owned());
                }
                b'E' => error = Some(pg_error(&body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    /// What the proxy sends unasked while the session is idle, then the end
    /// of the connection: the `ErrorResponse`, or None if it stays open.
    pub(crate) async fn closed_by_proxy(&mut self, within: Duration) -> Option<PgError> {
        let (kind, body) = tokio::time::timeout(within, self.message()).await.ok()?.ok()?;
        assert_eq!(kind, b'E', "only an error comes unasked");
        let mut rest = Vec::new();
        let eof = tokio::time::timeout(Duration::from_secs(5), self.s.read_to_end(&mut rest)).await;
        assert!(matches!(eof, Ok(Ok(0))), "then the connection ends: {eof:?} {rest:?}");
        Some(pg_error(&body))
    }

    pub(crate) async fn user(&mut self) -> Result<String, PgError> {
        Ok(self.query("SELECT current_user").await?.remove(0))
    }
}

pub(crate) fn kept(name: &str, env: &Env, port: u16, upstream: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    path: database/creds/app\n    revoke_replaced_after: 0s\n    files:\n      - path: {dir}/{name}.json\n        format: json\n      - path: {dir}/{name}.password\n        format: template\n        template: \"{{{{ proxy.password }}}}\"\n    proxy:\n      listen: 127.0.0.1:{port}\n      upstream: {upstream}\n      upstream_tls: disable\n{extra}",
        dir = env.secrets().display()
    )
}

/// The lease ids (as logged) of the `event`s naming `field`.
fn logged_leases(agent: &crate::support::Agent, event: &str, field: &str) -> Vec<String> {
    agent.events(event).iter().filter_map(|e| e[field].as_str().map(str::to_string)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_connections_close_between_transactions_before_their_lease_is_revoked() {
    let close = "      replaced_connections: close\n";
    let (env, mut agent, port) = proxy_agent("10s", "20s", |env, port, up| kept("db", env, port, up, close)).await;
    let mut idle = Session::connect(port, None).await.expect("no local password asked");
    let mut busy = Session::connect(port, None).await.unwrap();
    let first = idle.user().await.unwrap();
    busy.query("BEGIN").await.unwrap();
    assert_eq!(busy.user().await.unwrap(), first);

    // revoke_replaced_after 0s: draining starts with the replacement.
    assert!(eventually(30, async || !agent.events("draining").is_empty()).await, "{}", agent.output());
    let e = idle.closed_by_proxy(Duration::from_secs(5)).await.expect("the idle session is closed");
    assert_eq!(e.code, "57P01", "{e:?}");
    assert!(e.message.contains("credentials were replaced"), "{e:?}");
    // The one in a transaction block goes on, and its role with it.
    assert_eq!(busy.user().await.unwrap(), first, "not closed inside a transaction");
    assert!(env.pg.role_exists(&first).await, "not revoked under an open transaction");
    busy.query("COMMIT").await.unwrap();
    let e = busy.closed_by_proxy(Duration::from_secs(5)).await.expect("closed once committed");
    assert_eq!(e.code, "57P01", "{e:?}");
    assert!(eventually(10, async || !env.pg.role_exists(&first).await).await, "revoked then: {}", agent.output());
    // New sessions are the new user's.
    let mut next = Session::connect(port, None).await.unwrap();
    assert_ne!(next.user().await.unwrap(), first);
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_holds_replaced_connections_until_the_client_closes_or_the_lease_ends() {
    let extra = "      replaced_connections: keep\n      local_password: true\n";
    let (env, mut agent, port) = proxy_agent("10s", "20s", |env, port, up| kept("db", env, port, up, extra)).await;
    let pw_file = env.secrets().join("db.password");
    assert!(eventually(20, async || std::fs::read_to_string(&pw_file).is_ok_and(|p| p.len() == 32)).await);
    let password = std::fs::read_to_string(&pw_file).unwrap();
    let e = Session::connect(port, Some("wrong")).await.err().expect("a wrong local password is refused");
    assert_eq!((e.code.as_str(), e.message.contains("password authentication failed")), ("28P01", true), "{e:?}");
    assert!(Session::connect(port, None).await.is_err(), "no password, no session");

    let mut old = Session::connect(port, Some(&password)).await.unwrap();
    let first = old.user().await.unwrap();
    let replaced = async || agent.events("replaced").len();
    assert!(eventually(30, async || replaced().await >= 1).await, "{}", agent.output());
    // Past revoke_replaced_after (0s), the session stays, as its user.
    assert_eq!(old.user().await.unwrap(), first, "kept after the replacement");
    let mut new = Session::connect(port, Some(&password)).await.unwrap();
    let second = new.user().await.unwrap();
    assert_ne!(second, first);
    let metrics = metrics(&agent).await;
    for line in [
        "leasehold_proxy_connections_open{secret=\"db\",generation=\"current\"} 1",
        "leasehold_proxy_connections_open{secret=\"db\",generation=\"replaced\"} 1",
        "leasehold_proxy_credential_generation{secret=\"db\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // The old lease cannot outlive its max TTL: the session is closed just
    // before it ends, and its role dropped.
    let e = old.closed_by_proxy(Duration::from_secs(15)).await.expect("closed before the lease ends");
    assert_eq!(e.code, "57P01", "{e:?}");
    assert!(eventually(10, async || !env.pg.role_exists(&first).await).await, "{}", agent.output());

    // A client that closes its session of replaced credentials: the lease
    // is revoked then, without waiting for the lease's end.
    assert!(eventually(30, async || replaced().await >= 2).await, "{}", agent.output());
    assert_eq!(new.user().await.unwrap(), second, "kept after the second replacement");
    new.send(b'X', b"").await;
    drop(new);
    assert!(eventually(10, async || !env.pg.role_exists(&second).await).await, "{}", agent.output());
    let drained = logged_leases(&agent, "draining", "old_lease");
    let revoked = logged_leases(&agent, "revoked", "lease");
    assert_eq!(drained.len(), 1, "only the first lease was drained: {drained:?}");
    assert_eq!(revoked.len(), 2, "both replaced leases revoked: {revoked:?}\n{}", agent.output());
    assert!(!drained.contains(&revoked[1]), "the second was revoked when its client left");

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(!agent.output().contains(&password), "the local password is never logged");
    assert!(!metrics.contains(&password));
    for u in [first, second] {
        assert!(!env.pg.role_exists(&u).await, "{u} dropped");
    }
}

/// What a hostile upstream does after asking for SCRAM-SHA-256.
#[derive(Clone, Copy)]
enum Hostile {
    /// A server-first message asking for u32::MAX PBKDF2 iterations.
    IterationBomb,
    /// `AuthenticationOk` right after the client-first message, without the
    /// server ever proving it knows the password.
    OkWithoutProof,
}

/// A fake PostgreSQL server on a free port, answering every login as `how`.
async fn hostile_upstream(how: Hostile) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let auth = |code: i32, rest: &[u8]| {
                    let mut m = vec![b'R'];
                    m.extend_from_slice(&((8 + rest.len()) as i32).to_be_bytes());
                    m.extend_from_slice(&code.to_be_bytes());
                    m.extend_from_slice(rest);
                    m
                };
                // The startup message (length-prefixed, no type byte).
                let Ok(len) = s.read_i32().await else { return };
                let mut startup = vec![0u8; len as usize - 4];
                if s.read_exact(&mut startup).await.is_err() {
                    return;
                }
                let _ = s.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).await;
                // SASLInitialResponse: 'p', length, mechanism, length, client-first.
                let (Ok(_), Ok(len)) = (s.read_u8().await, s.read_i32().await) else { return };
                let mut body = vec![0u8; len as usize - 4];
                if s.read_exact(&mut body).await.is_err() {
                    return;
                }
                let text = String::from_utf8_lossy(&body).to_string();
                let Some(nonce) = text.split("r=").nth(1) else { return };
                let reply = match how {
                    Hostile::IterationBomb => {
                        auth(11, format!("r={nonce}evil,s=QSXCR+Q6sek8bf92,i={}", u32::MAX).as_bytes())
                    }
                    Hostile::OkWithoutProof => auth(0, b""),
                };
                let _ = s.write_all(&reply).await;
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
            });
        }
    });
    port
}

/// #23: an upstream asking for billions of PBKDF2 iterations froze the whole
/// agent (probes, renewals, SIGTERM); one saying "ok" before proving it
/// knows the password was believed. Both are refused with a clear error,
/// and the agent answers its probes throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_upstream_can_neither_freeze_the_agent_nor_skip_the_proof() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let (bomb, ok, good) = (free_port(), free_port(), free_port());
    let bomb_up = format!("127.0.0.1:{}", hostile_upstream(Hostile::IterationBomb).await);
    let ok_up = format!("127.0.0.1:{}", hostile_upstream(Hostile::OkWithoutProof).await);
    let upstream = format!("127.0.0.1:{}", env.pg.port);
    let secrets = [
        proxied("bomb", &env, bomb, &bomb_up, "disable"),
        proxied("okay", &env, ok, &ok_up, "disable"),
        proxied("db", &env, good, &upstream, "disable"),
    ]
    .concat();
    let mut agent = env.spawn(&env.config_with_secrets(&secrets)).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let addr = agent.telemetry_addr().unwrap();

    let bombs: Vec<_> = (0..4).map(|_| tokio::spawn(query(bomb))).collect();
    // The probes answer while the bombs are under way.
    for _ in 0..5 {
        let probe = reqwest::Client::new().get(format!("http://{addr}/healthz")).timeout(Duration::from_secs(1));
        let status = probe.send().await.map(|r| r.status().as_u16());
        assert_eq!(status.as_ref().ok(), Some(&200), "/healthz during an iteration bomb: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for b in bombs {
        let e = b.await.unwrap().expect_err("a bomb never logs in");
        assert!(e.contains("iterations, more than the 100000 allowed"), "{e}");
    }
    let e = query(ok).await.expect_err("no proof, no login");
    assert!(e.contains("without proving it knows the password"), "{e}");
    query(good).await.expect("the good proxy still serves");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

/// #23: 200 silent connections once held the proxy's tasks forever, and out
/// of descriptors its accept loop spun, logging 264 MB in 20 s. Now a
/// silent client is closed after `startup_timeout`, and failing accepts back
/// off and are logged once a while; a legitimate client is served after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_closed_and_failing_accepts_back_off() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let port = free_port();
    let upstream = format!("127.0.0.1:{}", env.pg.port);
    let secret = proxied("db", &env, port, &upstream, "disable") + "      startup_timeout: 1s\n";
    let mut agent = env.spawn(&env.config_with_secrets(&secret)).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    query(port).await.expect("served before");

    // 100 clients that never say a word: each closed (08P01) after 1 s.
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let started = Instant::now();
    for mut s in silent {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await.expect("closed").unwrap();
        assert_eq!(answer.first(), Some(&b'E'), "an ErrorResponse first");
        assert!(String::from_utf8_lossy(&answer).contains("no startup packet within 1s"));
    }
    assert!(started.elapsed() < Duration::from_secs(5), "all closed within {:?}", started.elapsed());

    // Out of descriptors: the agent's limit set to what it holds now plus 4.
    let pid = agent.child.id().unwrap();
    let held = crate::support::settled_fds(pid).await;
    let (soft, limit) = crate::support::nofile(pid);
    limit(held + 4);
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.extend(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let warnings = agent.events("proxy_accept_failed");
    assert!(
        !warnings.is_empty() && warnings.len() <= 2,
        "{} accept warnings in 3 s:\n{}",
        warnings.len(),
        agent.output()
    );
    drop(flood);
    limit(soft);
    assert!(eventually(10, async || query(port).await.is_ok()).await, "served after:\n{}", agent.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_capped_and_the_agent_keeps_writing_its_files() {
    // #23: 2,000 silent connections (no password is asked before the
    // startup packet) held 2,000 descriptors and tasks; under `ulimit -n
    // 256` the agent failed its state and credential writes. With the
    // defaults (max_connections 256, a reserve of 192 descriptors) the
    // proxy holds at most 32 connections there, and the rest are told
    // 53300 at once.
    let env = Env::new(Ttls { db_ttl: "6s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let port = free_port();
    let upstream = format!("127.0.0.1:{}", env.pg.port);
    let secret = proxied("db", &env, port, &upstream, "disable");
    let mut agent = env.spawn(&env.config_with_secrets(&secret)).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let pid = agent.child.id().unwrap();
    let (soft, limit) = crate::support::nofile(pid);
    limit(256);
    let mut silent = Vec::new();
    let mut refused = 0;
    for _ in 0..2000 {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { continue };
        if silent.len() < 50 {
            silent.push(s);
            continue;
        }
        // Told at once, or not at all: without the cap the connection is
        // held, and after 20 of those the flood is not worth going on with.
        let mut answer = Vec::new();
        if tokio::time::timeout(Duration::from_millis(500), s.read_to_end(&mut answer)).await.is_ok()
            && String::from_utf8_lossy(&answer).contains("too many connections")
        {
            refused += 1;
        } else {
            silent.push(s);
            if silent.len() > 70 {
                break;
            }
        }
    }
    assert!(refused >= 1900, "{refused} of 1,950 told 53300:\n{}", agent.output());
    // The cap held: renewals (every 3 s) and a re-issue's files go on.
    let renewed = agent.events("renewed").len();
    assert!(eventually(15, async || agent.events("renewed").len() > renewed).await, "{}", agent.output());
    assert!(agent.events("render_failed").is_empty() && agent.output().matches("state_write_failed").count() == 0);
    let capped = agent.events("proxy_connections_capped");
    assert!(!capped.is_empty() && capped.len() <= 3, "{} cap warnings:\n{}", capped.len(), agent.output());
    drop(silent);
    limit(soft);
    assert!(eventually(15, async || query(port).await.is_ok()).await, "served after:\n{}", agent.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

/// #23: every CancelRequest opened an upstream connection, whoever sent
/// it. Now only a key the proxy handed out to a live session is forwarded:
/// 500 made-up ones open nothing, and a real one still cancels its query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_cancel_keys_the_proxy_handed_out_reach_the_database() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let (relay, upstream_connections) =
        crate::support::forward("127.0.0.1", format!("127.0.0.1:{}", env.pg.port)).await;
    let port = free_port();
    let mut agent =
        env.spawn(&env.config_with_secrets(&proxied("db", &env, port, &relay.to_string(), "disable"))).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let mut session = Session::connect(port, None).await.expect("a session through the proxy");
    assert_eq!(session.key.len(), 8, "the server's key reached the client");
    let before = upstream_connections.load(Ordering::SeqCst);

    let forged = (0..500u32).map(|i| {
        let mut key = session.key.clone();
        let secret = u32::from_be_bytes([key[4], key[5], key[6], key[7]]) ^ (i + 1);
        key[4..].copy_from_slice(&secret.to_be_bytes());
        tokio::spawn(async move { Session::cancel(port, &key).await })
    });
    for f in forged.collect::<Vec<_>>() {
        f.await.unwrap();
    }
    let opened = upstream_connections.load(Ordering::SeqCst) - before;
    assert!(opened <= 3, "500 forged cancel requests opened {opened} upstream connections");

    // The real key still cancels the session's query.
    let e = session.cancelled_query(port, "SELECT pg_sleep(30)").await;
    assert_eq!(e.code, "57014", "{e:?}");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}
