//! Hostile Vault answers against the real binary (#23): an answer of
//! 300 MB, and a redirect to a host that is neither configured nor listed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Env, Ttls, eventually};

/// Reads one request's head (and a body Content-Length announces); its
/// request line.
async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_string))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return text.lines().next().map(str::to_string);
            }
        }
    }
}

/// A fake Vault on `host`: logins succeed; `database/creds/app` answers
/// with `huge` bytes of chunked JSON whitespace (as long as the client
/// reads); with `redirect_to`, everything is a 307 there instead. Counts
/// the requests it read.
async fn fake_vault(host: &str, huge: usize, redirect_to: Option<String>) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((host, 0)).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (seen, redirect_to) = (seen.clone(), redirect_to.clone());
            tokio::spawn(async move {
                while let Some(line) = read_request(&mut conn).await {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                    if let Some(to) = &redirect_to {
                        let head = format!(
                            "HTTP/1.1 307 Temporary Redirect\r\nlocation: {to}{path}\r\ncontent-length: 0\r\n\r\n"
                        );
                        if conn.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if path.contains("/login") {
                        let body = r#"{"auth":{"client_token":"s.fake","accessor":"fakeaccessor","lease_duration":3600,"renewable":true,"token_type":"service"}}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let head =
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let block = [b"100000\r\n".as_slice(), &vec![b' '; 1 << 20], b"\r\n"].concat();
                    for _ in 0..huge >> 20 {
                        if conn.write_all(&block).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
            });
        }
    });
    (url, count)
}

fn with_address(env: &Env, address: &str) -> std::path::PathBuf {
    let config = env.config("", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(&env.url(), address);
    std::fs::write(&config, text).unwrap();
    config
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_mb_vault_answer_leaves_the_agent_under_64_mib() {
    // #23: a 1.5 GB body took the agent to 2.9 GB.
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let (url, _) = fake_vault("127.0.0.1", 300 << 20, None).await;
    let mut agent = env.spawn(&with_address(&env, &url)).await;
    let refused = eventually(30, async || {
        agent
            .events("issue_failed")
            .iter()
            .filter(|e| e["error"].as_str().is_some_and(|t| t.contains("larger than 4 MiB")))
            .count()
            >= 2
    })
    .await;
    assert!(refused, "{}", agent.output());
    let pid = agent.child.id().unwrap();
    let peak = vm_hwm_kib(pid);
    agent.signal(Signal::SIGTERM);
    agent.wait(Duration::from_secs(15)).await;
    assert!(peak > 0 && peak < 64 * 1024, "peak resident set {peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_an_unlisted_host_receives_neither_the_jwt_nor_a_token() {
    // #23: whatever answers at the address could send the login (and its
    // JWT) and every request's token to any host. 127.0.0.2 is another
    // host as far as the agent can tell.
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let (elsewhere, reached) = fake_vault("127.0.0.2", 0, None).await;
    let (standby, _) = fake_vault("127.0.0.1", 0, Some(elsewhere.clone())).await;
    let mut agent = env.spawn(&with_address(&env, &standby)).await;
    let refused = eventually(20, async || {
        agent.events("login_failed").iter().any(|e| {
            e["error"].as_str().is_some_and(|t| t.contains(&format!("to {elsewhere}")) && t.contains("not followed"))
        })
    })
    .await;
    assert!(refused, "{}", agent.output());
    agent.signal(Signal::SIGTERM);
    agent.wait(Duration::from_secs(15)).await;
    assert_eq!(reached.load(Ordering::SeqCst), 0, "the other host was sent a request");
}
