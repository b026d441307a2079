//! Telemetry: readiness transitions, metric values (checked by promtool),
//! `leasehold status`, and a full run whose every output is searched for
//! secrets.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::{Agent, Env, Ttls, eventually};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

async fn get(addr: &str, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://{addr}{path}")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

async fn telemetry_addr(agent: &Agent) -> String {
    assert!(eventually(10, async || agent.telemetry_addr().is_some()).await, "{}", agent.output());
    agent.telemetry_addr().unwrap()
}

/// The value of one sample line, e.g. `leasehold_auth_logins_total{result="success"}`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_credentials() {
    let env = Env::new(Ttls { db_ttl: "3s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    // Hold the first creds request so the agent is up but not ready.
    let hold = json!({"path_prefix": "database/creds/app", "delay_ms": 2000, "count": 1});
    env.api.ok("POST", "sys/devvault/faults", Some(hold)).await;
    let mut agent = env.spawn(&env.config("", "")).await;
    let addr = telemetry_addr(&agent).await;
    assert_eq!(get(&addr, "/healthz").await.0, 200);
    let (code, body) = get(&addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("db: not rendered yet"), "{body}");
    assert!(env.read_json("db.json").is_none());
    assert!(eventually(10, async || get(&addr, "/readyz").await.0 == 200).await, "{}", agent.output());
    assert!(env.read_json("db.json").is_some(), "ready only once the file exists");

    // Vault now refuses to renew and to issue: the credentials run out.
    for (prefix, status) in [("sys/leases/renew", 400), ("database/creds/app", 503)] {
        let fault = json!({"path_prefix": prefix, "status": status, "errors": ["permission denied"], "count": 0});
        env.api.ok("POST", "sys/devvault/faults", Some(fault)).await;
    }
    let expired = eventually(10, async || {
        let (code, body) = get(&addr, "/readyz").await;
        code == 503 && body.contains("db: credentials expired at")
    })
    .await;
    assert!(expired, "{}", agent.output());
    assert!(env.read_json("db.json").is_some(), "the file is kept");
    env.api.ok("DELETE", "sys/devvault/faults", None).await;
    agent.signal(Signal::SIGTERM);
    agent.wait(Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_lifecycle_and_pass_promtool() {
    let env = Env::new(Ttls { db_ttl: "4s", db_max: "8s", token_ttl: "1h", token_max: "2h" }).await;
    let refuse = json!({"path_prefix": "database/creds/app", "status": 400, "errors": ["backend busy"], "count": 1});
    env.api.ok("POST", "sys/devvault/faults", Some(refuse)).await;
    let mut agent = env.spawn(&env.config("    revoke_replaced_after: 0s", "")).await;
    let addr = telemetry_addr(&agent).await;
    let issued_twice = eventually(20, async || {
        env.requests().await.iter().filter(|r| r.path == "database/creds/app" && r.status == 200).count() == 2
    })
    .await;
    assert!(issued_twice, "{}", agent.output());
    let metrics = {
        let mut text = String::new();
        let ok = eventually(5, async || {
            text = get(&addr, "/metrics").await.1;
            sample(&text, "leasehold_lease_revocations_total{secret=\"db\",result=\"success\"}") == Some(1.0)
        })
        .await;
        assert!(ok, "{text}");
        text
    };
    let expect = [
        ("leasehold_credentials_issued_total{secret=\"db\",result=\"success\"}", 2.0),
        ("leasehold_credentials_issued_total{secret=\"db\",result=\"failure\"}", 1.0),
        ("leasehold_auth_logins_total{result=\"success\"}", 1.0),
        ("leasehold_vault_requests_total{op=\"read secret\",code=\"400\"}", 1.0),
        ("leasehold_secret_ready{secret=\"db\"}", 1.0),
        ("leasehold_secret_consecutive_failures{secret=\"db\"}", 0.0),
        ("leasehold_build_info{version=\"0.1.0\"}", 1.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&metrics, series), Some(value), "{series} in\n{metrics}");
    }
    let renewals = sample(&metrics, "leasehold_lease_renewals_total{secret=\"db\",result=\"success\"}").unwrap();
    assert!(renewals >= 2.0, "{renewals}");
    let expiry = sample(&metrics, "leasehold_lease_expiry_timestamp_seconds{secret=\"db\"}").unwrap();
    assert!(expiry > 1.7e9);
    assert!(metrics.contains("leasehold_vault_request_duration_seconds_bucket{"));

    // promtool (Debian's prometheus package, installed by scripts/test).
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test installs the prometheus package)");
    use tokio::io::AsyncWriteExt;
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes()).await.unwrap();
    let out = promtool.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_prints_one_row_per_secret() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let second = format!(
        "  - name: replica\n    path: database/creds/app\n    files:\n      - path: {}/replica.env\n        format: env",
        env.secrets().display()
    );
    let mut agent = env.spawn(&env.config(&second, "")).await;
    let addr = telemetry_addr(&agent).await;
    assert!(eventually(20, async || get(&addr, "/readyz").await.0 == 200).await, "{}", agent.output());
    let mut status = Agent::spawn(&["status", "--addr", &addr], env.dir.path()).await;
    assert_eq!(status.wait(Duration::from_secs(10)).await, 0, "{}", status.output());
    let out = status.output();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("SECRET"), "{out}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("db ") || l.starts_with("replica ")).count(), 2, "{out}");
    assert!(lines.iter().all(|l| !l.starts_with("db ") || l.contains("yes")), "{out}");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0);
}

