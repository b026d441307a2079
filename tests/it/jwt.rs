//! `auth.jwt`: logging in through OpenBao's JWT auth method, which verifies
//! the ServiceAccount token with `jwt_validation_pubkeys` (no TokenReview,
//! no stand-in): a whole lifecycle on the real server.

use std::time::Duration;

use crate::support::{Env, Server, Ttls, eventually};
use devvault::testing::Setup;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_runs_the_whole_lifecycle_on_openbao() {
    // Tokens of 4 s: renewed (renew-self) during the run, with room under load.
    let ttls = Ttls { db_ttl: "3s", db_max: "7s", token_ttl: "4s", token_max: "1h" };
    let env = Env::openbao_only(Ttls { ..ttls }).await;
    let setup = Setup {
        api: &env.api,
        k8s_role: "app",
        policy: crate::support::POLICY.into(),
        token_ttl: ttls.token_ttl,
        token_max_ttl: ttls.token_max,
    };
    setup.jwt(&env.issuer).await;
    let config = env.config("    revoke_replaced_after: 1s", "");
    env.use_jwt_auth(&config);
    let mut agent = env.spawn(&config).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let first = env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string();
    let rotated = env.rotated_from(&first, 20).await;
    assert!(rotated, "re-issued before the max TTL:\n{}", agent.output());
    let creds = env.read_json("db.json").unwrap();
    let user = creds["username"].as_str().unwrap().to_string();
    env.pg.connect(&user, creds["password"].as_str().unwrap()).await.expect("the new credentials log in");

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(!env.pg.role_exists(&first).await && !env.pg.role_exists(&user).await, "roles dropped");

    let reqs = env.requests().await;
    let logins: Vec<_> = reqs.iter().filter(|r| r.path == "auth/jwt/login").collect();
    assert!(!logins.is_empty() && logins.iter().all(|r| r.status == 200), "{logins:?}");
    assert!(reqs.iter().all(|r| r.path != "auth/kubernetes/login"));
    assert!(reqs.iter().any(|r| r.path == "auth/token/renew-self" && r.status == 200), "the JWT token is renewed");
    // The server's own record: the last lease was revoked by id.
    let lease = creds["lease_id"].as_str().unwrap();
    let revoked = env
        .audit()
        .iter()
        .any(|e| e.kind == "response" && e.path == format!("sys/leases/revoke/{lease}") && e.error.is_empty());
    let revokes: Vec<_> =
        env.audit().into_iter().filter(|e| e.kind == "response" && e.path.contains("revoke")).collect();
    assert!(revoked, "the audit log shows the revocation of {}…: {revokes:?}\n{}", &lease[..24], agent.output());
    match &env.server {
        Server::OpenBao { reviewer, .. } => assert_eq!(reviewer.reviews(), 0, "JWT auth needs no TokenReview"),
        Server::DevVault(_) | Server::Raft { .. } => unreachable!("openbao_only"),
    }
}
