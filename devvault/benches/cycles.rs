//! Benchmark (not a test): 1,000 issue+revoke cycles against devvault's
//! memory plugin over HTTP, so devvault is never the bottleneck of agent
//! benchmarks. Goal: under 5 s on 2 cores. Run: `cargo bench -p devvault`.

use std::time::Instant;

use devvault::DevVault;
use devvault::testing::Api;
use serde_json::json;

const CYCLES: usize = 1000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let vault = match DevVault::start("127.0.0.1:0".parse().expect("addr"), "root").await {
        Ok(v) => v,
        Err(e) => panic!("devvault did not start: {e}"),
    };
    let api = Api::new(&vault.url(), Some("root"));
    devvault::testing::setup_memory(&api, "*", "1h", "24h").await;
    let start = Instant::now();
    for _ in 0..CYCLES {
        let creds = api.ok("GET", "database/creds/app", None).await;
        let lease = creds["lease_id"].as_str().expect("lease id").to_string();
        api.ok("PUT", "sys/leases/revoke", Some(json!({"lease_id": lease}))).await;
    }
    let elapsed = start.elapsed();
    assert_eq!(vault.lease_count(), 0, "every lease revoked");
    assert!(vault.memory_users().is_empty(), "every user dropped");
    println!(
        "devvault: {CYCLES} issue+revoke cycles in {:.3} s ({:.0} µs per cycle; goal < 5 s)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / CYCLES as f64
    );
    if elapsed.as_secs_f64() >= 5.0 {
        std::process::exit(1);
    }
}