/// Secrets found in the state file (tokens, lease ids, passwords).
fn secrets_in_state(path: &std::path::Path, found: &mut BTreeSet<String>) {
    let Ok(text) = std::fs::read_to_string(path) else { return };
    let Ok(state) = serde_json::from_str::<Value>(&text) else { return };
    for t in state["tokens"].as_array().into_iter().flatten() {
        found.extend(t["token"].as_str().map(str::to_string));
        // Vault's accessors (not the local `batch-…` ids of batch tokens).
        found.extend(t["accessor"].as_str().filter(|a| !a.starts_with("batch-")).map(str::to_string));
    }
    for s in state["secrets"].as_object().into_iter().flat_map(|m| m.values()) {
        let current = s["current"].clone();
        for lease in std::iter::once(&current).chain(s["retired"].as_array().into_iter().flatten()) {
            found.extend(lease["lease_id"].as_str().map(str::to_string));
            found.extend(lease["data"]["password"].as_str().map(str::to_string));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_metrics_or_status() {
    let env = Env::new(Ttls { db_ttl: "3s", db_max: "6s", token_ttl: "4s", token_max: "8s" }).await;
    let state = env.dir.path().join("state/state.json");
    let config = env.config("    revoke_replaced_after: 1s", &format!("state_dir: {}/state", env.dir.path().display()));
    let mut agent = env.spawn(&config).await;
    let addr = telemetry_addr(&agent).await;
    let fault = json!({"path_prefix": "sys/leases/renew", "status": 503, "errors": ["overloaded"], "count": 2});
    env.api.ok("POST", "sys/devvault/faults", Some(fault)).await;

    let mut secrets: BTreeSet<String> = BTreeSet::new();
    secrets.insert(std::fs::read_to_string(env.token_path()).unwrap().trim().to_string());
    let mut scraped = String::new();
    // Run through several rotations and token re-logins, scraping everything.
    let rotated = eventually(25, async || {
        secrets_in_state(&state, &mut secrets);
        if let Some(creds) = env.read_json("db.json") {
            secrets.extend(creds["password"].as_str().map(str::to_string));
            secrets.extend(creds["lease_id"].as_str().map(str::to_string));
        }
        for path in ["/metrics", "/v1/status", "/readyz", "/healthz"] {
            scraped.push_str(&get(&addr, path).await.1);
        }
        env.requests().await.iter().filter(|r| r.path == "database/creds/app").count() >= 4
    })
    .await;
    assert!(rotated, "{}", agent.output());
    let mut status = Agent::spawn(&["status", "--addr", &addr], env.dir.path()).await;
    status.wait(Duration::from_secs(10)).await;
    scraped.push_str(&status.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());

    // Service tokens: `hvs.` on devvault (Vault's prefix), `s.` on OpenBao.
    let tokens = secrets.iter().filter(|s| s.starts_with("hvs.") || s.starts_with("s.")).count();
    let leases = secrets.iter().filter(|s| s.starts_with("database/creds/app/")).count();
    assert!(
        tokens >= 2 && leases >= 3 && secrets.len() >= 9,
        "collected {} secrets ({tokens} tokens, {leases} leases)",
        secrets.len()
    );
    let output = agent.output();
    assert!(output.lines().count() > 50, "debug logging produced output");
    for secret in &secrets {
        assert!(!output.contains(secret.as_str()), "agent output leaks a secret of {} chars", secret.len());
        assert!(!scraped.contains(secret.as_str()), "telemetry leaks a secret of {} chars", secret.len());
    }
}

/// The agent's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// #23: every slow connection to telemetry cost ~18 KB with no cap (the
/// chart's 32 Mi limit: an OOM kill at ~1,400). Now at most 128 are open;
/// at the cap the oldest one that has sent no request is closed, so the
/// probes, which send theirs at once, are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_flood_neither_grows_the_agent_nor_keeps_probes_out() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let mut agent = env.spawn(&env.config("", "")).await;
    let addr = telemetry_addr(&agent).await;
    assert!(eventually(20, async || get(&addr, "/readyz").await.0 == 200).await, "{}", agent.output());
    let pid = agent.child.id().unwrap();
    let before = rss_kib(pid);

    let mut silent = Vec::new();
    for i in 0..3000 {
        silent.extend(tokio::net::TcpStream::connect(&addr).await.ok());
        if i % 500 == 499 {
            let probe = reqwest::Client::new().get(format!("http://{addr}/healthz")).timeout(Duration::from_secs(1));
            let status = probe.send().await.map(|r| r.status().as_u16());
            assert_eq!(status.as_ref().ok(), Some(&200), "/healthz during the flood ({} open): {status:?}", i + 1);
        }
    }
    // Each connection is accepted (or evicted) by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 6 * 1024, "3,000 silent connections grew the agent by {grown} KiB");
    assert_eq!(get(&addr, "/metrics").await.0, 200);
    drop(silent);
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_served_to_loopback_only_unless_configured() {
    // #23: /v1/status named every lease and error to whoever reached the
    // telemetry port (0.0.0.0 by default). A non-loopback address of this
    // host: the host's end of a veth pair the test creates.
    let ns = crate::outage::Netns::create();
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    for (status, from_elsewhere) in [("", 404), ("  status: all\n", 200), ("  status: none\n", 404)] {
        let config = env.config("", "");
        let text = std::fs::read_to_string(&config).unwrap();
        let text =
            text.replace("telemetry:\n  listen: 127.0.0.1:0\n", &format!("telemetry:\n  listen: 0.0.0.0:0\n{status}"));
        std::fs::write(&config, text).unwrap();
        let mut agent = env.spawn(&config).await;
        let port = telemetry_addr(&agent).await.rsplit(':').next().unwrap().to_string();
        let (local, elsewhere) = (format!("127.0.0.1:{port}"), format!("{}:{port}", ns.host_ip));
        assert!(eventually(20, async || get(&local, "/readyz").await.0 == 200).await, "{}", agent.output());
        let want_local = if status.contains("none") { 404 } else { 200 };
        assert_eq!(get(&local, "/v1/status").await.0, want_local, "{status:?} from loopback");
        assert_eq!(get(&elsewhere, "/v1/status").await.0, from_elsewhere, "{status:?} from {elsewhere}");
        // Probes and metrics are served to everyone whatever the setting.
        assert_eq!(get(&elsewhere, "/readyz").await.0, 200);
        assert_eq!(get(&elsewhere, "/metrics").await.0, 200);
        agent.signal(Signal::SIGTERM);
        assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    }
}

/// Every `leasehold_*` metric named in `text` (rules, dashboard queries).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("leasehold_") {
        let name: String =
            rest[i..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        names.insert(name);
    }
    names
}

/// The sample names a scrape can hold, from its `# TYPE` lines (a counter
/// `x` is sampled as `x_total`, a histogram as `x_bucket`, `_sum`, `_count`).
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in metrics.lines() {
        let Some(rest) = l.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        names.insert(name.to_string());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[],
        };
        for s in suffixes {
            names.insert(format!("{}{s}", name.trim_end_matches("_total")));
        }
    }
    names
}

