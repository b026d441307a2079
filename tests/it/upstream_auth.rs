//! #23: the proxy's login upstream cannot be phished. With the default
//! `upstream_tls: require` the certificate is not checked, so the server
//! must prove, by SCRAM-SHA-256-PLUS bound to this TLS session, that it is
//! the database; a cleartext or md5 password goes only to a verified
//! server. Real PostgreSQL 15 with TLS, a TLS-terminating man in the
//! middle relaying to it, and fake servers asking for cleartext and md5.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::proxy::{free_port, query};
use crate::support::{Env, Ttls, eventually};
use nix::sys::signal::Signal;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A secret whose proxy listens on `port`, with `extra` proxy keys (none:
/// every default).
fn secret(env: &Env, name: &str, port: u16, upstream: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    path: database/creds/app\n    files:\n      - path: {}/{name}.json\n        format: json\n    proxy:\n      listen: 127.0.0.1:{port}\n      upstream: {upstream}\n{extra}",
        env.secrets().display()
    )
}

/// Reads the SSLRequest and accepts TLS with a throwaway certificate of
/// its own, as a man in the middle would.
async fn accept_tls(
    mut s: tokio::net::TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let mut request = [0u8; 8];
    s.read_exact(&mut request).await.ok()?;
    s.write_all(b"S").await.ok()?;
    acceptor.accept(s).await.ok()
}

/// A fake database behind TLS that asks every login for a cleartext
/// password (`code` 3) or an md5 one (5), and keeps every byte the proxy
/// sends after the startup message.
async fn phishing_upstream(code: i32) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = devvault::tls::DevTls::generate().unwrap().acceptor().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let kept = received.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (acceptor, kept) = (acceptor.clone(), kept.clone());
            tokio::spawn(async move {
                let Some(mut s) = accept_tls(s, &acceptor).await else { return };
                let Ok(len) = s.read_i32().await else { return };
                let mut startup = vec![0u8; len as usize - 4];
                if s.read_exact(&mut startup).await.is_err() {
                    return;
                }
                let mut ask = vec![b'R'];
                let salt: &[u8] = if code == 5 { &[1, 2, 3, 4] } else { &[] };
                ask.extend_from_slice(&(8 + salt.len() as i32).to_be_bytes());
                ask.extend_from_slice(&code.to_be_bytes());
                ask.extend_from_slice(salt);
                let _ = s.write_all(&ask).await;
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
                kept.lock().unwrap().extend_from_slice(&rest);
            });
        }
    });
    (port, received)
}

/// A man in the middle: TLS ended with its own certificate, a verified
/// TLS session of its own to the real database, the bytes relayed between.
async fn relay_in_the_middle(env: &Env) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = devvault::tls::DevTls::generate().unwrap().acceptor().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(env.pg.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let db = env.pg.port;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            tokio::spawn(async move {
                let Some(mut victim) = accept_tls(s, &acceptor).await else { return };
                let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", db)).await else { return };
                let mut answer = [0u8; 1];
                let request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
                if tcp.write_all(&request).await.is_err() || tcp.read_exact(&mut answer).await.is_err() {
                    return;
                }
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let Ok(mut server) = connector.connect(name, tcp).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut victim, &mut server).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_login_cannot_be_phished() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let db = format!("127.0.0.1:{}", env.pg.port);
    let ca = env.secrets().parent().unwrap().join("pg-ca.pem");
    std::fs::write(&ca, &env.pg.ca_pem).unwrap();
    let verify = format!("      upstream_tls: verify-full\n      ca_cert: {}\n", ca.display());
    let mitm = format!("127.0.0.1:{}", relay_in_the_middle(&env).await);
    let (cleartext_port, cleartext_got) = phishing_upstream(3).await;
    let (md5_port, md5_got) = phishing_upstream(5).await;
    let ports: Vec<u16> = (0..7).map(|_| free_port()).collect();
    let secrets = [
        secret(&env, "direct", ports[0], &db, ""),
        secret(&env, "verified", ports[1], &db, &verify),
        secret(&env, "mitm", ports[2], &mitm, ""),
        secret(&env, "mitmprefer", ports[3], &mitm, "      channel_binding: prefer\n"),
        secret(&env, "cleartext", ports[4], &format!("127.0.0.1:{cleartext_port}"), ""),
        secret(
            &env,
            "cleartextprefer",
            ports[5],
            &format!("127.0.0.1:{cleartext_port}"),
            "      channel_binding: prefer\n",
        ),
        secret(&env, "md5", ports[6], &format!("127.0.0.1:{md5_port}"), ""),
    ]
    .concat();
    let mut agent = env.spawn(&env.config_with_secrets(&secrets)).await;
    assert!(eventually(20, async || env.read_json("md5.json").is_some()).await, "{}", agent.output());

    // The real database: bound SCRAM by default (plain SCRAM would be
    // refused), and verify-full.
    let user = query(ports[0]).await.expect("the default login to the real database");
    assert!(!user.is_empty() && user != "whoever", "{user}");
    query(ports[1]).await.expect("verify-full");

    // Through the man in the middle the binding cannot match: the database
    // itself refuses (and SCRAM never gave the relay the password).
    for port in [ports[2], ports[3]] {
        let e = query(port).await.expect_err("a login through a man in the middle");
        assert!(e.contains("channel binding"), "{e}");
    }

    // Servers asking for the password itself get nothing, and the client
    // is told why.
    for (port, why) in [
        (ports[4], "channel_binding is require"),
        (ports[5], "its certificate is not verified"),
        (ports[6], "channel_binding is require"),
    ] {
        let e = query(port).await.expect_err("a phishing server");
        assert!(e.contains(why) && e.contains("the password was not sent"), "{e}");
    }
    let passwords: Vec<String> = ["cleartext", "cleartextprefer", "md5"]
        .iter()
        .map(|name| env.read_json(&format!("{name}.json")).unwrap()["password"].as_str().unwrap().to_string())
        .collect();
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    // The fakes have read to the end: the proxy closed its connections.
    let got = [cleartext_got.lock().unwrap().clone(), md5_got.lock().unwrap().clone()].concat();
    for password in &passwords {
        assert!(!String::from_utf8_lossy(&got).contains(password.as_str()), "a password reached a fake server");
    }
    // No PasswordMessage at all ('p'), so no md5 hash either.
    assert!(!got.contains(&b'p'), "the proxy answered a phishing server: {got:?}");
}
