//! The credential lifecycle with the real binary, devvault and PostgreSQL:
//! files, renewal timing, re-issue before max TTL, atomic rotation, and
//! revocation at SIGTERM.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::{Env, Ttls, eventually, secs_between};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_appear_with_mode_and_log_in_to_postgres() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let mut agent = env.spawn(&env.config("", "")).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "db.json written:\n{}", agent.output());
    let path = env.secrets().join("db.json");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o640);
    let creds = env.read_json("db.json").unwrap();
    let user = creds["username"].as_str().unwrap();
    let client = env.pg.connect(user, creds["password"].as_str().unwrap()).await.expect("rendered credentials log in");
    let who: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, user);
    assert!(creds["lease_id"].as_str().unwrap().starts_with("database/creds/app/"));
    assert!(creds["expires_at"].is_string());
    // Log fields are values, not Rust Debug (`Some("…")`, `[]`).
    let rendered = &agent.events("rendered")[0];
    humantime::parse_rfc3339(rendered["expires_at"].as_str().unwrap()).expect("expires_at is RFC 3339");
    assert_eq!(agent.events("issued")[0]["warnings"], "", "no warnings, said plainly");

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(!env.pg.role_exists(user).await, "role dropped at shutdown");
    let reqs = env.requests().await;
    // The lease itself was revoked (revoke-self would drop the role too, so
    // the role's absence alone proves nothing about it).
    let lease = creds["lease_id"].as_str().unwrap();
    let revoked =
        reqs.iter().any(|r| r.path == "sys/leases/revoke" && r.lease.as_deref() == Some(lease) && r.status == 204);
    assert!(revoked, "{reqs:?}");
    assert!(reqs.iter().any(|r| r.path == "auth/token/revoke-self" && r.status == 204), "token revoked");
    // Good files are never removed: the app keeps what it had.
    assert!(path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_at_half_ttl_and_reissues_before_max_ttl() {
    let env = Env::new(Ttls { db_ttl: "4s", db_max: "12s", token_ttl: "1h", token_max: "2h" }).await;
    let config = env.config("    revoke_replaced_after: 1s", "");
    let file = env.secrets().join("db.json");

    // A reader polling the file through the rotations, keeping every
    // distinct content it saw.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, file) = (stop.clone(), reads.clone(), file.clone());
        std::thread::spawn(move || {
            let mut versions: Vec<Vec<u8>> = Vec::new();
            let mut missing = 0usize;
            while !stop.load(Ordering::Relaxed) {
                match std::fs::read(&file) {
                    Ok(bytes) => {
                        reads.fetch_add(1, Ordering::Relaxed);
                        if !versions.contains(&bytes) {
                            versions.push(bytes);
                        }
                    }
                    Err(_) if !versions.is_empty() => missing += 1,
                    Err(_) => {}
                }
            }
            (versions, missing)
        })
    };

    let mut agent = env.spawn(&config).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    // The first version, held open: an in-place rewrite would change what
    // this descriptor reads; a rename leaves it whole.
    let mut held = std::fs::File::open(&file).unwrap();
    let inode = std::os::unix::fs::MetadataExt::ino(&held.metadata().unwrap());
    let mut first_bytes = Vec::new();
    std::io::Read::read_to_end(&mut held, &mut first_bytes).unwrap();
    let first = env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string();
    // Wait for the re-issue: a different username in the file.
    let rotated = env.rotated_from(&first, 20).await;
    assert!(rotated, "credentials re-issued:\n{}", agent.output());
    let second = env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string();
    assert!(eventually(10, async || !env.pg.role_exists(&first).await).await, "replaced role dropped");
    stop.store(true, Ordering::Relaxed);
    let (versions, missing) = reader.join().unwrap();
    assert!(reads.load(Ordering::Relaxed) > 100);

    // Deterministic: the old inode still holds the first version, whole,
    // and the path names another inode.
    let mut again = Vec::new();
    std::io::Seek::rewind(&mut held).unwrap();
    std::io::Read::read_to_end(&mut held, &mut again).unwrap();
    assert_eq!(again, first_bytes, "the first version was never rewritten in place");
    assert_ne!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&file).unwrap()),
        inode,
        "a new file renamed over it"
    );
    // And every read saw one of the versions written, whole (renames:
    // the first, then the second; never a mix, never missing).
    let last = std::fs::read(&file).unwrap();
    assert_eq!(missing, 0, "the file was missing after its first write");
    for v in &versions {
        assert!(*v == first_bytes || *v == last, "a read saw neither version: {}", String::from_utf8_lossy(v));
    }

    let reqs = env.requests().await;
    let creds: Vec<_> = reqs.iter().filter(|r| r.path == "database/creds/app").collect();
    let renews: Vec<_> = reqs.iter().filter(|r| r.path == "sys/leases/renew").collect();
    assert!(creds.len() >= 2 && renews.len() >= 3, "creds {} renews {}", creds.len(), renews.len());
    let issued = creds[0].time;
    // Each renewal of the first lease comes 45–50 % into the TTL then granted
    // (4 s each, until the max TTL caps it), up to 100 ms earlier to share a
    // wakeup with other secrets (`schedule::SLACK`), with up to ~0.5 s of
    // slack for a loaded 2-core machine.
    let mut prev = issued;
    for r in renews.iter().filter(|r| r.time < creds[1].time).take(2) {
        let fraction = secs_between(prev, r.time) / 4.0;
        assert!((0.42..=0.62).contains(&fraction), "renewal at {fraction:.3} of the TTL");
        prev = r.time;
    }
    // New credentials exist while the old lease (max 12 s from issue) still has
    // at least (1 - 0.5) × 4 s = 2 s left. Vault reports TTLs rounded to
    // whole seconds, which the agent allows for (`LeaseTimes::safe_end`).
    let left = 12.0 - secs_between(issued, creds[1].time);
    assert!(left >= 2.0, "old lease had {left:.2} s left at re-issue");
    // The replaced lease is revoked revoke_replaced_after (1 s) after the re-issue, before it expires.
    let revoke = reqs.iter().find(|r| r.path == "sys/leases/revoke").expect("revocation of the replaced lease");
    let after = secs_between(creds[1].time, revoke.time);
    assert!((0.9..=2.5).contains(&after), "revoked {after:.2} s after re-issue");
    assert!(!agent.events("capped").is_empty(), "a capped renewal was logged");
    assert!(agent.events("token_bounds_lease").is_empty(), "the max TTL ended the lease, not the token");

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(!env.pg.role_exists(&second).await);
    assert!(env.pg.roles_like("v-kubernet-app-").await.iter().all(|r| r != &first && r != &second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_vault_fails_exits_1_naming_the_lease() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let mut agent = env.spawn(&env.config("", "shutdown:\n  timeout: 3s")).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    for prefix in ["sys/leases/revoke", "auth/token/revoke-self"] {
        let fault =
            serde_json::json!({"path_prefix": prefix, "status": 503, "errors": ["Vault is sealed"], "count": 0});
        env.api.ok("POST", "sys/devvault/faults", Some(fault)).await;
    }
    let start = std::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(10)).await, 1, "{}", agent.output());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "exited within shutdown.timeout (+ slack): {:?}",
        start.elapsed()
    );
    let left = agent.events("lease_left_alive");
    assert_eq!(left.len(), 1, "{}", agent.output());
    assert_eq!(left[0]["secret"], "db");
    assert!(left[0]["lease"].as_str().unwrap().starts_with("database/creds/app/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_openbao_frozen_mid_renewal_is_bounded_by_shutdown_timeout() {
    // A lease renewed every second; then OpenBao is frozen (SIGSTOP): the
    // next renewal hangs (request_timeout is 10 s, with retries).
    let env = Env::openbao_only(Ttls { db_ttl: "2s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let mut agent = env.spawn(&env.config("", "shutdown:\n  timeout: 3s")).await;
    let renewed = async || env.requests().await.iter().filter(|r| r.path == "sys/leases/renew").count();
    assert!(eventually(20, async || renewed().await >= 1).await, "{}", agent.output());
    let bao = nix::unistd::Pid::from_raw(env.openbao().unwrap().pid());
    nix::sys::signal::kill(bao, Signal::SIGSTOP).unwrap();
    // Setup, not an assertion: let the next renewal (due within 1 s) start.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let start = std::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    let code = agent.wait(Duration::from_secs(30)).await;
    let took = start.elapsed();
    nix::sys::signal::kill(bao, Signal::SIGCONT).unwrap();
    assert_eq!(code, 1, "{}", agent.output());
    assert!(took < Duration::from_secs(5), "exited within shutdown.timeout (+ slack): {took:?}\n{}", agent.output());
    let left = agent.events("lease_left_alive");
    assert_eq!(left.len(), 1, "{}", agent.output());
    assert_eq!(left[0]["secret"], "db");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_130_and_sighup_rerenders() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let mut agent = env.spawn(&env.config("", "shutdown:\n  timeout: 10s")).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    // SIGHUP re-renders from the credentials in hand: a deleted file comes back, no new creds.
    std::fs::remove_file(env.secrets().join("db.json")).unwrap();
    agent.signal(Signal::SIGHUP);
    assert!(eventually(10, async || env.read_json("db.json").is_some()).await, "re-rendered after SIGHUP");
    let creds_calls = env.requests().await.iter().filter(|r| r.path == "database/creds/app").count();
    assert_eq!(creds_calls, 1);
    // Revocation hangs (delay), so the teardown is in progress when the second signal comes.
    let fault = serde_json::json!({"path_prefix": "sys/leases/revoke", "delay_ms": 5000, "count": 0});
    env.api.ok("POST", "sys/devvault/faults", Some(fault)).await;
    agent.signal(Signal::SIGTERM);
    assert!(eventually(5, async || !agent.events("shutdown").is_empty()).await);
    agent.signal(Signal::SIGINT);
    assert_eq!(agent.wait(Duration::from_secs(5)).await, 130, "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_secret_is_reread_and_rewritten_only_when_it_changed() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    env.api.ok("POST", "sys/mounts/kv", Some(serde_json::json!({"type": "kv", "options": {"version": "2"}}))).await;
    env.api.ok("POST", "kv/data/app", Some(serde_json::json!({"data": {"api_key": "one"}}))).await;
    let kv = format!(
        "  - name: kv\n    path: kv/data/app\n    refresh_interval: 1s\n    files:\n      - path: {}/kv.env\n        template: \"API_KEY={{{{ data.data.api_key }}}}\"",
        env.secrets().display()
    );
    let mut agent = env.spawn(&env.config(&kv, "")).await;
    let read = |env: &Env| std::fs::read_to_string(env.secrets().join("kv.env")).unwrap_or_default();
    assert!(eventually(20, async || read(&env) == "API_KEY=one").await, "{}", agent.output());
    let reads = async || env.requests().await.iter().filter(|r| r.path == "kv/data/app").count();
    assert!(eventually(10, async || reads().await >= 3).await, "re-read every refresh_interval");
    env.api.ok("POST", "kv/data/app", Some(serde_json::json!({"data": {"api_key": "two"}}))).await;
    assert!(eventually(10, async || read(&env) == "API_KEY=two").await, "{}", agent.output());
    // The `rendered` line is logged after the file is written.
    let kv_renders = || -> Vec<serde_json::Value> {
        agent.events("rendered").into_iter().filter(|e| e["secret"] == "kv" && e["changed"] == 1).collect()
    };
    assert!(eventually(5, async || kv_renders().len() >= 2).await, "{}", agent.output());
    let kv_renders: Vec<serde_json::Value> =
        agent.events("rendered").into_iter().filter(|e| e["secret"] == "kv").collect();
    let changed = kv_renders.iter().filter(|e| e["changed"] == 1).count();
    assert_eq!(changed, 2, "written at start and after the change only: {kv_renders:?}");
    assert!(kv_renders.len() >= 3);
    // Nothing to renew or revoke for it.
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert_eq!(env.requests().await.iter().filter(|r| r.path == "sys/leases/revoke").count(), 1, "only the db lease");
}