/// #24: the alert rules (the docs' and the chart's) and the Grafana
/// dashboard name only metrics a live agent exports (one with a database
/// secret behind the proxy and two KV secrets); a KV secret exports no
/// expiry, so no rule on time left can fire for it; a template that fails
/// at run time moves the render failure counter and the failures gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_name_only_exported_metrics() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    env.api.ok("POST", "sys/mounts/kv", Some(json!({"type": "kv", "options": {"version": "2"}}))).await;
    env.api.ok("POST", "kv/data/app", Some(json!({"data": {"api_key": "one"}}))).await;
    let (port, dir) = (crate::proxy::free_port(), env.secrets().display().to_string());
    let secrets = format!(
        "{}  - name: kv\n    path: kv/data/app\n    files:\n      - path: {dir}/kv.env\n        template: \"API_KEY={{{{ data.data.api_key }}}}\"\n  - name: broken\n    path: kv/data/app\n    files:\n      - path: {dir}/broken.env\n        template: \"X={{{{ data.data.missing }}}}\"\n",
        crate::proxy::proxied("db", &env, port, &format!("127.0.0.1:{}", env.pg.port), "disable")
    );
    let mut agent = env.spawn(&env.config_with_secrets(&secrets)).await;
    let addr = telemetry_addr(&agent).await;
    let mut metrics = String::new();
    let ok = eventually(20, async || {
        metrics = get(&addr, "/metrics").await.1;
        sample(&metrics, "leasehold_render_failures_total{secret=\"broken\"}").is_some_and(|n| n >= 1.0)
            && sample(&metrics, "leasehold_secret_ready{secret=\"kv\"}") == Some(1.0)
            && sample(&metrics, "leasehold_secret_ready{secret=\"db\"}") == Some(1.0)
    })
    .await;
    assert!(ok, "{metrics}\n{}", agent.output());
    assert!(sample(&metrics, "leasehold_secret_consecutive_failures{secret=\"broken\"}").is_some_and(|n| n >= 1.0));
    assert!(sample(&metrics, "leasehold_lease_expiry_timestamp_seconds{secret=\"db\"}").is_some());
    assert!(
        !metrics.contains("leasehold_lease_expiry_timestamp_seconds{secret=\"kv\"}"),
        "no expiry for a KV secret:\n{metrics}"
    );

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let have = exported(&metrics);
    for file in [
        "docs/observability.md",
        "charts/leasehold/templates/prometheusrule.yaml",
        "charts/leasehold/dashboards/leasehold.json",
    ] {
        let mut text = std::fs::read_to_string(root.join(file)).unwrap();
        if file.ends_with(".md") {
            // The rules' block, not the table of every metric.
            let rules = text.split("## Alert rules").nth(1).and_then(|t| t.split("## ").next()).unwrap();
            text = rules.to_string();
        }
        let named = metric_names(&text);
        assert!(named.len() >= 5, "{file} names metrics: {named:?}");
        let missing: Vec<&String> = named.iter().filter(|n| !have.contains(*n)).collect();
        assert!(missing.is_empty(), "{file} names metrics the agent does not export: {missing:?}");
    }
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

