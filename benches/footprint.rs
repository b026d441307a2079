//! Benchmark (not a test): the agent's footprint with one secret against
//! devvault (memory plugin): resident memory after a few renewals, and the
//! time from Vault's answer to the first credentials file.
//! Goals (issue 3): under 8 MiB RSS, first file within a few milliseconds.
//! Run: `scripts/bench` (or `cargo bench --bench footprint`).

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant, SystemTime};

use devvault::testing::{Api, Setup, setup_memory};
use devvault::{DevVault, ServiceAccountIssuer, SigningAlg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let vault = DevVault::start("127.0.0.1:0".parse().expect("addr"), "root").await.expect("devvault starts");
    let api = Api::new(&vault.url(), Some("root"));
    let issuer = ServiceAccountIssuer::generate(SigningAlg::Es256).expect("key");
    setup_memory(&api, "*", "2s", "1h").await;
    let policy = "path \"database/creds/app\" { capabilities = [\"read\"] }\npath \"sys/leases/revoke\" { capabilities = [\"update\"] }\n";
    Setup { api: &api, k8s_role: "app", policy: policy.into(), token_ttl: "1h", token_max_ttl: "2h" }
        .kubernetes(&issuer)
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, issuer.mint("default", "app", 3600).expect("jwt")).expect("write token");
    let file = dir.path().join("db.json");
    let config = dir.path().join("leasehold.yaml");
    std::fs::write(
        &config,
        format!(
            "vault:\n  address: {}\nauth:\n  kubernetes:\n    role: app\n    token_path: {}\nsecrets:\n  - name: db\n    path: database/creds/app\n    files:\n      - path: {}\n        format: json\ntelemetry:\n  listen: 127.0.0.1:0\nlog:\n  level: info\n",
            vault.url(),
            token.display(),
            file.display()
        ),
    )
    .expect("write config");

    // scripts/bench passes the image's build (no `demo` feature).
    let binary = std::env::var("LEASEHOLD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_leasehold").to_string());
    let log = dir.path().join("agent.log");
    let started = Instant::now();
    let mut agent = tokio::process::Command::new(&binary)
        .args(["agent", "-c", &config.display().to_string()])
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("leasehold starts");
    let pid = agent.id().expect("pid");
    while !file.exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "no credentials file");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let to_file = started.elapsed();
    // A few renewals (TTL 2 s → every second), then measure.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = rss_kib(pid).unwrap_or(0);
    let renewals = api.requests().await.iter().filter(|r| r["path"] == "sys/leases/renew").count();
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    let status = agent.wait().await.expect("exit");
    // The agent's own timestamps (µs): Vault's answer logged → files written.
    let event_time = |event: &str| -> Option<SystemTime> {
        std::fs::read_to_string(&log).ok()?.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["event"] == event).then(|| humantime::parse_rfc3339(v["timestamp"].as_str()?).ok())?
        })
    };
    let answer_to_file = match (event_time("issued"), event_time("rendered")) {
        (Some(a), Some(b)) => b.duration_since(a).unwrap_or_default(),
        _ => Duration::ZERO,
    };
    let size = std::fs::metadata(&binary).map(|m| m.len()).unwrap_or(0);
    println!("agent ({binary}, {:.1} MB):", size as f64 / 1e6);
    println!("agent: start to first file {:.1} ms (includes process start and login)", to_file.as_secs_f64() * 1e3);
    println!(
        "agent: credentials received to files written {:.2} ms (goal: a few ms)",
        answer_to_file.as_secs_f64() * 1e3
    );
    println!("agent: RSS {:.1} MiB after {renewals} renewals (goal < 8 MiB)", rss as f64 / 1024.0);
    println!("agent: exit {:?}", status.code());
}
