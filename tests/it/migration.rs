//! #22: sessions that outlive their credentials. With the proxy's
//! defaults, a session kept open across rotations moves to each new user at
//! an idle point, its `SET`s and prepared statements with it, and its cancel
//! key still cancels; one holding a temporary table stays on its old user,
//! whose lease is kept alive, until just before that lease ends, and is then
//! closed with an error that says why. Real binary, OpenBao, PostgreSQL 15.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::proxy::{PgError, Session, kept, metrics, proxy_agent};
use crate::support::eventually;
use nix::sys::signal::Signal;

impl Session {
    /// `Parse` of a named statement (types left to the server), `Sync`.
    async fn prepare(&mut self, name: &str, sql: &str) -> Result<(), PgError> {
        self.send(b'P', format!("{name}\0{sql}\0\0\0").as_bytes()).await;
        self.send(b'S', b"").await;
        self.rows().await.map(|_| ())
    }

    /// `Bind` and `Execute` of a named statement with text parameters,
    /// `Sync`: the first column of each row.
    async fn execute(&mut self, name: &str, params: &[&str]) -> Result<Vec<String>, PgError> {
        let mut bind = format!("\0{name}\0").into_bytes();
        bind.extend_from_slice(&0i16.to_be_bytes());
        bind.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            bind.extend_from_slice(&(p.len() as i32).to_be_bytes());
            bind.extend_from_slice(p.as_bytes());
        }
        bind.extend_from_slice(&0i16.to_be_bytes());
        self.send(b'B', &bind).await;
        self.send(b'E', b"\0\0\0\0\0").await;
        self.send(b'S', b"").await;
        self.rows().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_move_to_new_credentials_unseen_and_those_that_cannot_are_closed_at_their_leases_end() {
    let (env, mut agent, port) = proxy_agent("2s", "4s", |env, port, up| kept("db", env, port, up, "")).await;
    let mut moving = Session::connect(port, None).await.expect("a session");
    moving.query("SET statement_timeout = '7s'").await.unwrap();
    moving.query("SET search_path = pg_catalog, public").await.unwrap();
    moving
        .prepare("s1", "SELECT current_user || ' ' || current_setting('statement_timeout') || ' ' || $1::text")
        .await
        .unwrap();
    let mut holding = Session::connect(port, None).await.unwrap();
    let first = holding.user().await.unwrap();
    holding.query("CREATE TEMP TABLE scratch AS SELECT 1 AS x").await.unwrap();

    // Both sessions query every 100 ms; the moving one until it has been
    // four users, the holding one until the proxy closes it.
    let mut users = Vec::new();
    let mut pids = BTreeSet::new();
    let mut holding_end: Option<PgError> = None;
    let mut holding_ok_after_replacement = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (users.iter().collect::<BTreeSet<_>>().len() < 4 || holding_end.is_none()) && Instant::now() < deadline {
        let row = moving.execute("s1", &["x"]).await.unwrap_or_else(|e| panic!("{e:?}\n{}", agent.output()));
        let [user, timeout, x] = row[0].split(' ').collect::<Vec<_>>()[..] else { panic!("{row:?}") };
        assert_eq!((timeout, x), ("7s", "x"), "the session's SET moved with it");
        users.push(user.to_string());
        pids.insert(moving.query("SELECT pg_backend_pid()").await.unwrap().remove(0));
        if holding_end.is_none() {
            match holding.query("SELECT current_user || ' ' || count(*) FROM scratch").await {
                Ok(r) => {
                    assert_eq!(r[0], format!("{first} 1"), "still the first user, its table there");
                    if !agent.events("replaced").is_empty() {
                        holding_ok_after_replacement += 1;
                    }
                }
                Err(e) => holding_end = Some(e),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let distinct: BTreeSet<&String> = users.iter().collect();
    assert!(distinct.len() >= 4, "three migrations: {distinct:?}\n{}", agent.output());
    assert!(pids.len() >= 4, "each on a new server connection: {pids:?}");
    for u in &distinct {
        assert!(u.starts_with("v-"), "a Vault-made user: {u}");
    }
    // Users only move forward: none came back.
    let mut order: Vec<&String> = Vec::new();
    for u in &users {
        if order.last() != Some(&u) {
            assert!(!order.contains(&u), "{u} came back: {users:?}");
            order.push(u);
        }
    }
    let e = holding_end.expect("the holding session is closed before its lease ends");
    assert_eq!(e.code, "57P01", "{e:?}");
    assert!(e.message.contains("temporary tables"), "the error says why: {e:?}");
    assert!(holding_ok_after_replacement > 0, "it worked on after the replacement\n{}", agent.output());
    assert!(eventually(10, async || !env.pg.role_exists(&first).await).await, "{}", agent.output());

    // The client's cancel key follows the session to its current server.
    let e = moving.cancelled_query(port, "SELECT pg_sleep(5)").await;
    assert_eq!(e.code, "57014", "{e:?}");

    let metrics = metrics(&agent).await;
    let migrated = metrics
        .lines()
        .find_map(|l| l.strip_prefix("leasehold_proxy_sessions_migrated_total{secret=\"db\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("a migration counter in\n{metrics}"));
    assert!(migrated >= 3, "{migrated} migrations");
    assert!(metrics.contains("leasehold_proxy_sessions_unmigratable_total{secret=\"db\"} 1"), "{metrics}");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    for u in distinct {
        assert!(!env.pg.role_exists(u).await, "{u} dropped");
    }
}
