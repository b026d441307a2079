//! A secret read by POST with a body: certificates from the PKI
//! engine (`pki/issue/<role>`), leased and not renewable, so the agent
//! re-issues them before they end and revokes them at SIGTERM.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::support::{Env, Ttls, eventually, secs_between};
use devvault::testing::setup_pki;
use nix::sys::signal::Signal;

fn config(env: &Env, ttl: &str, extra: &str) -> std::path::PathBuf {
    let secrets = format!(
        r#"  - name: tls
    path: pki/issue/web
    method: POST
    body:
      common_name: app.example.com
      ttl: {ttl}
    revoke_replaced_after: 1s
    files:
      - path: {dir}/tls.crt
        template: "{{{{ data.certificate }}}}"
        mode: "0444"
      - path: {dir}/tls.key
        template: "{{{{ data.private_key }}}}"
        mode: "0400"
      - path: {dir}/serial
        template: "{{{{ data.serial_number }}}}"
      - path: {dir}/expires
        template: "{{{{ expires_at }}}}"
{extra}"#,
        dir = env.secrets().display(),
    );
    env.config_with_secrets(&secrets)
}

fn read(env: &Env, name: &str) -> Option<String> {
    std::fs::read_to_string(env.secrets().join(name)).ok().filter(|s| !s.is_empty())
}

async fn revoked(env: &Env, serial: &str) -> bool {
    let cert = env.api.ok("GET", &format!("pki/cert/{serial}"), None).await;
    cert["data"]["revocation_time"].as_i64().unwrap() > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_by_post_are_reissued_before_they_end_and_revoked_at_sigterm() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    setup_pki(&env.api, "web", "1h", "1h", true).await;
    // 10 s: OpenBao does not revoke a certificate with less than 2 s left
    // (a warning says so), so the replaced one must have more than that
    // revoke_replaced_after (1 s) after its replacement at half its life.
    let mut agent = env.spawn(&config(&env, "10s", "")).await;
    // The last of the four files: all are in place.
    assert!(eventually(20, async || read(&env, "expires").is_some()).await, "{}", agent.output());
    let first = read(&env, "serial").unwrap();
    // The files hold the certificate Vault issued under that serial, with the configured modes.
    let stored = env.api.ok("GET", &format!("pki/cert/{first}"), None).await;
    assert_eq!(read(&env, "tls.crt").unwrap(), stored["data"]["certificate"].as_str().unwrap());
    assert!(read(&env, "tls.key").unwrap().contains("PRIVATE KEY-----"));
    let mode = |f: &str| std::fs::metadata(env.secrets().join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("tls.crt"), mode("tls.key")), (0o444, 0o400));

    // Not renewable: a new certificate comes before the 10 s one ends, and the
    // replaced one is revoked.
    assert!(eventually(10, async || read(&env, "serial").is_some_and(|s| s != first)).await, "{}", agent.output());
    assert!(eventually(10, async || revoked(&env, &first).await).await, "replaced certificate revoked");
    let reqs = env.requests().await;
    let issues: Vec<_> = reqs.iter().filter(|r| r.path == "pki/issue/web").collect();
    assert!(issues.iter().all(|r| r.method == "POST" && r.status == 200), "{issues:?}");
    assert!(reqs.iter().all(|r| r.path != "sys/leases/renew"), "a non-renewable lease is never renewed");

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    let last = read(&env, "serial").unwrap();
    assert!(revoked(&env, &last).await, "the certificate in use is revoked at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unleased_certificates_are_reissued_at_half_their_validity_not_polled() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    setup_pki(&env.api, "web", "1h", "1h", false).await;
    // A one-hour poll would leave the 4 s certificate expired; a one-second
    // poll would mint four certificates a second time round.
    let mut agent = env.spawn(&config(&env, "4s", "    refresh_interval: 1h\n")).await;
    // The last of the four files: all are in place.
    assert!(eventually(20, async || read(&env, "expires").is_some()).await, "{}", agent.output());
    let first = read(&env, "serial").unwrap();
    // No lease, but the certificate's end is known to templates.
    let expires = humantime::parse_rfc3339(&read(&env, "expires").unwrap()).expect("expires_at from `expiration`");
    let left = expires.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    assert!(left <= Duration::from_secs(4), "{left:?}");
    assert!(eventually(10, async || read(&env, "serial").is_some_and(|s| s != first)).await, "{}", agent.output());
    let reqs = env.requests().await;
    let issues: Vec<_> = reqs.iter().filter(|r| r.path == "pki/issue/web").collect();
    assert_eq!(issues.len(), 2, "{issues:?}");
    let gap = secs_between(issues[0].time, issues[1].time);
    // `expiration` is whole seconds, so the validity seen is 3–4 s: half of
    // it, less up to 5 % jitter, plus a scheduling tolerance.
    assert!((1.3..=2.8).contains(&gap), "re-read {gap:.2} s into a 4 s certificate");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}
