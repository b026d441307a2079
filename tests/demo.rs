//! `leasehold demo` runs with no external service and shows a renewal, a
//! re-issue at max TTL and the revocation on Ctrl-C.

mod common;

use std::time::Duration;

use common::{Agent, eventually};
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
