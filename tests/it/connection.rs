//! How the agent reaches Vault: over HTTPS (a throwaway CA, as `vault server
//! -dev-tls`), trusted through `vault.ca_cert` and refused without it; and
//! `vault.namespace` sent on every request.

use std::time::Duration;

use crate::support::{Env, Ttls, eventually};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_ca_cert_runs_the_whole_lifecycle() {
    let env = Env::new_tls(Ttls { db_ttl: "4s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    assert!(env.url().starts_with("https://"));
    let config = env.config("", "");
    assert!(std::fs::read_to_string(&config).unwrap().contains("ca_cert:"));
    let mut agent = env.spawn(&config).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let creds = env.read_json("db.json").unwrap();
    let user = creds["username"].as_str().unwrap().to_string();
    env.pg.connect(&user, creds["password"].as_str().unwrap()).await.expect("credentials fetched over TLS log in");
    let renewed =
        eventually(15, async || env.requests().await.iter().any(|r| r.path == "sys/leases/renew" && r.status == 200))
            .await;
    assert!(renewed, "renewal over TLS:\n{}", agent.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(!env.pg.role_exists(&user).await, "revoked over TLS");
    let reqs = env.requests().await;
    assert!(reqs.iter().any(|r| r.path == "auth/token/revoke-self" && r.status == 204), "token revoked over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_without_the_ca_is_refused_and_names_the_certificate() {
    let env = Env::new_tls(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let config = env.config("", "");
    let text = std::fs::read_to_string(&config).unwrap();
    let without: String = text.lines().filter(|l| !l.contains("ca_cert:")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&config, without).unwrap();
    let mut agent = env.spawn(&config).await;
    assert!(eventually(10, async || !agent.events("login_failed").is_empty()).await, "{}", agent.output());
    let failure = agent.events("login_failed")[0].to_string();
    assert!(failure.contains("invalid peer certificate: UnknownIssuer"), "the error says why: {failure}");
    // The handshake fails before any request reaches devvault.
    assert!(env.requests().await.iter().all(|r| r.path != "auth/kubernetes/login"));
    assert!(env.read_json("db.json").is_none());
    agent.signal(Signal::SIGTERM);
    assert_eq!(
        agent.wait(Duration::from_secs(15)).await,
        0,
        "nothing was issued, so nothing is left: {}",
        agent.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_is_sent_on_every_request() {
    let ttls = Ttls { db_ttl: "2s", db_max: "1h", token_ttl: "1h", token_max: "2h" };
    // devvault has no namespaces (it refuses the header, as OpenBao refuses
    // an unknown namespace): OpenBao only. The namespace must exist, with its
    // own auth and engine.
    let env = Env::openbao_only(Ttls { ..ttls }).await;
    env.namespace("team-a/apps", &ttls).await;
    let config = env.config("", "");
    let text = std::fs::read_to_string(&config).unwrap().replace("vault:\n", "vault:\n  namespace: team-a/apps\n");
    std::fs::write(&config, text).unwrap();
    let before = env.requests().await.len();
    let mut agent = env.spawn(&config).await;
    let renewed = eventually(15, async || env.requests().await.iter().any(|r| r.path == "sys/leases/renew")).await;
    assert!(renewed, "{}", agent.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    let reqs = env.requests().await.split_off(before);
    // The harness's own requests (this log) carry no namespace.
    let agents: Vec<_> = reqs.iter().filter(|r| !r.namespace.is_empty()).collect();
    for path in [
        "auth/kubernetes/login",
        "database/creds/app",
        "sys/leases/renew",
        "sys/leases/revoke",
        "auth/token/revoke-self",
    ] {
        assert!(agents.iter().any(|r| r.path == path), "{path} sent with the namespace");
    }
    assert!(agents.iter().all(|r| r.namespace == "team-a/apps"), "{agents:?}");
    let without: Vec<_> =
        reqs.iter().filter(|r| r.namespace.is_empty() && !r.path.starts_with("sys/devvault/")).collect();
    assert!(without.iter().all(|r| r.time < agents[0].time), "agent requests without the namespace: {without:?}");
}