/// #24: a destination directory that does not exist made the agent create
/// and drop a database user every few seconds. Now nothing is asked of
/// Vault until the files can be written, `/readyz` says which directory,
/// and once it exists the credentials follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_destination_directory_asks_vault_nothing() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let missing = env.secrets().join("not-yet");
    let secrets = format!(
        "  - name: db\n    path: database/creds/app\n    files:\n      - path: {}/db.json\n        format: json\n",
        missing.display()
    );
    let mut agent = env.spawn(&env.config_with_secrets(&secrets)).await;
    let addr = telemetry_addr(&agent).await;
    // Four attempts (0.5 s doubling): none of them reached Vault.
    assert!(eventually(20, async || agent.events("render_failed").len() >= 4).await, "{}", agent.output());
    let creds = async || env.requests().await.iter().filter(|r| r.path == "database/creds/app").count();
    assert_eq!(creds().await, 0, "no credentials asked for files that cannot be written");
    let (code, body) = get(&addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&format!("the directory {} does not exist", missing.display())), "{body}");
    // `leasehold status` takes the address as users type it, and says no.
    let mut status = Agent::spawn(&["status", &format!("http://{addr}")], env.dir.path()).await;
    assert_eq!(status.wait(Duration::from_secs(10)).await, 1, "not ready: {}", status.output());
    assert!(status.output().contains("not ready: db: not rendered yet"), "{}", status.output());

    std::fs::create_dir(&missing).unwrap();
    assert!(eventually(40, async || get(&addr, "/readyz").await.0 == 200).await, "{}", agent.output());
    assert_eq!(creds().await, 1, "one user, once the files can be written");
    let port = addr.rsplit(':').next().unwrap();
    let mut status = Agent::spawn(&["status", &format!(":{port}")], env.dir.path()).await;
    assert_eq!(status.wait(Duration::from_secs(10)).await, 0, "ready: {}", status.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}

/// #24: a template that fails at run time on the first credentials made
/// the agent revoke them and issue new ones at every retry (a database user
/// created and dropped every few seconds). The lease is now kept, only the
/// writing is retried, `/readyz` says why, and SIGTERM still revokes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_failing_at_run_time_keeps_its_lease_and_retries_the_writing() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let secrets = format!(
        "  - name: db\n    path: database/creds/app\n    files:\n      - path: {}/db.url\n        template: \"{{{{ data.port }}}}\"\n",
        env.secrets().display()
    );
    let mut agent = env.spawn(&env.config_with_secrets(&secrets)).await;
    let addr = telemetry_addr(&agent).await;
    assert!(eventually(20, async || agent.events("render_failed").len() >= 3).await, "{}", agent.output());
    let creds = env.requests().await.iter().filter(|r| r.path == "database/creds/app").count();
    assert_eq!(creds, 1, "one user, kept: {}", agent.output());
    assert!(agent.events("revoked").is_empty(), "not revoked: {}", agent.output());
    let (code, body) = get(&addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("`data.port` is not defined (data has: password, username)"), "{body}");
    assert_eq!(agent.events("render_pending").len(), 1, "{}", agent.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert_eq!(agent.events("revoked").len(), 1, "revoked at shutdown: {}", agent.output());
}
