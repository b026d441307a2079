//! Vault failures injected with devvault's faults.

mod common;

use std::time::Duration;

use common::{Env, Ttls, eventually};
use nix::sys::signal::Signal;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_503s_on_renew_are_retried_and_the_lease_kept() {
    let env = Env::new(Ttls { db_ttl: "4s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let fault = json!({"path_prefix": "sys/leases/renew", "method": "PUT", "status": 503, "errors": ["overloaded"], "count": 2});
    env.api.ok("POST", "sys/devvault/faults", Some(fault)).await;
    let mut agent = env.spawn(&env.config("", "")).await;
    let renewed =
        eventually(20, async || env.requests().await.iter().any(|r| r.path == "sys/leases/renew" && r.status == 200))
            .await;
    assert!(renewed, "{}", agent.output());
    let reqs = env.requests().await;
    let statuses: Vec<u16> = reqs.iter().filter(|r| r.path == "sys/leases/renew").map(|r| r.status).collect();
    assert_eq!(&statuses[..3], &[503, 503, 200]);
    assert_eq!(reqs.iter().filter(|r| r.path == "database/creds/app").count(), 1, "same lease kept");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_not_found_on_renew_reissues() {
    let env = Env::new(Ttls { db_ttl: "4s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let fault = json!({"path_prefix": "sys/leases/renew", "status": 400, "errors": ["lease not found"], "count": 1});
    env.api.ok("POST", "sys/devvault/faults", Some(fault)).await;
    let mut agent = env.spawn(&env.config("", "")).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let first = env.read_json("db.json").unwrap()["username"].clone();
    let reissued =
        eventually(10, async || env.requests().await.iter().filter(|r| r.path == "database/creds/app").count() == 2)
            .await;
    assert!(reissued, "{}", agent.output());
    assert!(eventually(5, async || env.read_json("db.json").unwrap()["username"] != first).await);
    assert_eq!(agent.events("lease_gone").len(), 1);
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_at_start_is_retried_and_files_never_truncated() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let existing = env.secrets().join("db.json");
    std::fs::write(&existing, "{\"username\": \"previous\"}").unwrap();
    let fault = json!({"path_prefix": "database/creds/app", "drop": true, "count": 5});
    env.api.ok("POST", "sys/devvault/faults", Some(fault)).await;
    let mut agent = env.spawn(&env.config("", "")).await;
    assert!(eventually(5, async || !agent.events("issue_failed").is_empty()).await, "{}", agent.output());
    assert_eq!(env.read_json("db.json").unwrap()["username"], "previous", "old file untouched while Vault fails");
    assert!(
        eventually(20, async || env.read_json("db.json").unwrap()["username"] != "previous").await,
        "{}",
        agent.output()
    );
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0);
}
