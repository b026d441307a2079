//! Live reload: SIGHUP and a ConfigMap-style symlink swap.

use std::path::Path;
use std::time::Duration;

use crate::support::{Env, Ttls, eventually};
use nix::sys::signal::Signal;

fn secret_yaml(env: &Env, name: &str, file: &str, template: &str) -> String {
    format!(
        "  - name: {name}\n    path: database/creds/app\n    files:\n      - path: {}/{file}\n        template: \"{template}\"\n",
        env.secrets().display()
    )
}

fn config_yaml(env: &Env, secrets: &str, log_level: &str) -> String {
    format!(
        "vault:\n  address: {}\nauth:\n  kubernetes:\n    role: app\n    token_path: {}\nsecrets:\n{secrets}log:\n  format: json\n  level: {log_level}\ntelemetry:\n  listen: 127.0.0.1:0\n",
        env.url(),
        env.token_path().display()
    )
}

fn read(env: &Env, file: &str) -> Option<String> {
    std::fs::read_to_string(env.secrets().join(file)).ok()
}

async fn creds_calls(env: &Env) -> usize {
    env.requests().await.iter().filter(|r| r.path == "database/creds/app").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_templates_adds_and_removes_secrets() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let path = env.dir.path().join("leasehold.yaml");
    let a = secret_yaml(&env, "a", "a.txt", "user={{ username }}");
    std::fs::write(&path, config_yaml(&env, &a, "info")).unwrap();
    let mut agent = env.spawn(&path).await;
    assert!(eventually(20, async || read(&env, "a.txt").is_some()).await, "{}", agent.output());
    let user_a = read(&env, "a.txt").unwrap().trim_start_matches("user=").to_string();

    // Template change: re-rendered from the credentials in hand.
    let a2 = secret_yaml(&env, "a", "a.txt", "USER={{ username }}");
    let b = secret_yaml(&env, "b", "b.txt", "{{ username }}");
    std::fs::write(&path, config_yaml(&env, &format!("{a2}{b}"), "info")).unwrap();
    agent.signal(Signal::SIGHUP);
    assert!(
        eventually(10, async || read(&env, "a.txt").is_some_and(|t| t.starts_with("USER="))).await,
        "{}",
        agent.output()
    );
    assert_eq!(read(&env, "a.txt").unwrap(), format!("USER={user_a}"));
    // Added secret issued.
    assert!(eventually(10, async || read(&env, "b.txt").is_some()).await, "{}", agent.output());
    assert_eq!(creds_calls(&env).await, 2, "one for a, one for the added b; none for the template change");
    let user_b = read(&env, "b.txt").unwrap();

    // Removed secret: lease revoked (role gone), files removed.
    std::fs::write(&path, config_yaml(&env, &a2, "info")).unwrap();
    agent.signal(Signal::SIGHUP);
    assert!(eventually(10, async || read(&env, "b.txt").is_none()).await, "{}", agent.output());
    assert!(eventually(5, async || !env.pg.role_exists(&user_b).await).await, "removed secret's role dropped");
    assert!(env.pg.role_exists(&user_a).await);

    // Both reloads counted as applied (they once went uncounted).
    let metrics = async || {
        let url = format!("http://{}/metrics", agent.telemetry_addr().unwrap_or_default());
        reqwest::get(url).await.unwrap().text().await.unwrap()
    };
    assert!(metrics().await.contains("leasehold_config_reloads_total{result=\"success\"} 2"), "{}", metrics().await);

    // An invalid config is logged and ignored.
    std::fs::write(&path, "vault: [this is not valid\n").unwrap();
    agent.signal(Signal::SIGHUP);
    assert!(eventually(10, async || !agent.events("config_rejected").is_empty()).await, "{}", agent.output());
    assert!(metrics().await.contains("leasehold_config_reloads_total{result=\"rejected\"} 1"));
    assert!(agent.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(read(&env, "a.txt").unwrap(), format!("USER={user_a}"));
    assert_eq!(creds_calls(&env).await, 2);

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(!env.pg.role_exists(&user_a).await);
}

/// Writes `files` as a ConfigMap volume does: a timestamped directory, a
/// `..data` symlink swapped by rename, and `<name> → ..data/<name>` links.
fn configmap_files(dir: &Path, generation: u32, files: &[(&str, &str)]) {
    let ts = dir.join(format!("..2026_11_27_{generation}"));
    std::fs::create_dir_all(&ts).unwrap();
    for (name, text) in files {
        std::fs::write(ts.join(name), text).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

fn configmap_write(dir: &Path, generation: u32, text: &str) {
    configmap_files(dir, generation, &[("leasehold.yaml", text)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_is_picked_up_without_a_signal() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let cm = env.dir.path().join("configmap");
    std::fs::create_dir_all(&cm).unwrap();
    configmap_write(&cm, 1, &config_yaml(&env, &secret_yaml(&env, "a", "a.txt", "v1 {{ username }}"), "info"));
    let mut agent = env.spawn(&cm.join("leasehold.yaml")).await;
    assert!(eventually(20, async || read(&env, "a.txt").is_some()).await, "{}", agent.output());
    configmap_write(&cm, 2, &config_yaml(&env, &secret_yaml(&env, "a", "a.txt", "v2 {{ username }}"), "info"));
    assert!(
        eventually(10, async || read(&env, "a.txt").is_some_and(|t| t.starts_with("v2 "))).await,
        "{}",
        agent.output()
    );
    assert_eq!(creds_calls(&env).await, 1);
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_template_file_in_the_configmap_is_picked_up() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let cm = env.dir.path().join("configmap");
    std::fs::create_dir_all(&cm).unwrap();
    let secret = format!(
        "  - name: a\n    path: database/creds/app\n    files:\n      - path: {}/a.txt\n        template_file: {}/a.j2\n",
        env.secrets().display(),
        cm.display()
    );
    let config = config_yaml(&env, &secret, "info");
    configmap_files(&cm, 1, &[("leasehold.yaml", &config), ("a.j2", "one {{ username }}")]);
    let mut agent = env.spawn(&cm.join("leasehold.yaml")).await;
    assert!(
        eventually(20, async || read(&env, "a.txt").is_some_and(|t| t.starts_with("one "))).await,
        "{}",
        agent.output()
    );
    // Only the template changes; the config text stays the same.
    configmap_files(&cm, 2, &[("leasehold.yaml", &config), ("a.j2", "two {{ username }}")]);
    assert!(
        eventually(10, async || read(&env, "a.txt").is_some_and(|t| t.starts_with("two "))).await,
        "{}",
        agent.output()
    );
    assert_eq!(creds_calls(&env).await, 1);
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_path_is_a_reissue_the_files_are_never_missing() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    // A second database role the secret moves to.
    devvault::testing::setup_postgres(&env.api, env.pg, "app2", "1h", "2h").await;
    let policy = format!(
        "{}\npath \"database/creds/app2\" {{ capabilities = [\"read\"] }}\npath \"sys/leases/revoke/database/creds/app2/*\" {{ capabilities = [\"update\"] }}\n",
        crate::support::POLICY
    );
    env.api.ok("PUT", "sys/policies/acl/app", Some(serde_json::json!({"policy": policy}))).await;
    let path = env.dir.path().join("leasehold.yaml");
    let a = secret_yaml(&env, "a", "a.txt", "{{ username }}");
    std::fs::write(&path, config_yaml(&env, &a, "info")).unwrap();
    let mut agent = env.spawn(&path).await;
    assert!(eventually(20, async || read(&env, "a.txt").is_some()).await, "{}", agent.output());
    let old = read(&env, "a.txt").unwrap();

    // A reader of the file through the change: it must never be missing.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, file) = (stop.clone(), env.secrets().join("a.txt"));
        std::thread::spawn(move || {
            let mut missing = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if std::fs::read(&file).map_or(true, |b| b.is_empty()) {
                    missing += 1;
                }
            }
            missing
        })
    };
    std::fs::write(&path, config_yaml(&env, &a.replace("database/creds/app\n", "database/creds/app2\n"), "info"))
        .unwrap();
    agent.signal(Signal::SIGHUP);
    let moved = eventually(10, async || read(&env, "a.txt").is_some_and(|u| u != old)).await;
    assert!(moved, "{}", agent.output());
    let new = read(&env, "a.txt").unwrap();
    assert!(new.starts_with("v-kubernet-app2-"), "{new}");
    assert!(eventually(10, async || !env.pg.role_exists(&old).await).await, "the old lease is revoked after");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(reader.join().unwrap(), 0, "the file was missing or empty during the change");
    // New credentials first, then the old lease revoked.
    let reqs = env.requests().await;
    let issued = reqs.iter().position(|r| r.path == "database/creds/app2").expect("issued from the new path");
    let revoked = reqs.iter().position(|r| r.path == "sys/leases/revoke").expect("old lease revoked");
    assert!(issued < revoked, "{reqs:?}");
    assert!(env.pg.role_exists(&new).await);
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(!env.pg.role_exists(&new).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_config_does_not_reload_it() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let config = env.dir.path().join("leasehold.yaml");
    std::fs::write(&config, config_yaml(&env, &secret_yaml(&env, "a", "a.txt", "{{ username }}"), "debug")).unwrap();
    let mut agent = env.spawn(&config).await;
    assert!(eventually(20, async || read(&env, "a.txt").is_some()).await, "{}", agent.output());
    // Anyone reading it (kubelet, `leasehold check`, a reload's own read)
    // opens it. The bug: that open armed a reload, whose read armed the
    // next, every 200 ms forever.
    for _ in 0..3 {
        std::fs::read(&config).unwrap();
    }
    // A window for reloads that should not come (the debounce is 200 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(agent.events("config_unchanged").is_empty(), "{}", agent.output());
    // A real change still counts.
    std::fs::write(&config, config_yaml(&env, &secret_yaml(&env, "a", "a.txt", "v2 {{ username }}"), "debug")).unwrap();
    assert!(eventually(10, async || read(&env, "a.txt").is_some_and(|t| t.starts_with("v2 "))).await);
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}
