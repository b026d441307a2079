//! #22's acceptance: real connection pools through the proxy with its
//! default settings, across at least five rotations (OpenBao leases of 4 s,
//! 8 s max TTL): psycopg_pool with and without `check`, SQLAlchemy with and
//! without `pool_pre_ping`, node-postgres, HikariCP with pgjdbc (both health
//! checks), and one psycopg connection held throughout with a `SET` and
//! prepared statements. Zero failed queries; every client follows each new
//! user; no role is left after SIGTERM. The drivers are `tests/clients/`;
//! `scripts/setup-env` installs them.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::proxy::free_port;
use crate::support::{Env, Ttls, eventually};
use nix::sys::signal::Signal;
use serde_json::Value;

/// How long the clients run: at least five rotations of 8 s leases.
const SECONDS: &str = "45";

/// Runs a driver; its JSON results by client name.
async fn drive(what: &str, program: &str, args: &[&str]) -> Result<BTreeMap<String, Value>, String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{what}: cannot run {program}: {e} (scripts/setup-env installs it)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    match serde_json::from_str::<BTreeMap<String, Value>>(last) {
        Ok(r) if out.status.success() => Ok(r),
        _ => Err(format!("{what} failed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pools_see_no_failed_query_across_five_rotations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    let drivers = root.join("tests/clients");
    assert!(
        drivers.join("node_modules/pg").exists(),
        "node-postgres is not installed in tests/clients (scripts/setup-env runs npm ci there)"
    );
    let env = Env::new(Ttls { db_ttl: "4s", db_max: "8s", token_ttl: "1h", token_max: "2h" }).await;
    let port = free_port();
    // The proxy's defaults: TLS with channel binding, migrate, keep.
    let secret = format!(
        "  - name: db\n    path: database/creds/app\n    files:\n      - path: {0}/db.json\n        format: json\n      - path: {0}/db.window\n        format: template\n        template: \"{{{{ rotation_window_secs }}}}\"\n    proxy:\n      listen: 127.0.0.1:{port}\n      upstream: 127.0.0.1:{1}\n",
        env.secrets().display(),
        env.pg.port
    );
    let mut agent = env.spawn(&env.config_with_secrets(&secret)).await;
    assert!(eventually(20, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    // For apps that read the files: how long replaced credentials keep
    // working, a quarter of the 4 s TTL (reissue_at 0.75), in the template
    // context and /v1/status.
    let window = std::fs::read_to_string(env.secrets().join("db.window")).unwrap();
    assert_eq!(window, "1");
    let status: Value = reqwest::get(format!("http://{}/v1/status", agent.telemetry_addr().unwrap()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["secrets"][0]["rotation_window_secs"], 1, "{status}");

    let dsn = format!("host=127.0.0.1 port={port} user=app dbname=postgres sslmode=disable");
    let url = format!("postgresql://app@127.0.0.1:{port}/postgres");
    let jdbc = format!("jdbc:postgresql://127.0.0.1:{port}/postgres?sslmode=disable");
    let classpath =
        ["HikariCP.jar", "postgresql.jar", "slf4j-api.jar"].map(|j| format!("/usr/share/java/{j}")).join(":");
    let (pools, pool_js, pool_java) = (
        drivers.join("pools.py").display().to_string(),
        drivers.join("pool.js").display().to_string(),
        drivers.join("Pool.java").display().to_string(),
    );
    let python = python.display().to_string();
    let (py_args, js_args) = ([pools.as_str(), &dsn, SECONDS], [pool_js.as_str(), &url, SECONDS]);
    let java_args = ["-cp", &classpath, &pool_java, &jdbc, SECONDS];
    let (py, node, java) = tokio::join!(
        drive("pools.py", &python, &py_args),
        drive("pool.js", "node", &js_args),
        drive("Pool.java", "java", &java_args),
    );
    let mut results = BTreeMap::new();
    for r in [py, node, java] {
        results.extend(r.unwrap_or_else(|e| panic!("{e}\n{}", agent.output())));
    }
    let rotations = agent.events("replaced").len();
    assert!(rotations >= 5, "five rotations in {SECONDS} s: {rotations}\n{}", agent.output());
    assert_eq!(results.len(), 8, "every client reported: {:?}", results.keys());

    let mut seen: Vec<String> = Vec::new();
    for (client, r) in &results {
        let (queries, failed) = (r["queries"].as_u64().unwrap(), r["failed"].as_u64().unwrap());
        assert!(queries >= 200, "{client} ran {queries} queries");
        assert_eq!(failed, 0, "{client}: {failed} of {queries} queries failed: {}\n{}", r["failures"], agent.output());
        let users: Vec<String> = r["users"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().into()).collect();
        // Each new user in turn: at least one per rotation, none back.
        assert!(users.len() > 5, "{client} followed {} users: {users:?}", users.len());
        for (i, u) in users.iter().enumerate() {
            assert!(u.starts_with("v-"), "{client}: a Vault-made user: {u}");
            assert!(!users[..i].contains(u), "{client}: {u} came back: {users:?}");
        }
        // And the same order for every client.
        let common: Vec<&String> = users.iter().filter(|u| seen.contains(u)).collect();
        let order: Vec<&String> = seen.iter().filter(|u| users.contains(u)).collect();
        assert_eq!(common, order, "{client} saw the users in another order");
        for u in users {
            if !seen.contains(&u) {
                seen.push(u);
            }
        }
    }
    let migrated = agent.events("proxy_session_migrated").len();
    // About 20 pooled sessions (4 per psycopg_pool and HikariCP pool, one
    // per SQLAlchemy engine and node pool as they run, the held one).
    assert!(migrated >= 5 * 10, "pooled sessions moved at each rotation: {migrated}");
    let stuck = agent.events("proxy_session_unmigratable");
    assert!(stuck.is_empty(), "no pool holds what cannot move: {stuck:?}");

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    for u in seen {
        assert!(!env.pg.role_exists(&u).await, "{u} dropped");
    }
}
