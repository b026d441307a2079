//! #22: what a client sees of the proxy's protocol is what PostgreSQL
//! would show it: protocol 3.2 and `_pq_.` options negotiated down in the
//! server's own message (compared with PostgreSQL 15's in the same run),
//! login errors with the server's SQLSTATE (53300 from the real server,
//! 57P03 from a stand-in that is starting up), the pod named in the
//! server's `application_name`, an upstream login bounded when the server
//! never answers, a cancel connection closed
//! only after the server closed its own, and a connection that says nothing
//! no failure.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::sync::Arc;
use std::time::Duration;

use crate::proxy::{Session, free_port, metrics, proxied};
use crate::support::{Env, Ttls, eventually};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// A startup packet: protocol 3.`minor`, these parameters.
fn startup(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = (0x0003_0000i32 | minor as i32).to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(format!("{k}\0{v}\0").as_bytes());
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// The first message a server answers `packet` with.
async fn first_answer(port: u16, packet: &[u8]) -> (u8, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(packet).await.unwrap();
    let kind = s.read_u8().await.unwrap();
    let len = s.read_i32().await.unwrap();
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body).await.unwrap();
    (kind, body)
}

/// A stand-in database that is starting up: every login is answered as
/// PostgreSQL answers it then.
async fn starting_up() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut len = [0u8; 4];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut rest = vec![0u8; i32::from_be_bytes(len) as usize - 4];
                let _ = s.read_exact(&mut rest).await;
                let body = b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0";
                let mut e = vec![b'E'];
                e.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
                e.extend_from_slice(body);
                let _ = s.write_all(&e).await;
            });
        }
    });
    addr
}

/// A relay to the database that holds each cancel connection open, after
/// the server took it, until `release`: as a server busy signalling its
/// backend would.
async fn slow_cancels(to: String, release: Arc<Notify>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let (to, release) = (to.clone(), release.clone());
            tokio::spawn(async move {
                let mut head = [0u8; 8];
                if inbound.read_exact(&mut head).await.is_err() {
                    return;
                }
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&to).await else { return };
                let _ = outbound.write_all(&head).await;
                if head[4..] == 80_877_102i32.to_be_bytes() {
                    let mut key = [0u8; 8];
                    let _ = inbound.read_exact(&mut key).await;
                    let _ = outbound.write_all(&key).await;
                    release.notified().await;
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_speaks_to_clients_as_postgresql_does() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let (port, starting_port, silent_port) = (free_port(), free_port(), free_port());
    // A database that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let release = Arc::new(Notify::new());
    let db = slow_cancels(format!("127.0.0.1:{}", env.pg.port), release.clone()).await;
    let secrets = format!(
        "{}{}{}",
        proxied("db", &env, port, &db, "disable"),
        proxied("starting", &env, starting_port, &starting_up().await, "disable"),
        proxied("silent", &env, silent_port, &silent_addr, "disable")
    );
    // As the downward API sets them in a pod.
    let config = env.config_with_secrets(&secrets).display().to_string();
    let command = ["env", "POD_NAME=api-7d9f", "POD_NAMESPACE=shop", "leasehold", "agent", "-c", &config];
    let mut agent = crate::support::Agent::spawn_command(&command, env.dir.path()).await;
    assert!(eventually(20, async || env.read_json("starting.json").is_some()).await, "{}", agent.output());

    // Protocol 3.2 with an option: the server's NegotiateProtocolVersion,
    // byte for byte.
    let packet = startup(2, &[("user", "postgres"), ("database", "postgres"), ("_pq_.test_option", "1")]);
    let direct = first_answer(env.pg.port, &packet).await;
    let proxied = first_answer(port, &packet).await;
    assert_eq!(direct.0, b'v', "PostgreSQL negotiates: {direct:?}");
    assert_eq!(proxied, direct, "the proxy answers as PostgreSQL does");
    // Then the session goes on as 3.0.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&startup(2, &[("user", "x"), ("database", "postgres")])).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.last() != Some(&b'Z') {
        let kind = s.read_u8().await.unwrap();
        let len = s.read_i32().await.unwrap();
        let mut body = vec![0u8; len as usize - 4];
        s.read_exact(&mut body).await.unwrap();
        kinds.push(kind);
    }
    assert_eq!((kinds[0], kinds[1]), (b'v', b'R'), "negotiated, then logged in: {kinds:?}");

    // The server sees which pod holds the session (attribution).
    let mut session = Session::connect(port, None).await.unwrap();
    let app = session.query("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()").await;
    assert_eq!(app.unwrap(), ["leasehold [shop/api-7d9f]"]);

    // Login errors keep the server's SQLSTATE and message.
    let admin = env.pg.admin().await;
    admin.batch_execute("CREATE DATABASE full_up CONNECTION LIMIT 0").await.unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&startup(0, &[("user", "x"), ("database", "full_up")])).await.unwrap();
    // After AuthenticationOk, as PostgreSQL checks a database's limit then.
    let (mut kind, mut body) = crate::proxy::read_message(&mut s).await;
    while kind == b'R' {
        (kind, body) = crate::proxy::read_message(&mut s).await;
    }
    let e = crate::proxy::pg_error(&body);
    assert_eq!(kind, b'E');
    assert_eq!((e.code.as_str(), e.message.as_str()), ("53300", "too many connections for database \"full_up\""));
    let e = Session::connect(starting_port, None).await.err().expect("refused");
    assert_eq!((e.code.as_str(), e.message.as_str()), ("57P03", "the database system is starting up"));
    // A database that never answers: the login is bounded (15 s), and said.
    let e = Session::connect(silent_port, None).await.err().expect("given up");
    assert_eq!(e.code, "08006", "{e:?}");
    assert!(e.message.contains("no login within 15s"), "{e:?}");

    // A cancel connection ends after the server's: not before it is taken.
    let mut session = Session::connect(port, None).await.unwrap();
    let key = session.key.clone();
    let query = tokio::spawn(async move { session.query("SELECT pg_sleep(10)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut cancel = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102i32.to_be_bytes());
    packet.extend_from_slice(&key);
    cancel.write_all(&packet).await.unwrap();
    let mut rest = Vec::new();
    let early = tokio::time::timeout(Duration::from_millis(500), cancel.read_to_end(&mut rest)).await;
    assert!(early.is_err(), "the client's cancel connection stays open while the server's does: {early:?}");
    release.notify_waiters();
    let closed = tokio::time::timeout(Duration::from_secs(5), cancel.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "closed once the server closed: {closed:?}");
    let e = query.await.unwrap().expect_err("cancelled");
    assert_eq!(e.code, "57014", "{e:?}");

    // Connections that close before saying anything (TCP health checks).
    for _ in 0..20 {
        drop(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let m = metrics(&agent).await;
    assert!(
        m.contains("leasehold_proxy_connections_failed_total{secret=\"db\"} 1\n"),
        "only the 53300 one: {:?}",
        agent.events("proxy_connection_failed")
    );
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}
