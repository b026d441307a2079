//! `leasehold demo` runs with no external service and shows a renewal, a
//! re-issue at max TTL and the revocation on Ctrl-C.

use std::time::Duration;

use crate::support::{Agent, eventually};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_shows_renewal_reissue_and_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("leasehold-demo");
    let mut demo = Agent::spawn(&["demo", "--dir", &demo_dir.display().to_string()], dir.path()).await;
    // Max TTL is 30 s: the re-issue comes about 25 s in.
    let seen = eventually(45, async || {
        let out = demo.output();
        out.contains("renewed lease") && out.contains("credentials replaced")
    })
    .await;
    assert!(seen, "{}", demo.output());
    assert!(demo_dir.join("secrets/db.json").exists());
    // It says where its telemetry is, and `leasehold status` takes that.
    let out = demo.output();
    let url = out.lines().find_map(|l| l.strip_prefix("telemetry:   ")).and_then(|l| l.split(' ').next());
    let url = url.unwrap_or_else(|| panic!("the telemetry address printed: {out}")).to_string();
    let mut status = Agent::spawn(&["status", &url], dir.path()).await;
    assert_eq!(status.wait(Duration::from_secs(10)).await, 0, "{}", status.output());
    assert!(status.output().contains("SECRET"), "{}", status.output());
    assert!(
        std::fs::read_to_string(demo_dir.join("secrets/db.url"))
            .unwrap()
            .starts_with("postgresql://v-kubernet-app-role-")
    );
    demo.signal(Signal::SIGINT);
    assert_eq!(demo.wait(Duration::from_secs(15)).await, 0, "{}", demo.output());
    let out = demo.output();
    assert!(out.contains("every lease revoked"), "{out}");
    assert!(out.contains("database users left in devvault after shutdown: 0"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_a_real_postgresql() {
    let pg = devvault::testing::shared_cluster();
    let admin = "demo_admin";
    pg.create_admin_role(admin, "demo-admin-pw").await;
    let url = pg.url(admin, "demo-admin-pw", "postgres");
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("leasehold-demo");
    let args = ["demo", "--dir", &demo_dir.display().to_string(), "--database-url", &url];
    let mut demo = Agent::spawn(&args, dir.path()).await;
    let json = demo_dir.join("secrets/db.json");
    assert!(eventually(20, async || json.exists()).await, "{}", demo.output());
    let creds: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let user = creds["username"].as_str().unwrap();
    pg.connect(user, creds["password"].as_str().unwrap()).await.expect("a real PostgreSQL user");
    demo.signal(Signal::SIGINT);
    assert_eq!(demo.wait(Duration::from_secs(15)).await, 0, "{}", demo.output());
    assert!(!pg.role_exists(user).await, "dropped at Ctrl-C");
}
