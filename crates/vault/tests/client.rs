//! The Vault client's retries, against a raw TCP server in-process: a
//! request whose answer is lost after it reached Vault is never sent again
//! when it issues credentials (a second database user nothing records),
//! while renewals, which are idempotent, are retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use vault::secret::{LeaseId, SecretString};
use vault::{ClientConfig, Vault as _, VaultClient};

/// What the server does with each request it reads in full.
#[derive(Clone, Copy)]
enum Answer {
    /// Closes the connection without a word: the answer is lost.
    Hangup,
    /// 503, as a Vault that failed after acting might.
    Unavailable,
    /// 503 with `Retry-After: 1`.
    Busy,
    /// 307 to this host and port, as a standby points at the leader.
    Redirect(&'static str, u16),
    /// 200 with an empty JSON object.
    Ok,
    /// 200 with a 300 MB body, chunked (no length said) or announced by
    /// Content-Length; the bytes the server managed to send are counted.
    Huge { announced: bool },
}

/// 300 MB, the size #23 measured taking the agent to gigabytes.
const HUGE: usize = 300 << 20;

/// A server that counts the requests it read, answering each with `answer`.
async fn server(answer: Answer) -> (String, Arc<AtomicUsize>) {
    server_counting(answer, Arc::new(AtomicUsize::new(0))).await
}

/// `server`, adding the body bytes it sent to `sent`.
async fn server_counting(answer: Answer, sent: Arc<AtomicUsize>) -> (String, Arc<AtomicUsize>) {
    server_at("127.0.0.1", answer, sent).await
}

/// `server_counting` on another loopback address (Linux answers on all of
/// 127.0.0.0/8): another host, as far as a redirect is concerned.
async fn server_at(host: &str, answer: Answer, sent: Arc<AtomicUsize>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((host, 0)).await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then the body Content-Length announces.
                loop {
                    let Ok(n) = conn.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
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
                            break;
                        }
                    }
                }
                seen.fetch_add(1, Ordering::SeqCst);
                if let Answer::Unavailable = answer {
                    let body = r#"{"errors":["internal error"]}"#;
                    let reply = format!(
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                }
                if let Answer::Busy = answer {
                    let reply = "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n";
                    let _ = conn.write_all(reply.as_bytes()).await;
                }
                if let Answer::Ok = answer {
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                    let _ = conn.write_all(reply.as_bytes()).await;
                }
                if let Answer::Redirect(host, port) = answer {
                    let path = String::from_utf8_lossy(&buf).split(' ').nth(1).unwrap_or("/").to_string();
                    let reply = format!(
                        "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{host}:{port}{path}\r\ncontent-length: 0\r\n\r\n"
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                }
                if let Answer::Huge { announced } = answer {
                    let head = if announced {
                        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {HUGE}\r\n\r\n")
                    } else {
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".into()
                    };
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let block = vec![b' '; 1 << 20];
                    for _ in 0..HUGE >> 20 {
                        let framed = if announced {
                            block.clone()
                        } else {
                            [format!("{:x}\r\n", block.len()).as_bytes(), &block, b"\r\n"].concat()
                        };
                        if conn.write_all(&framed).await.is_err() {
                            return;
                        }
                        sent.fetch_add(block.len(), Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, count)
}

fn client(address: String) -> VaultClient {
    client_with(address, Vec::new())
}

fn client_with(address: String, redirect_hosts: Vec<String>) -> VaultClient {
    VaultClient::new(ClientConfig {
        address,
        ca_cert_pem: None,
        namespace: String::new(),
        request_timeout: Duration::from_secs(5),
        tls_skip_verify: false,
        max_retries: 2,
        redirect_hosts,
    })
    .unwrap()
}

fn token() -> SecretString {
    SecretString::from("s.token".to_string())
}

#[tokio::test]
async fn an_issue_whose_answer_is_lost_is_sent_once() {
    for answer in [Answer::Hangup, Answer::Unavailable] {
        let (addr, count) = server(answer).await;
        let read = client(addr).read_secret(&token(), Method::GET, "database/creds/app", None).await;
        assert!(read.is_err());
        assert_eq!(count.load(Ordering::SeqCst), 1, "GET database/creds/app reached the server this often");
        let (addr, count) = server(answer).await;
        let body = serde_json::json!({"common_name": "app.example.com"});
        let issue = client(addr).read_secret(&token(), Method::POST, "pki/issue/app", Some(&body)).await;
        assert!(issue.is_err());
        assert_eq!(count.load(Ordering::SeqCst), 1, "POST pki/issue/app reached the server this often");
    }
}

#[tokio::test]
async fn a_renewal_whose_answer_is_lost_is_retried() {
    let (addr, count) = server(Answer::Hangup).await;
    let lease = LeaseId::new("database/creds/app/abcdefgh".into());
    let renewed = client(addr).renew_lease(&token(), &lease, Duration::from_secs(60)).await;
    assert!(renewed.is_err());
    assert_eq!(count.load(Ordering::SeqCst), 3, "the renewal and its 2 retries");
}

#[tokio::test]
async fn an_issue_that_could_not_connect_is_retried() {
    // A port nobody listens on: the request never left.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    struct Count(AtomicUsize);
    impl vault::RequestObserver for Count {
        fn observe(&self, _: &'static str, _: u16, _: Duration) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let attempts = Arc::new(Count(AtomicUsize::new(0)));
    let read = client(addr)
        .with_observer(attempts.clone())
        .read_secret(&token(), Method::GET, "database/creds/app", None)
        .await;
    let e = read.unwrap_err();
    assert!(e.is_unsent(), "{e}");
    assert_eq!(attempts.0.load(Ordering::SeqCst), 3, "the attempt and its 2 retries");
}

/// A port nobody listens on.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_redirect_to_a_dead_leader_names_both_addresses_and_retries_the_configured_one() {
    // #21: a standby redirected to the killed leader; the error said only
    // "connection refused", while the configured address was up.
    let dead = dead_port();
    let (addr, count) = server(Answer::Redirect("127.0.0.1", dead)).await;
    let lease = LeaseId::new("database/creds/app/abcdefgh12345678".into());
    let e = client(addr.clone()).renew_lease(&token(), &lease, Duration::from_secs(60)).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains(&format!("redirected by {addr} to http://127.0.0.1:{dead}")), "{text}");
    assert!(!text.contains("abcdefgh12345678"), "the lease id leaked: {text}");
    assert!(e.is_unsent(), "{text}");
    assert_eq!(count.load(Ordering::SeqCst), 3, "each retry asked the configured address again");
}

#[tokio::test]
async fn a_redirect_to_an_unlisted_host_over_http_carries_no_token() {
    // #23: a standby (or whatever answers at the address) could send the
    // token and the login JWT to any host.
    let (elsewhere, reached) = server_at("127.0.0.2", Answer::Ok, Default::default()).await;
    let port: u16 = elsewhere.rsplit(':').next().unwrap().parse().unwrap();
    let (addr, _) = server(Answer::Redirect("127.0.0.2", port)).await;
    let lease = LeaseId::new("database/creds/app/abcdefgh".into());
    let e = client(addr.clone()).renew_lease(&token(), &lease, Duration::from_secs(60)).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("which is not followed") && text.contains("vault.redirect_hosts"), "{text}");
    assert_eq!(reached.load(Ordering::SeqCst), 0, "the token went to the other host");
    // Listed, the same redirect is followed.
    let listed = client_with(addr, vec!["127.0.0.2".into()]);
    listed.renew_lease(&token(), &lease, Duration::from_secs(60)).await.unwrap();
    assert_eq!(reached.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_vault_failing_for_everyone_meets_a_bounded_number_of_retries() {
    // #21: a fleet must not amplify an outage. 30 renewals at once against
    // a Vault answering 503 to all: each may be retried twice, but the
    // client's retry budget (10, refilled 1 a second) caps the extra ones.
    let (addr, count) = server(Answer::Unavailable).await;
    let client = client(addr);
    let lease = LeaseId::new("database/creds/app/abcdefgh".into());
    let mut renewals = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let (client, lease) = (client.clone(), lease.clone());
        renewals.spawn(async move { client.renew_lease(&token(), &lease, Duration::from_secs(60)).await });
    }
    while let Some(result) = renewals.join_next().await {
        assert!(result.unwrap().is_err());
    }
    let sent = count.load(Ordering::SeqCst);
    // 30 first attempts, at most 10 retries from the burst and a few from
    // the refill while they ran (90 without a budget).
    assert!((30..=45).contains(&sent), "{sent} requests for 30 renewals");
}

#[tokio::test]
async fn retry_after_spaces_the_clients_own_retries() {
    // Real time: the server is real and the client's retries sleep on it.
    #[allow(clippy::disallowed_methods)]
    fn at() -> std::time::Instant {
        std::time::Instant::now()
    }
    struct Times(std::sync::Mutex<Vec<std::time::Instant>>);
    impl vault::RequestObserver for Times {
        fn observe(&self, _: &'static str, _: u16, _: Duration) {
            self.0.lock().unwrap().push(at());
        }
    }
    let (addr, count) = server(Answer::Busy).await;
    let times = Arc::new(Times(Default::default()));
    let lease = LeaseId::new("database/creds/app/abcdefgh".into());
    let e = client(addr)
        .with_observer(times.clone())
        .renew_lease(&token(), &lease, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(1)), "{e}");
    assert_eq!(count.load(Ordering::SeqCst), 3);
    let times = times.0.lock().unwrap();
    for pair in times.windows(2) {
        // The backoff alone would start at 0.1 s.
        assert!(pair[1] - pair[0] >= Duration::from_millis(950), "{:?} between retries", pair[1] - pair[0]);
    }
}

#[tokio::test]
async fn an_answer_larger_than_the_cap_is_refused_without_reading_it() {
    for announced in [false, true] {
        let sent = Arc::new(AtomicUsize::new(0));
        let (addr, _) = server_counting(Answer::Huge { announced }, sent.clone()).await;
        let lease = LeaseId::new("database/creds/app/abcdefgh".into());
        let e = client(addr).renew_lease(&token(), &lease, Duration::from_secs(60)).await.unwrap_err();
        assert!(e.to_string().contains("larger than 4 MiB"), "{e}");
        // The client stopped reading at the cap (plus what the sockets
        // buffer): nowhere near the 300 MB offered, three times over.
        let sent = sent.load(Ordering::SeqCst);
        assert!(sent < 64 << 20, "announced {announced}: the server got {} MiB out", sent >> 20);
    }
}

/// #24: a connection error did not name the address it tried.
#[tokio::test]
async fn connection_errors_name_the_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = client(format!("http://127.0.0.1:{port}")).lookup_self(&token()).await.unwrap_err().to_string();
    assert!(e.contains(&format!("http://127.0.0.1:{port}: connection failed")), "{e}");
}
