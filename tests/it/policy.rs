//! Least privilege: the agent renews and revokes by the path forms
//! (`sys/leases/renew/<lease_id>`, `sys/leases/revoke/<lease_id>`), so
//! deploy/vault/leasehold-policy.hcl grants them under the role's prefix only
//! and the whole lifecycle works with it, even without the default policy.
//! A broader, older policy that grants only the body forms still works.

use std::time::Duration;

use crate::support::{Env, Ttls, eventually};
use nix::sys::signal::Signal;
use serde_json::json;

async fn set_policy(env: &Env, policy: &str, no_default_policy: bool) {
    env.api.ok("PUT", "sys/policies/acl/app", Some(json!({"policy": policy}))).await;
    let role = json!({"token_no_default_policy": no_default_policy});
    env.api.ok("POST", "auth/kubernetes/role/app", Some(role)).await;
}

/// Runs the agent until it renewed `renewals` times, stops it, and returns
/// the requests and the username it last had.
async fn lifecycle(env: &Env, renewals: usize) -> (Vec<crate::support::Req>, String) {
    let mut agent = env.spawn(&env.config("", "")).await;
    let renewed = eventually(20, async || {
        env.requests().await.iter().filter(|r| r.path == "sys/leases/renew" && r.status == 200).count() >= renewals
    })
    .await;
    assert!(renewed, "{}", agent.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    let user = env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string();
    (env.requests().await, user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_policy_runs_the_lifecycle_without_the_default_policy() {
    let env = Env::new(Ttls { db_ttl: "2s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/vault/leasehold-policy.hcl"))
        .unwrap()
        .replace("database/creds/app-role", "database/creds/app");
    set_policy(&env, &shipped, true).await;
    let (reqs, user) = lifecycle(&env, 2).await;
    assert!(!env.pg.role_exists(&user).await, "role dropped at shutdown");
    let leases: Vec<_> = reqs.iter().filter(|r| r.path.starts_with("sys/leases/re")).collect();
    // Every renewal and the revocation used the path form, and none was refused.
    assert!(leases.iter().all(|r| r.lease.is_some() && (r.status == 200 || r.status == 204)), "{leases:?}");
    assert!(reqs.iter().any(|r| r.path == "sys/leases/revoke" && r.status == 204), "{leases:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_form_policy_falls_back_once_then_keeps_to_the_body_form() {
    let env = Env::new(Ttls { db_ttl: "2s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let broad = r#"
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"#;
    set_policy(&env, broad, true).await;
    let (reqs, user) = lifecycle(&env, 3).await;
    assert!(!env.pg.role_exists(&user).await, "role dropped at shutdown");
    for route in ["sys/leases/renew", "sys/leases/revoke"] {
        let calls: Vec<(bool, u16)> =
            reqs.iter().filter(|r| r.path == route).map(|r| (r.lease.is_some(), r.status)).collect();
        // One refused path form, then the body form only.
        assert_eq!(calls[0], (true, 403), "{route}: {calls:?}");
        assert!(calls[1..].iter().all(|&(path_form, status)| !path_form && status < 300), "{route}: {calls:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_renewals_are_replaced_in_time_without_a_storm() {
    // No renew grant at all (and no default policy, which has one): every
    // renewal is refused with 403. The app's credentials must stay valid.
    let env = Env::new(Ttls { db_ttl: "4s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let no_renew = r#"
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/revoke/database/creds/app/*" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/revoke-self" { capabilities = ["update"] }
"#;
    set_policy(&env, no_renew, true).await;
    let mut agent = env.spawn(&env.config("    revoke_replaced_after: 1s", "")).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let mut users = std::collections::BTreeSet::new();
    let mut checks = 0;
    // The app's view for three lease lifetimes: whatever the file holds logs in.
    let watched = eventually(30, async || {
        let creds = env.read_json("db.json").unwrap();
        let user = creds["username"].as_str().unwrap().to_string();
        let ok = env.pg.connect(&user, creds["password"].as_str().unwrap()).await.is_ok();
        assert!(ok, "the file held dead credentials ({user}):\n{}", agent.output());
        users.insert(user);
        checks += 1;
        users.len() >= 4
    })
    .await;
    assert!(watched && checks > 20, "re-issued three times: {users:?}\n{}", agent.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    for user in &users {
        assert!(!env.pg.role_exists(user).await, "{user} dropped");
    }
    let reqs = env.requests().await;
    let creds: Vec<_> = reqs.iter().filter(|r| r.path == "database/creds/app").collect();
    let renews: Vec<_> = reqs.iter().filter(|r| r.path == "sys/leases/renew").collect();
    assert!(renews.iter().all(|r| r.status == 403), "{renews:?}");
    // Each lease was replaced while it still had more than a second to live
    // (its TTL is 4 s), not after it died.
    for pair in creds.windows(2) {
        let gap = crate::support::secs_between(pair[0].time, pair[1].time);
        assert!(gap < 3.0, "replaced {gap:.2} s after issue:\n{}", agent.output());
    }
    // Backoff, not a storm: a couple of tries per lease (path and body form).
    assert!(renews.len() <= 4 * creds.len(), "{} renewals for {} leases", renews.len(), creds.len());
    assert!(!agent.events("renewals_failing").is_empty(), "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drops_the_role_by_revoking_the_lease_when_revoke_self_is_denied() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let no_revoke_self = r#"
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/revoke/database/creds/app/*" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
"#;
    set_policy(&env, no_revoke_self, true).await;
    let mut agent = env.spawn(&env.config("", "")).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let user = env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string();
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    let reqs = env.requests().await;
    assert!(reqs.iter().any(|r| r.path == "auth/token/revoke-self" && r.status == 403), "revoke-self refused");
    assert!(!env.pg.role_exists(&user).await, "the lease's own revocation dropped the role");
}
