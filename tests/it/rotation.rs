//! Rotation seen from the files: a static role (`database/static-creds`) is
//! re-read right after Vault rotates its password, not polled; `previous` in
//! templates holds the replaced credentials until their lease is revoked.
//! On the real OpenBao (devvault has no static roles).

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use crate::support::{Env, Ttls, eventually};
use nix::sys::signal::Signal;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_role_is_reread_right_after_each_rotation_not_polled() {
    let env = Env::openbao_only(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let user = format!("static_app_{}", std::process::id());
    env.pg
        .admin()
        .await
        .batch_execute(&format!("CREATE ROLE \"{user}\" LOGIN PASSWORD 'set-by-the-dba'"))
        .await
        .expect("the static role's PostgreSQL user");
    let role = json!({ "db_name": "db", "username": user, "rotation_period": "5s" });
    env.api.ok("POST", "database/static-roles/app-static", Some(role)).await;
    let secret = format!(
        "  - name: static\n    path: database/static-creds/app-static\n    refresh_interval: 1h\n    files:\n      - path: {}/static.json\n        format: json\n",
        env.secrets().display()
    );
    let mut agent = env.spawn(&env.config_with_secrets(&secret)).await;
    assert!(eventually(20, async || env.read_json("static.json").is_some()).await, "{}", agent.output());

    // Three rotations: each new password reaches the file within seconds of
    // Vault's rotation, read once for it (refresh_interval is 1 h).
    let mut passwords: Vec<String> = Vec::new();
    let mut lag = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while passwords.len() < 4 && tokio::time::Instant::now() < deadline {
        if let Some(f) = env.read_json("static.json") {
            let p = f["password"].as_str().unwrap_or_default().to_string();
            if passwords.last() != Some(&p) {
                let rotated = humantime::parse_rfc3339_weak(
                    f["last_vault_rotation"].as_str().unwrap().split('.').next().unwrap(),
                )
                .expect("last_vault_rotation");
                lag.push(SystemTime::now().duration_since(rotated).unwrap_or_default().as_secs_f64());
                passwords.push(p);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(passwords.len() >= 4, "three rotations in the file: {}\n{}", passwords.len(), agent.output());
    assert_eq!(passwords.iter().collect::<BTreeSet<_>>().len(), passwords.len(), "each a new password");
    // The first read can come at any point of a period; every later one
    // within seconds of its rotation.
    for l in &lag[1..] {
        assert!(*l < 4.0, "file updated {l:.1} s after the rotation: {lag:?}");
    }
    let last = env.read_json("static.json").unwrap();
    env.pg.connect(&user, last["password"].as_str().unwrap()).await.expect("the file's password logs in");

    // Not polled: reads come at the rotations. OpenBao's rotation queue may
    // run a rotation a few seconds late (`ttl` 0 meanwhile, each read then
    // 1–2 s after the last), but never in a tight loop.
    let reads: Vec<_> =
        env.requests().await.into_iter().filter(|r| r.path == "database/static-creds/app-static").collect();
    assert!(reads.len() <= 4 * passwords.len(), "read {} times for {} passwords", reads.len(), passwords.len());
    for pair in reads.windows(2) {
        let gap = crate::support::secs_between(pair[0].time, pair[1].time);
        // 1–2 s after the last read, which the 128 ms grid (`schedule::SLACK`)
        // may bring forward: 0.87 s at the least (0.89 s was seen once).
        assert!(gap >= 0.85, "two reads {gap:.2} s apart: {:?}", reads.iter().map(|r| r.time).collect::<Vec<_>>());
    }
    // Files are rewritten only when the password changed.
    let written = agent.events("rendered").iter().filter(|e| e["secret"] == "static" && e["changed"] == 1).count();
    assert!(written <= passwords.len() + 1, "{written} writes for {} passwords", passwords.len());

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(env.pg.role_exists(&user).await, "a static role is Vault's to keep, not ours to revoke");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_holds_the_replaced_credentials_until_they_are_revoked() {
    let env = Env::new(Ttls { db_ttl: "2s", db_max: "4s", token_ttl: "1h", token_max: "2h" }).await;
    let secrets = format!(
        "  - name: db\n    path: database/creds/app\n    revoke_replaced_after: 2s\n    files:\n      - path: {}/both.txt\n        template: \"{{{{ username }}}} {{{{ previous.username }}}}\"\n",
        env.secrets().display()
    );
    let mut agent = env.spawn(&env.config_with_secrets(&secrets)).await;
    let read = || std::fs::read_to_string(env.secrets().join("both.txt")).unwrap_or_default();
    assert!(eventually(20, async || !read().is_empty()).await, "{}", agent.output());
    let first = read();
    let (user, none) = first.split_once(' ').unwrap();
    assert_eq!(none, "", "no previous at first");
    // After the rotation: both; after the old lease's revocation: the new alone.
    let user = user.to_string();
    let mut both = None;
    assert!(
        eventually(15, async || {
            let text = read();
            if text.ends_with(&format!(" {user}")) {
                both = Some(text);
            }
            both.is_some()
        })
        .await,
        "{}",
        agent.output()
    );
    let new = both.unwrap().split_once(' ').unwrap().0.to_string();
    assert_ne!(new, user);
    assert!(
        eventually(10, async || read() == format!("{new} ")).await,
        "previous gone: {:?}\n{}",
        read(),
        agent.output()
    );
    assert!(!env.pg.role_exists(&user).await, "the previous user was revoked when it left the file");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}
