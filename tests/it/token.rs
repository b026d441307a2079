//! The token→lease coupling: credentials are replaced before the token that
//! created them dies, and a token renewal alone never re-issues.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::time::Duration;

use crate::support::{Env, Ttls, eventually, secs_between};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_token_max_ttl_replaces_credentials_before_the_token_dies() {
    // Token: 3 s, at most 6 s. Credentials: 10 s, at most 60 s.
    let env = Env::new(Ttls { db_ttl: "10s", db_max: "60s", token_ttl: "3s", token_max: "6s" }).await;
    let mut agent = env.spawn(&env.config("    revoke_replaced_after: 30s", "")).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let first = env.read_json("db.json").unwrap();

    // The app's view: whatever the file holds can always log in.
    let mut checks = 0;
    let watched = eventually(15, async || {
        let creds = env.read_json("db.json").unwrap();
        let user = creds["username"].as_str().unwrap();
        let ok = env.pg.connect(user, creds["password"].as_str().unwrap()).await.is_ok();
        assert!(ok, "the file held revoked credentials ({user}):\n{}", agent.output());
        checks += 1;
        env.requests().await.iter().filter(|r| r.path == "auth/kubernetes/login").count() >= 3
    })
    .await;
    assert!(watched && checks > 5, "three logins seen");
    assert_ne!(env.read_json("db.json").unwrap()["username"], first["username"]);

    let reqs = env.requests().await;
    let logins: Vec<_> = reqs.iter().filter(|r| r.path == "auth/kubernetes/login").collect();
    let creds: Vec<_> = reqs.iter().filter(|r| r.path == "database/creds/app").collect();
    // The first token dies 6 s after its login; its credentials were replaced,
    // with a token of the next login, before then.
    let dies = logins[0].time + Duration::from_secs(6);
    let replacement = creds.iter().find(|c| c.time > logins[1].time).expect("credentials issued under the new token");
    assert!(replacement.time < dies, "replaced {:.2} s before the token's end", secs_between(replacement.time, dies));
    // The setup problem is named once, with its fix, however often it recurs.
    let warned = agent.events("token_bounds_lease");
    assert_eq!(warned.len(), 1, "{}", agent.output());
    assert!(warned[0]["message"].as_str().unwrap().contains("token_max_ttl"));

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    let user = env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string();
    assert!(!env.pg.role_exists(&user).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_renewal_alone_causes_no_reissue() {
    // Token renews every ~1 s (ttl 2 s, max 1 h); credentials last 30 s.
    let env = Env::new(Ttls { db_ttl: "30s", db_max: "1h", token_ttl: "2s", token_max: "1h" }).await;
    let mut agent = env.spawn(&env.config("", "")).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let renewed = eventually(15, async || {
        env.requests().await.iter().filter(|r| r.path == "auth/token/renew-self" && r.status == 200).count() >= 4
    })
    .await;
    assert!(renewed, "token renewed repeatedly:\n{}", agent.output());
    let reqs = env.requests().await;
    assert_eq!(reqs.iter().filter(|r| r.path == "database/creds/app").count(), 1, "no re-issue");
    assert_eq!(reqs.iter().filter(|r| r.path == "auth/kubernetes/login").count(), 1, "no re-login");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_service_account_token_is_read_again_at_each_login() {
    // Vault tokens of at most 3 s force a login every few seconds.
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "2s", token_max: "3s" }).await;
    // The first JWT dies 4 s from now, as a projected token the kubelet rotates.
    std::fs::write(env.token_path(), env.issuer.mint("default", "app", 4).unwrap()).unwrap();
    let mut agent = env.spawn(&env.config("", "")).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let logins =
        async || env.requests().await.into_iter().filter(|r| r.path == "auth/kubernetes/login").collect::<Vec<_>>();
    let first = logins().await[0].time;
    // The kubelet writes the next token (by rename, as it does).
    let next = env.dir.path().join("sa-token.next");
    std::fs::write(&next, env.issuer.mint("default", "app", 3600).unwrap()).unwrap();
    std::fs::rename(&next, env.token_path()).unwrap();
    let late_login =
        eventually(15, async || logins().await.iter().any(|r| r.status == 200 && secs_between(first, r.time) > 5.0))
            .await;
    assert!(late_login, "logged in with the new JWT after the first one expired:\n{}", agent.output());
    assert!(logins().await.iter().all(|r| r.status == 200), "no login used the expired JWT");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_tokens_are_replaced_at_half_their_life_not_in_a_loop() {
    // OpenBao only: devvault issues service tokens whatever the role says.
    let env = Env::openbao_only(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "4s", token_max: "4s" }).await;
    env.api.ok("POST", "auth/kubernetes/role/app", Some(serde_json::json!({"token_type": "batch"}))).await;
    let mut agent = env.spawn(&env.config("    revoke_replaced_after: 1s", "")).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    let logins = async || env.requests().await.iter().filter(|r| r.path == "auth/kubernetes/login").count();
    let start = std::time::Instant::now();
    // Leases die with the batch token that created them (at most 4 s): the
    // files must always hold live credentials, issued under a newer token.
    let mut users = std::collections::BTreeSet::new();
    while start.elapsed() < Duration::from_secs(9) {
        let creds = env.read_json("db.json").unwrap();
        let user = creds["username"].as_str().unwrap().to_string();
        let ok = env.pg.connect(&user, creds["password"].as_str().unwrap()).await.is_ok();
        assert!(ok, "the file held dead credentials ({user}):\n{}", agent.output());
        users.insert(user);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A 4 s token is replaced about every 2 s: a handful of logins, not
    // hundreds.
    let n = logins().await;
    assert!((3..=8).contains(&n), "{n} logins in 9 s:\n{}", agent.output());
    assert!(users.len() >= 2, "credentials replaced before their token died: {users:?}");

    let before_stop = logins().await;
    let last = env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string();
    let stopped = std::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(stopped.elapsed() < Duration::from_secs(5), "shutdown took {:?}", stopped.elapsed());
    let reqs = env.requests().await;
    // Batch tokens cannot be renewed or revoked: never tried. The lease is
    // revoked by itself, and its role dropped.
    let tried: Vec<_> =
        reqs.iter().filter(|r| r.path == "auth/token/revoke-self" || r.path == "auth/token/renew-self").collect();
    assert!(tried.is_empty(), "{tried:?}\n{}", agent.output());
    assert!(reqs.iter().any(|r| r.path == "sys/leases/revoke" && r.status == 204));
    assert!(logins().await <= before_stop + 1, "no login after SIGTERM (one may have been under way)");
    // The agent revoked the last lease itself: its role is gone at exit.
    assert!(!env.pg.role_exists(&last).await, "{last} dropped at exit:\n{}", agent.output());
    // A replaced lease whose batch token died meanwhile is revoked by
    // OpenBao's expiration manager, in its own time (at most the token's 4 s).
    for user in &users {
        assert!(eventually(6, async || !env.pg.role_exists(user).await).await, "{user} dropped");
    }
}
