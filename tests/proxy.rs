//! The local PostgreSQL proxy (`proxy:`), with the real binary, OpenBao and
//! PostgreSQL 15 (SCRAM-SHA-256): `psql` through the proxy across
//! rotations, what bad clients and upstreams get, and no role left after
//! SIGTERM.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Env, Ttls, eventually};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `psql` through the proxy as a user name that means nothing, no password:
/// the user the server saw (`pg_stat_activity`), or psql's error.
async fn query(port: u16) -> Result<String, String> {
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

fn proxied(name: &str, env: &Env, port: u16, upstream: &str, tls: &str) -> String {
    format!(
        "  - name: {name}\n    path: database/creds/app\n    revoke_replaced_after: 1s\n    files:\n      - path: {}/{name}.json\n        format: json\n    proxy:\n      listen: 127.0.0.1:{port}\n      upstream: {upstream}\n      upstream_tls: {tls}\n",
        env.secrets().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_through_the_proxy_never_fail_across_rotations() {
    let env = Env::new(Ttls { db_ttl: "2s", db_max: "4s", token_ttl: "1h", token_max: "2h" }).await;
    let port = free_port();
    let upstream = format!("127.0.0.1:{}", env.pg.port);
    let mut agent = env.spawn(&env.config_with_secrets(&proxied("db", &env, port, &upstream, "disable"))).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());

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
    let metrics = reqwest::get(format!("http://{}/metrics", agent.telemetry_addr().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
    let secrets = [
        proxied("db", &env, good, &upstream, "disable"),
        proxied("refused", &env, refused, &closed, "disable"),
        // The test cluster has no TLS.
        proxied("notls", &env, no_tls, &upstream, "require"),
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
