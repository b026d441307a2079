//! One credential set per pod: `--once` then the sidecar, kill -9 and
//! restart, and bad or stale state files.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::support::{Agent, Env, Ttls, eventually};
use nix::sys::signal::Signal;

fn state_top(env: &Env) -> String {
    format!("state_dir: {}/state", env.dir.path().display())
}

/// `agent --once` as an init container; the username it rendered.
async fn init_container(env: &Env, config: &std::path::Path) -> String {
    let args = ["agent", "-c", &config.display().to_string(), "--once"];
    let mut init = Agent::spawn(&args, env.dir.path()).await;
    assert_eq!(init.wait(Duration::from_secs(20)).await, 0, "{}", init.output());
    env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string()
}

async fn count(env: &Env, path: &str) -> usize {
    env.requests().await.iter().filter(|r| r.path == path).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_then_agent_uses_one_credential_set() {
    let env = Env::new(Ttls { db_ttl: "4s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let config = env.config("", &state_top(&env));
    let user = init_container(&env, &config).await;
    let state_dir = env.dir.path().join("state");
    assert_eq!(std::fs::metadata(&state_dir).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(state_dir.join("state.json")).unwrap().permissions().mode() & 0o777, 0o600);

    let mut sidecar = env.spawn(&config).await;
    let renewed =
        eventually(15, async || env.requests().await.iter().any(|r| r.path == "sys/leases/renew" && r.status == 200))
            .await;
    assert!(renewed, "the sidecar renews the adopted lease:\n{}", sidecar.output());
    assert_eq!(count(&env, "database/creds/app").await, 1, "exactly one creds call");
    assert_eq!(count(&env, "auth/kubernetes/login").await, 1, "the init container's token was adopted");
    assert_eq!(env.read_json("db.json").unwrap()["username"], user.as_str());
    assert_eq!(sidecar.events("lease_adopted").len(), 1);

    sidecar.signal(Signal::SIGTERM);
    assert_eq!(sidecar.wait(Duration::from_secs(15)).await, 0, "{}", sidecar.output());
    assert!(!env.pg.role_exists(&user).await);
    assert!(!state_dir.join("state.json").exists(), "a clean stop removes the state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_adopts_the_same_lease() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let config = env.config("", &state_top(&env));
    let mut first = env.spawn(&config).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", first.output());
    let user = env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string();
    first.signal(Signal::SIGKILL);
    first.wait(Duration::from_secs(5)).await;
    // The app's file is gone too (a fresh emptyDir would be): adoption re-renders it.
    std::fs::remove_file(env.secrets().join("db.json")).unwrap();

    let mut second = env.spawn(&config).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", second.output());
    assert_eq!(env.read_json("db.json").unwrap()["username"], user.as_str(), "same credentials");
    assert_eq!(count(&env, "database/creds/app").await, 1, "no new creds call");
    second.signal(Signal::SIGTERM);
    assert_eq!(second.wait(Duration::from_secs(15)).await, 0, "{}", second.output());
    assert!(env.pg.roles_like("v-kubernet-app-").await.iter().all(|r| r != &user), "no role left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_is_set_aside_and_revoked_leases_are_reissued() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let config = env.config("", &state_top(&env));
    let state_dir = env.dir.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(state_dir.join("state.json"), "{\"version\": 1, \"tokens\": [garbage").unwrap();
    let args = ["agent", "-c", &config.display().to_string(), "--once"];
    let mut init = Agent::spawn(&args, env.dir.path()).await;
    assert_eq!(init.wait(Duration::from_secs(20)).await, 0, "{}", init.output());
    assert_eq!(init.events("state_set_aside").len(), 1, "{}", init.output());
    let set_aside = std::fs::read_dir(&state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("state.json.bad-"));
    assert!(set_aside);
    let first = env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string();

    // Meanwhile an operator revokes every lease of the role.
    env.api.ok("PUT", "sys/leases/revoke-prefix/database/creds/app", None).await;
    assert!(!env.pg.role_exists(&first).await);
    let mut sidecar = env.spawn(&config).await;
    assert!(eventually(20, async || !sidecar.events("lease_not_adopted").is_empty()).await, "{}", sidecar.output());
    assert!(eventually(20, async || env.read_json("db.json").unwrap()["username"] != first.as_str()).await);
    let creds = env.read_json("db.json").unwrap();
    env.pg
        .connect(creds["username"].as_str().unwrap(), creds["password"].as_str().unwrap())
        .await
        .expect("new credentials work");
    sidecar.signal(Signal::SIGTERM);
    assert_eq!(sidecar.wait(Duration::from_secs(15)).await, 0, "{}", sidecar.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_lookup_adopts_the_recorded_lease_instead_of_issuing_a_second() {
    let env = Env::new(Ttls { db_ttl: "4s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let config = env.config("", &state_top(&env));
    let user = init_container(&env, &config).await;
    // A policy without sys/leases/lookup: 403, which says nothing about the lease.
    let deny = serde_json::json!({"path_prefix": "sys/leases/lookup", "status": 403, "errors": ["permission denied"], "count": 0});
    env.api.ok("POST", "sys/devvault/faults", Some(deny)).await;
    let mut sidecar = env.spawn(&config).await;
    let renewed =
        eventually(15, async || env.requests().await.iter().any(|r| r.path == "sys/leases/renew" && r.status == 200))
            .await;
    assert!(renewed, "the sidecar renews the recorded lease:\n{}", sidecar.output());
    assert_eq!(count(&env, "database/creds/app").await, 1, "no second set:\n{}", sidecar.output());
    assert_eq!(sidecar.events("lease_adopted_unverified").len(), 1, "{}", sidecar.output());
    sidecar.signal(Signal::SIGTERM);
    assert_eq!(sidecar.wait(Duration::from_secs(15)).await, 0, "{}", sidecar.output());
    assert!(!env.pg.role_exists(&user).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_with_vault_down_exits_1_after_startup_timeout_even_with_leases_to_adopt() {
    // A recorded lease (1 h) whose token (2 s) has ended: adopting it needs
    // a new login, and Vault is down.
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "2s", token_max: "2s" }).await;
    let config = env.config("", &format!("{}\nstartup_timeout: 2s", state_top(&env)));
    let args = ["agent", "-c", &config.display().to_string(), "--once"];
    let mut init = Agent::spawn(&args, env.dir.path()).await;
    assert_eq!(init.wait(Duration::from_secs(20)).await, 0, "{}", init.output());
    // Setup, not an assertion: let the recorded token end.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Nothing listens on port 1.
    let text = std::fs::read_to_string(&config).unwrap().replace(&env.url(), "http://127.0.0.1:1");
    std::fs::write(&config, text).unwrap();
    let start = std::time::Instant::now();
    let mut again = Agent::spawn(&args, env.dir.path()).await;
    assert_eq!(again.wait(Duration::from_secs(30)).await, 1, "{}", again.output());
    assert!(start.elapsed() < Duration::from_secs(8), "exited {:?} after start", start.elapsed());
    assert_eq!(again.events("startup_timeout").len(), 1, "{}", again.output());
}
