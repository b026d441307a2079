//! The fault matrix: the real binary against OpenBao (devvault's proxy in
//! front injects the faults; a TCP relay in front of that refuses
//! connections for real) and the real PostgreSQL. Every scenario asserts
//! the two things a user cares about:
//!
//! - **the app's credentials stay usable**: an app stand-in reads
//!   `db.json` all the time and logs in to PostgreSQL with what it holds;
//!   every refused login is a failure (unless the file moved on meanwhile,
//!   or the scenario kills those credentials on purpose and names them),
//!   and so is a file that vanishes or stops parsing;
//! - **nothing is left alive after SIGTERM**: no lease under the role in
//!   Vault, no PostgreSQL role Vault ever issued to this agent, no token
//!   it logged in with.
//!
//! and that no secret it saw (password, token, JWT, full lease id) is in
//! the agent's output, metrics or status. docs/reliability.md is the table
//! of these scenarios.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Agent, Env, Ttls, eventually};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the app stand-in saw.
#[derive(Default, Debug)]
struct Seen {
    /// Every username the file held, in order.
    versions: Vec<String>,
    /// Logins refused while the file still held that version.
    failures: Vec<String>,
    /// Reads that found the file missing or unparsable after it was written.
    broken: Vec<String>,
}

/// The application: every 200 ms, read `db.json` and log in with it.
struct App {
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    fn start(env: &Env) -> App {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = CancellationToken::new();
        let file = env.secrets().join("db.json");
        let pg = env.pg;
        let (s, st) = (seen.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !st.is_cancelled() {
                let text = std::fs::read_to_string(&file).ok();
                let creds = text.as_deref().and_then(|t| serde_json::from_str::<Value>(t).ok());
                match creds {
                    None => {
                        let mut s = s.lock().unwrap();
                        if !s.versions.is_empty() {
                            s.broken.push(format!("{:?}", text.map(|t| t.len())));
                        }
                    }
                    Some(c) => {
                        let user = c["username"].as_str().unwrap_or_default().to_string();
                        let password = c["password"].as_str().unwrap_or_default().to_string();
                        {
                            let mut s = s.lock().unwrap();
                            if s.versions.last() != Some(&user) {
                                s.versions.push(user.clone());
                            }
                        }
                        // Every refused login counts, unless the file moved on
                        // meanwhile (the app would reload it): a scenario
                        // that kills credentials on purpose names them.
                        if let Err(e) = pg.connect(&user, &password).await {
                            let now = std::fs::read_to_string(&file).ok();
                            let still = now.as_deref().and_then(|t| serde_json::from_str::<Value>(t).ok());
                            if still.is_some_and(|n| n["username"] == user.as_str()) {
                                s.lock().unwrap().failures.push(format!("{user}: {e}"));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        App { seen, stop, task }
    }

    /// Stops once it has seen what the file holds now.
    async fn stop(self, env: &Env) -> Seen {
        let now = env.read_json("db.json").and_then(|c| c["username"].as_str().map(str::to_string));
        eventually(5, async || now.is_none() || self.seen.lock().unwrap().versions.last() == now.as_ref()).await;
        self.stop.cancel();
        let _ = self.task.await;
        Arc::try_unwrap(self.seen).map(|m| m.into_inner().unwrap()).unwrap_or_default()
    }
}

/// A TCP relay in front of the server: `down()` closes its port (the
/// agent's connections are refused, as for a Vault that is not there) and
/// cuts the open connections; `up()` listens on the same port again.
struct Relay {
    port: u16,
    upstream: String,
    run: Mutex<CancellationToken>,
}

impl Relay {
    async fn start(upstream: &str) -> Arc<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
        let relay = Arc::new(Relay { port, upstream, run: Mutex::new(CancellationToken::new()) });
        relay.serve(listener);
        relay
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn serve(&self, listener: TcpListener) {
        let run = self.run.lock().unwrap().clone();
        let upstream = self.upstream.clone();
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = listener.accept() => c,
                    _ = run.cancelled() => return,
                };
                let Ok((mut inbound, _)) = conn else { continue };
                let (upstream, run) = (upstream.clone(), run.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = run.cancelled() => {}
                    }
                });
            }
        });
    }

    fn down(&self) {
        self.run.lock().unwrap().cancel();
    }

    async fn up(&self) {
        *self.run.lock().unwrap() = CancellationToken::new();
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.expect("the relay's port again");
        self.serve(listener);
    }
}

/// The config of every scenario: `db.json` plus `extra` under the secret,
/// `top` at the top level, a state dir, Vault at `address`.
fn config(env: &Env, address: &str, extra: &str, top: &str) -> std::path::PathBuf {
    let path = env.config(extra, &format!("state_dir: {}/state\n{top}", env.dir.path().display()));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen(&format!("address: {}", env.url()), &format!("address: {address}"), 1))
        .unwrap();
    path
}

/// Adds `line` under `vault:`.
fn vault_key(config: &std::path::Path, line: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(config, text.replacen("vault:\n", &format!("vault:\n  {line}\n"), 1)).unwrap();
}

async fn first_creds(env: &Env, agent: &Agent) -> String {
    assert!(eventually(30, async || env.read_json("db.json").is_some()).await, "db.json written:\n{}", agent.output());
    env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string()
}

/// The raw audit log (the test device logs values unhashed).
fn audit_raw(env: &Env) -> Vec<Value> {
    let bao = env.openbao().expect("the matrix runs on OpenBao");
    let text = std::fs::read_to_string(bao.dir().join("audit.log")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Usernames Vault issued for role `app`, token accessors it handed out at
/// login, and every secret value in its answers to the agent.
struct Issued {
    users: BTreeSet<String>,
    accessors: BTreeSet<String>,
    secrets: BTreeSet<String>,
}

fn issued(env: &Env) -> Issued {
    let mut out = Issued { users: BTreeSet::new(), accessors: BTreeSet::new(), secrets: BTreeSet::new() };
    out.secrets.insert(std::fs::read_to_string(env.token_path()).unwrap().trim().to_string());
    for e in audit_raw(env).iter().filter(|e| e["type"] == "response") {
        let path = e["request"]["path"].as_str().unwrap_or_default();
        let resp = &e["response"];
        if path == "database/creds/app" {
            out.users.extend(resp["data"]["username"].as_str().map(str::to_string));
            out.secrets.extend(resp["data"]["password"].as_str().map(str::to_string));
            out.secrets.extend(resp["secret"]["lease_id"].as_str().map(str::to_string));
        }
        if path.ends_with("/login") {
            out.accessors.extend(resp["auth"]["accessor"].as_str().filter(|a| !a.is_empty()).map(str::to_string));
            out.secrets.extend(resp["auth"]["client_token"].as_str().map(str::to_string));
        }
        out.secrets.extend(e["request"]["data"]["jwt"].as_str().map(str::to_string));
    }
    out.secrets.retain(|s| s.len() >= 8);
    out
}

/// After the agent exited: no lease under the role, no role Vault issued,
/// no token it logged in with.
async fn assert_nothing_alive(env: &Env) {
    env.clear_faults().await;
    let root = env.openbao().map(|b| devvault::testing::Api::new(&b.url(), Some(&b.root_token))).unwrap();
    let (status, body) = root.call("LIST", "sys/leases/lookup/database/creds/app/", None).await;
    let keys = body["data"]["keys"].as_array().cloned().unwrap_or_default();
    assert!(status == 404 || keys.is_empty(), "leases left in Vault: {status} {keys:?}");
    let issued = issued(env);
    assert!(!issued.users.is_empty(), "the audit log names the users issued");
    for user in &issued.users {
        assert!(!env.pg.role_exists(user).await, "PostgreSQL role {user} is still there");
    }
    for accessor in &issued.accessors {
        let (status, _) = root.call("POST", "auth/token/lookup-accessor", Some(json!({ "accessor": accessor }))).await;
        assert_ne!(status, 200, "token {accessor} is still alive");
    }
}

/// No secret Vault handed this agent is in its output or telemetry.
fn assert_no_leak(env: &Env, agent: &Agent, scraped: &str) {
    let issued = issued(env);
    let output = agent.output();
    for secret in &issued.secrets {
        assert!(!output.contains(secret.as_str()), "agent output leaks a secret of {} chars", secret.len());
        assert!(!scraped.contains(secret.as_str()), "telemetry leaks a secret of {} chars", secret.len());
    }
}

async fn scrape(agent: &Agent) -> String {
    let Some(addr) = agent.telemetry_addr() else { return String::new() };
    let mut out = String::new();
    for path in ["/metrics", "/v1/status", "/readyz"] {
        if let Ok(r) = reqwest::get(format!("http://{addr}{path}")).await {
            out.push_str(&r.text().await.unwrap_or_default());
        }
    }
    out
}

/// The end of every scenario: the app saw no failure (but for `excused`
/// users, killed out of band) and no broken file, SIGTERM exits 0, nothing
/// is left alive, nothing leaked.
async fn finish(env: &Env, mut agent: Agent, app: App, excused: &[&str]) -> Seen {
    let scraped = scrape(&agent).await;
    let seen = app.stop(env).await;
    let failures: Vec<&String> =
        seen.failures.iter().filter(|f| !excused.iter().any(|u| f.starts_with(&format!("{u}:")))).collect();
    assert!(failures.is_empty(), "the app's credentials were refused: {failures:?}\n{}", agent.output());
    assert!(seen.broken.is_empty(), "db.json vanished or broke: {:?}", seen.broken);
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(20)).await, 0, "{}", agent.output());
    assert_nothing_alive(env).await;
    assert_no_leak(env, &agent, &scraped);
    seen
}

fn ttls<'a>(db_ttl: &'a str, db_max: &'a str) -> Ttls<'a> {
    Ttls { db_ttl, db_max, token_ttl: "1h", token_max: "2h" }
}

/// The usernames of `versions` after the first, for scenarios that must
/// end with new credentials.
fn replaced(seen: &Seen, first: &str) -> bool {
    seen.versions.first().map(String::as_str) == Some(first) && seen.versions.len() >= 2
}

async fn ready(agent: &Agent) -> u16 {
    let Some(addr) = agent.telemetry_addr() else { return 0 };
    match reqwest::get(format!("http://{addr}/readyz")).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

// ---- Vault unreachable -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_refusing_connections_through_a_renewal_window() {
    let env = Env::openbao_only(ttls("8s", "1h")).await;
    let relay = Relay::start(&env.url()).await;
    let agent = env.spawn(&config(&env, &relay.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    let app = App::start(&env);
    relay.down();
    // Refused across the renewal at 4 s; the re-issue it turns into too.
    assert!(eventually(15, async || !agent.events("renew_failed").is_empty()).await, "{}", agent.output());
    relay.up().await;
    assert!(env.rotated_from(&first, 10).await, "new credentials once Vault was back:\n{}", agent.output());
    let seen = finish(&env, agent, app, &[]).await;
    assert!(replaced(&seen, &first), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_past_the_lease_end() {
    let env = Env::openbao_only(ttls("3s", "1h")).await;
    let relay = Relay::start(&env.url()).await;
    let agent = env.spawn(&config(&env, &relay.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    assert!(eventually(10, async || ready(&agent).await == 200).await);
    let app = App::start(&env);
    let before = std::fs::read(env.secrets().join("db.json")).unwrap();
    relay.down();
    // The lease ends unrenewed: not ready, the file kept as it was.
    assert!(eventually(15, async || ready(&agent).await == 503).await, "readiness drops:\n{}", agent.output());
    assert_eq!(std::fs::read(env.secrets().join("db.json")).unwrap(), before, "files kept while Vault is down");
    // Said at ERROR when it happens, once, and counted (#21: only /readyz told).
    assert!(eventually(5, async || agent.events("lease_expired").len() == 1).await, "{}", agent.output());
    let dead = &agent.events("lease_expired")[0];
    assert_eq!(dead["level"], "ERROR", "{dead}");
    assert!(dead["dead_for_ms"].as_u64().is_some_and(|ms| ms < 1_000), "reported at the end, not later: {dead}");
    let metrics = scrape(&agent).await;
    assert!(metrics.contains("leasehold_credentials_expired_total{secret=\"db\"} 1"), "{metrics}");
    relay.up().await;
    assert!(env.rotated_from(&first, 20).await, "recovery re-issues:\n{}", agent.output());
    assert!(eventually(10, async || ready(&agent).await == 200).await);
    // The first credentials died with their lease while Vault was away:
    // nothing could replace them, so their refusals are expected.
    let seen = finish(&env, agent, app, &[&first]).await;
    assert!(replaced(&seen, &first), "{seen:?}");
}

// ---- Vault failing -----------------------------------------------------

/// `status` on every renewal from the start: the requests stay bounded,
/// and the credentials are replaced before their lease ends.
async fn renewal_storm(status: u16) {
    let env = Env::openbao_only(ttls("4s", "1h")).await;
    env.fault(json!({"path_prefix": "sys/leases/renew", "status": status, "errors": ["storm"], "count": 0})).await;
    let agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    let app = App::start(&env);
    // Three leases' worth of time.
    assert!(
        eventually(30, async || env.requests().await.iter().filter(|r| r.path == "database/creds/app").count() >= 4)
            .await,
        "{}",
        agent.output()
    );
    let reqs = env.requests().await;
    let issues = reqs.iter().filter(|r| r.path == "database/creds/app").count();
    let renews = reqs.iter().filter(|r| r.path == "sys/leases/renew").count();
    // The client's 3 retries, and the supervisor's backoff: no storm back.
    assert!(renews <= 6 * issues, "{renews} renewals for {issues} leases");
    let seen = finish(&env, agent, app, &[]).await;
    assert!(replaced(&seen, &first), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_on_renewals() {
    renewal_storm(503).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_on_renewals() {
    renewal_storm(429).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_412_storm_on_renewals() {
    renewal_storm(412).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_on_issues_is_backed_off_and_the_old_lease_kept() {
    let env = Env::openbao_only(ttls("3s", "6s")).await;
    let agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    let app = App::start(&env);
    env.fault(json!({"path_prefix": "database/creds/app", "status": 503, "errors": ["storm"], "count": 0})).await;
    // Past the max TTL of 6 s: the re-issue keeps failing.
    tokio::time::sleep(Duration::from_secs(8)).await; // the storm's length, not an assertion
    let failed = env.requests().await.iter().filter(|r| r.path == "database/creds/app" && r.status == 503).count();
    assert!((1..=25).contains(&failed), "{failed} issue attempts in 8 s");
    env.clear_faults().await;
    assert!(env.rotated_from(&first, 20).await, "{}", agent.output());
    // The first lease reached its max TTL during the storm: expected.
    finish(&env, agent, app, &[&first]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_slower_than_request_timeout() {
    let env = Env::openbao_only(ttls("6s", "1h")).await;
    let path = config(&env, &env.url(), "", "");
    vault_key(&path, "request_timeout: 1s");
    let agent = env.spawn(&path).await;
    let first = first_creds(&env, &agent).await;
    let app = App::start(&env);
    env.fault(json!({"path_prefix": "sys/leases/renew", "after": true, "delay_ms": 2500, "count": 4})).await;
    assert!(eventually(20, async || !agent.events("renew_failed").is_empty()).await, "{}", agent.output());
    assert!(
        eventually(20, async || !agent.events("renewed").is_empty()
            || env.read_json("db.json").unwrap()["username"] != first)
        .await
    );
    finish(&env, agent, app, &[]).await;
}

// ---- Bad answers -------------------------------------------------------

/// Every fault with a count has been used up: the requests it was for
/// reached the proxy.
async fn faults_used_up(env: &Env) -> bool {
    env.api.ok("GET", "sys/devvault/faults", None).await["data"]["faults"].as_array().is_some_and(Vec::is_empty)
}

/// Bodies a broken server or proxy might send: not JSON, cut short, and
/// the right shape with the wrong types.
const BAD_BODIES: [&str; 3] = [
    "<html>502 Bad Gateway</html>",
    r#"{"lease_id": "database/creds/app/x", "lease_duration": 3"#,
    r#"{"lease_id": 7, "lease_duration": "soon", "renewable": "yes", "data": [], "auth": {"client_token": 1, "lease_duration": "x"}}"#,
];

/// Each bad body once on `path_prefix` (`after`: the server acted first);
/// the agent logs the failure, recovers, and the app never notices.
async fn bad_answers(path_prefix: &str, after: bool, ttls: Ttls<'_>) -> (Env, Agent, App, String) {
    let env = Env::openbao_only(ttls).await;
    let agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    let app = App::start(&env);
    for body in BAD_BODIES {
        env.fault(json!({"path_prefix": path_prefix, "after": after, "body": body, "count": 1})).await;
    }
    assert!(
        eventually(40, async || faults_used_up(&env).await).await,
        "every bad answer was sent:\n{}",
        agent.output()
    );
    (env, agent, app, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_in_lease_renewals() {
    let (env, agent, app, first) = bad_answers("sys/leases/renew", true, ttls("3s", "1h")).await;
    assert!(!agent.events("renew_failed").is_empty(), "{}", agent.output());
    assert!(agent.output().contains("unexpected response from Vault"), "{}", agent.output());
    let seen = finish(&env, agent, app, &[]).await;
    assert!(seen.versions.len() >= 2 && seen.versions[0] == first, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_in_credentials() {
    // At the first issue, so no credentials the app holds are at stake
    // (at a re-issue, three failures in a row with backoff can outlast the
    // overlap). The server issued each time: the leases the agent could
    // not read belong to its token, which revoke-self takes down at the end.
    let env = Env::openbao_only(ttls("1h", "2h")).await;
    for body in BAD_BODIES {
        env.fault(json!({"path_prefix": "database/creds/app", "after": true, "body": body, "count": 1})).await;
    }
    let agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    first_creds(&env, &agent).await;
    let app = App::start(&env);
    assert_eq!(agent.events("issue_failed").len(), BAD_BODIES.len(), "{}", agent.output());
    assert_eq!(issued(&env).users.len(), BAD_BODIES.len() + 1, "Vault issued each time");
    finish(&env, agent, app, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_in_logins_and_token_renewals() {
    let env = Env::openbao_only(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "3s", token_max: "8s" }).await;
    for body in BAD_BODIES {
        env.fault(json!({"path_prefix": "auth/kubernetes/login", "body": body, "count": 1})).await;
        env.fault(json!({"path_prefix": "auth/token/renew-self", "after": true, "body": body, "count": 1})).await;
    }
    let agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    first_creds(&env, &agent).await;
    let app = App::start(&env);
    assert!(
        eventually(40, async || faults_used_up(&env).await).await,
        "every bad answer was sent:\n{}",
        agent.output()
    );
    assert!(agent.events("login_failed").len() >= 3, "{}", agent.output());
    assert!(!agent.events("token_renew_failed").is_empty(), "{}", agent.output());
    finish(&env, agent, app, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_in_lookups_at_adoption() {
    let env = Env::openbao_only(ttls("1h", "2h")).await;
    let path = config(&env, &env.url(), "", "");
    let mut agent = env.spawn(&path).await;
    let first = first_creds(&env, &agent).await;
    agent.signal(Signal::SIGKILL);
    agent.wait(Duration::from_secs(10)).await;
    for body in BAD_BODIES {
        env.fault(json!({"path_prefix": "auth/token/lookup-self", "body": body, "count": 1})).await;
        env.fault(json!({"path_prefix": "sys/leases/lookup", "body": body, "count": 1})).await;
    }
    // Restarts until every bad answer was sent; never a second set of
    // credentials for a lease Vault still holds.
    let mut last = None;
    for _ in 0..BAD_BODIES.len() {
        let a = env.spawn(&path).await;
        assert!(
            eventually(20, async || env.read_json("db.json").is_some() && !a.events("ready").is_empty()).await,
            "{}",
            a.output()
        );
        a.signal(Signal::SIGKILL);
        last = Some(a);
    }
    let mut last = last.unwrap();
    last.wait(Duration::from_secs(10)).await;
    env.clear_faults().await;
    let agent = env.spawn(&path).await;
    assert!(eventually(20, async || !agent.events("ready").is_empty()).await, "{}", agent.output());
    let app = App::start(&env);
    let seen = finish(&env, agent, app, &[]).await;
    let users = issued(&env).users;
    // A lookup Vault answered badly says nothing about the lease: kept.
    assert_eq!(users.len(), 1, "one set of credentials in all: {users:?}");
    assert_eq!(seen.versions, vec![first]);
}

// ---- Out of band -------------------------------------------------------

fn root(env: &Env) -> devvault::testing::Api {
    let bao = env.openbao().unwrap();
    devvault::testing::Api::new(&bao.url(), Some(&bao.root_token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_out_of_band() {
    let env = Env::openbao_only(ttls("4s", "1h")).await;
    let agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    let app = App::start(&env);
    let lease = env.read_json("db.json").unwrap()["lease_id"].as_str().unwrap().to_string();
    root(&env).ok("PUT", &format!("sys/leases/revoke/{lease}"), None).await;
    assert!(env.rotated_from(&first, 15).await, "re-issued at the next renewal:\n{}", agent.output());
    assert_eq!(agent.events("lease_gone").len(), 1, "{}", agent.output());
    finish(&env, agent, app, &[&first]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_revoked_out_of_band() {
    let env = Env::openbao_only(Ttls { db_ttl: "4s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    let app = App::start(&env);
    let accessor = issued(&env).accessors.into_iter().next().unwrap();
    // Revoking the token revokes its leases: the app's credentials die now.
    root(&env).ok("POST", "auth/token/revoke-accessor", Some(json!({ "accessor": accessor }))).await;
    assert!(env.rotated_from(&first, 15).await, "logged in again and re-issued:\n{}", agent.output());
    assert!(agent.events("login").len() >= 2, "{}", agent.output());
    finish(&env, agent, app, &[&first]).await;
}

// ---- The ServiceAccount token ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_token_missing_for_a_while() {
    // Tokens of 3 s that cannot be renewed past 3 s: a login every 1.5 s.
    let env = Env::openbao_only(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "3s", token_max: "3s" }).await;
    let agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    let app = App::start(&env);
    let jwt = std::fs::read(env.token_path()).unwrap();
    std::fs::remove_file(env.token_path()).unwrap();
    assert!(eventually(10, async || !agent.events("login_failed").is_empty()).await, "{}", agent.output());
    let failed = agent.events("login_failed");
    assert!(failed[0]["error"].as_str().unwrap_or_default().contains("sa-token"), "names the file: {:?}", failed[0]);
    // Back, by a symlink swap as the kubelet does it.
    let target = env.dir.path().join("..2026_12_02");
    std::fs::write(&target, jwt).unwrap();
    std::os::unix::fs::symlink(&target, env.token_path()).unwrap();
    let logins = agent.events("login").len();
    assert!(eventually(10, async || agent.events("login").len() > logins).await, "{}", agent.output());
    // The credentials died with the token they were bound to; the file
    // says when (their `expires_at`), so the app check excuses them.
    assert!(eventually(15, async || ready(&agent).await == 200).await, "{}", agent.output());
    // Without the token file no login can replace credentials bound to a
    // dying token: the first may end with it.
    finish(&env, agent, app, &[&first]).await;
}

// ---- The target directory ----------------------------------------------

/// A small tmpfs mounted on the secrets directory (the test runs as root,
/// as CI does); unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path) -> Tmpfs {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount runs");
        assert!(out.status.success(), "a tmpfs is needed (run as root): {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, opts: &str) {
        let out = std::process::Command::new("mount").args(["-o", &format!("remount,{opts}")]).arg(&self.0).output();
        assert!(out.is_ok_and(|o| o.status.success()), "remount {opts}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The file system refuses the next render (`break_it`), then is fixed:
/// the good file is untouched meanwhile, the lease that could not be
/// rendered is revoked, and the next re-issue succeeds.
async fn unwritable(break_it: impl Fn(&Tmpfs), fix: impl Fn(&Tmpfs)) {
    let env = Env::openbao_only(ttls("3s", "5s")).await;
    let fs = Tmpfs::mount(&env.secrets());
    let agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    let app = App::start(&env);
    let before = std::fs::read(env.secrets().join("db.json")).unwrap();
    break_it(&fs);
    assert!(eventually(15, async || !agent.events("render_failed").is_empty()).await, "{}", agent.output());
    assert_eq!(std::fs::read(env.secrets().join("db.json")).unwrap(), before, "the good file untouched");
    // #24: each failed write used to revoke the new credentials and issue
    // others; now a lease is kept and only the writing retried (or, read
    // only, nothing is asked of Vault at all).
    let (failed, issued) = (agent.events("render_failed").len(), agent.events("issued").len());
    assert!(eventually(15, async || agent.events("render_failed").len() >= failed + 3).await, "{}", agent.output());
    let more = agent.events("issued").len() - issued;
    assert!(more <= 2, "{more} credentials issued over three failed writes:\n{}", agent.output());
    fix(&fs);
    assert!(env.rotated_from(&first, 15).await, "{}", agent.output());
    // While nothing can be written, nothing can replace the credentials:
    // the first may reach their max TTL before the fix.
    finish(&env, agent, app, &[&first]).await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_directory_read_only() {
    unwritable(|fs| fs.remount("ro"), |fs| fs.remount("rw")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_directory_full() {
    let filler = |fs: &Tmpfs| {
        // Fill it: every block but none left for a temporary file.
        let mut f = std::fs::File::create(fs.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        let _ = f.sync_all();
    };
    unwritable(filler, |fs| std::fs::remove_file(fs.0.join("filler")).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_directory_removed() {
    let env = Env::openbao_only(ttls("3s", "5s")).await;
    let agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    std::fs::remove_dir_all(env.secrets()).unwrap();
    assert!(eventually(15, async || !agent.events("render_failed").is_empty()).await, "{}", agent.output());
    let failed = &agent.events("render_failed")[0];
    assert!(failed.to_string().contains("secrets"), "names the directory: {failed}");
    // The volume comes back (the kubelet remounts it): the next re-issue renders.
    std::fs::create_dir(env.secrets()).unwrap();
    assert!(
        eventually(15, async || env.read_json("db.json").is_some_and(|c| c["username"] != first.as_str())).await,
        "{}",
        agent.output()
    );
    let app = App::start(&env);
    finish(&env, agent, app, &[]).await;
}

// ---- Signals at odd moments --------------------------------------------

/// SIGTERM while a request to `path_prefix` is held for `delay_ms` (after
/// the server acted when `after`): a prompt exit 0, nothing left alive.
async fn sigterm_during(path_prefix: &str, after: bool, ttls: Ttls<'_>, wait_for_creds: bool) {
    let env = Env::openbao_only(ttls).await;
    if !wait_for_creds {
        env.fault(json!({"path_prefix": path_prefix, "after": after, "delay_ms": 20000, "count": 1})).await;
    }
    let mut agent = env.spawn(&config(&env, &env.url(), "", "shutdown:\n  timeout: 4s\n")).await;
    if wait_for_creds {
        first_creds(&env, &agent).await;
        env.fault(json!({"path_prefix": path_prefix, "after": after, "delay_ms": 20000, "count": 1})).await;
    }
    // The held request has reached the proxy (and, with `after`, OpenBao).
    assert!(eventually(20, async || faults_used_up(&env).await).await, "the request was made:\n{}", agent.output());
    let started = std::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    let code = agent.wait(Duration::from_secs(15)).await;
    assert!(started.elapsed() < Duration::from_secs(6), "bounded by shutdown.timeout: {:?}", started.elapsed());
    assert_eq!(code, 0, "{}", agent.output());
    // Let a held request the server completed land before looking.
    env.clear_faults().await;
    assert_nothing_alive(&env).await;
    assert_no_leak(&env, &agent, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_login() {
    // Held before it reaches OpenBao: no token is ever made.
    let env = Env::openbao_only(ttls("1h", "2h")).await;
    env.fault(json!({"path_prefix": "auth/kubernetes/login", "delay_ms": 20000, "count": 1})).await;
    let mut agent = env.spawn(&config(&env, &env.url(), "", "shutdown:\n  timeout: 4s\n")).await;
    assert!(eventually(20, async || faults_used_up(&env).await).await, "{}", agent.output());
    let started = std::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
    assert!(issued(&env).users.is_empty(), "no credentials without a token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_issue() {
    // OpenBao created the user; its answer is held past the issue's grace
    // (half the budget). Nobody knows that lease's id: the token's
    // revoke-self takes it down, and the agent counts it revoked then.
    sigterm_during("database/creds/app", true, ttls("1h", "2h"), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_renew() {
    sigterm_during("sys/leases/renew", true, ttls("2s", "1h"), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_render_hook() {
    let env = Env::openbao_only(ttls("1h", "2h")).await;
    let hook = "    on_change:\n      exec: [\"/bin/sh\", \"-c\", \"sleep 30\"]\n";
    let mut agent = env.spawn(&config(&env, &env.url(), hook, "shutdown:\n  timeout: 4s\n")).await;
    first_creds(&env, &agent).await;
    let started = std::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "a hook in flight does not hold the exit: {:?}",
        started.elapsed()
    );
    assert_nothing_alive(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_vault_down_exits_1_naming_the_lease() {
    let env = Env::openbao_only(ttls("1h", "2h")).await;
    let relay = Relay::start(&env.url()).await;
    let mut agent = env.spawn(&config(&env, &relay.url(), "", "shutdown:\n  timeout: 3s\n")).await;
    first_creds(&env, &agent).await;
    relay.down();
    let started = std::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 1, "{}", agent.output());
    assert!(started.elapsed() < Duration::from_secs(5), "bounded: {:?}", started.elapsed());
    let left = agent.events("lease_left_alive");
    assert_eq!(left.len(), 1, "{}", agent.output());
    assert!(left[0]["lease"].as_str().unwrap().starts_with("database/creds/app/"));
    // The state is kept: a restart with Vault back revokes what was left.
    relay.up().await;
    let mut again = env.spawn(&config(&env, &relay.url(), "", "")).await;
    assert!(eventually(20, async || !again.events("ready").is_empty()).await, "{}", again.output());
    again.signal(Signal::SIGTERM);
    assert_eq!(again.wait(Duration::from_secs(15)).await, 0, "{}", again.output());
    assert_nothing_alive(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_130_at_once() {
    let env = Env::openbao_only(ttls("1h", "2h")).await;
    let mut agent = env.spawn(&config(&env, &env.url(), "", "shutdown:\n  timeout: 10s\n")).await;
    first_creds(&env, &agent).await;
    env.fault(json!({"path_prefix": "sys/leases/revoke", "delay_ms": 20000, "count": 0})).await;
    agent.signal(Signal::SIGTERM);
    assert!(eventually(10, async || !agent.events("shutdown").is_empty()).await);
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(5)).await, 130, "{}", agent.output());
}

// ---- Kills and restarts ------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_many_points_of_a_rotation_then_restart() {
    // A re-issue every ~2 s (max TTL 3 s); killed at a different point of
    // it each time, restarted at once.
    let env = Env::openbao_only(ttls("2s", "3s")).await;
    let path = config(&env, &env.url(), "    revoke_replaced_after: 0s", "");
    let mut agent = env.spawn(&path).await;
    first_creds(&env, &agent).await;
    for i in 0..8u64 {
        // Setup, not an assertion: spread the kills over a rotation's phases.
        tokio::time::sleep(Duration::from_millis(300 + 170 * i)).await;
        agent.signal(Signal::SIGKILL);
        agent.wait(Duration::from_secs(10)).await;
        agent = env.spawn(&path).await;
    }
    assert!(eventually(20, async || !agent.events("ready").is_empty()).await, "{}", agent.output());
    let app = App::start(&env);
    let users = issued(&env).users.len();
    // The rotations went on across the kills (adoption is asserted by
    // `a_restart_after_an_abort_adopts_the_lease` and `state::kill_9_…`).
    assert!(users >= 2, "{users}");
    // Never an orphaned role: every user Vault issued is gone at the end.
    finish(&env, agent, app, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_an_abort_adopts_the_lease() {
    // A panic aborts the release binary (`panic = "abort"`): the process
    // dies at once, as with SIGABRT, and the container restarts.
    let env = Env::openbao_only(ttls("1h", "2h")).await;
    let path = config(&env, &env.url(), "", "");
    let mut agent = env.spawn(&path).await;
    let first = first_creds(&env, &agent).await;
    agent.signal(Signal::SIGABRT);
    assert_ne!(agent.wait(Duration::from_secs(10)).await, 0);
    let again = env.spawn(&path).await;
    assert!(eventually(20, async || !again.events("lease_adopted").is_empty()).await, "{}", again.output());
    let app = App::start(&env);
    let seen = finish(&env, again, app, &[]).await;
    assert_eq!(seen.versions, vec![first], "the same credentials after the restart");
    assert_eq!(issued(&env).users.len(), 1);
}

// ---- Scale -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_50_agents_started_at_once() {
    const FLEET: usize = 50;
    let env = Env::openbao_only(ttls("8s", "1h")).await;
    let base = std::fs::read_to_string(config(&env, &env.url(), "", "")).unwrap();
    let mut agents = Vec::new();
    for i in 0..FLEET {
        let dir = env.dir.path().join(format!("pod-{i}"));
        std::fs::create_dir_all(dir.join("secrets")).unwrap();
        let text = base
            .replace(&env.secrets().display().to_string(), &dir.join("secrets").display().to_string())
            .replace(&format!("{}/state", env.dir.path().display()), &dir.join("state").display().to_string())
            .replace("  level: debug\n", "  level: info\n");
        let path = dir.join("leasehold.yaml");
        std::fs::write(&path, text).unwrap();
        agents.push((dir.clone(), Agent::spawn(&["agent", "-c", &path.display().to_string()], &dir).await));
    }
    let all_ready = async || agents.iter().all(|(_, a)| !a.events("ready").is_empty());
    assert!(eventually(60, all_ready).await, "every agent ready");
    // Each renews its lease once (at ~4 s of 8, less jitter).
    let renewed = async || agents.iter().all(|(_, a)| !a.events("renewed").is_empty());
    assert!(eventually(30, renewed).await, "every agent renewed");

    // One live set per agent: 50 leases in Vault, 50 distinct users on disk.
    let (_, body) = root(&env).call("LIST", "sys/leases/lookup/database/creds/app/", None).await;
    let leases = body["data"]["keys"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(leases, FLEET, "live leases");
    let users: BTreeSet<String> = agents
        .iter()
        .filter_map(|(dir, _)| std::fs::read_to_string(dir.join("secrets/db.json")).ok())
        .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
        .filter_map(|c| c["username"].as_str().map(str::to_string))
        .collect();
    assert_eq!(users.len(), FLEET, "distinct users on disk");

    // Jitter at work: each lease's first renewal, counted from its issue,
    // is spread out rather than at one instant.
    let audit = audit_raw(&env);
    let time = |e: &Value| humantime::parse_rfc3339_weak(&e["time"].as_str().unwrap()[..26]).unwrap();
    let mut offsets = Vec::new();
    for e in audit.iter().filter(|e| e["type"] == "response" && e["request"]["path"] == "database/creds/app") {
        let Some(lease) = e["response"]["secret"]["lease_id"].as_str() else { continue };
        let renew = audit.iter().find(|r| {
            r["type"] == "response" && r["request"]["path"].as_str() == Some(&format!("sys/leases/renew/{lease}"))
        });
        if let Some(r) = renew {
            offsets.push(time(r).duration_since(time(e)).unwrap_or_default().as_secs_f64());
        }
    }
    assert_eq!(offsets.len(), FLEET, "one first renewal per lease");
    let (min, max) = offsets.iter().fold((f64::MAX, 0f64), |(lo, hi), o| (lo.min(*o), hi.max(*o)));
    assert!(max <= 4.2, "every renewal by half the TTL: {max:.2} s");
    assert!(max - min >= 0.05, "renewals spread by jitter: {min:.3}–{max:.3} s");

    for (_, a) in &agents {
        a.signal(Signal::SIGTERM);
    }
    for (_, a) in &mut agents {
        assert_eq!(a.wait(Duration::from_secs(30)).await, 0, "{}", a.output());
    }
    assert_nothing_alive(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_restarted_and_everything_lost() {
    // Dev mode keeps nothing: after the restart the agent's token and lease
    // are unknown to the server. It logs in again and re-issues.
    let ttls = ttls("4s", "1h");
    let env = Env::openbao_only(ttls).await;
    let mut agent = env.spawn(&config(&env, &env.url(), "", "")).await;
    let first = first_creds(&env, &agent).await;
    let before: BTreeSet<String> = issued(&env).users;
    let bao = env.openbao().unwrap();
    tokio::task::block_in_place(|| bao.restart()).expect("OpenBao restarts on its port");
    env.configure(&env.api, &ttls).await;
    assert!(env.rotated_from(&first, 20).await, "re-issued on the new server:\n{}", agent.output());
    let app = App::start(&env);
    // The old server's roles are nobody's to revoke now: excused, and each
    // still ends at its VALID UNTIL (checked below).
    let old: Vec<&str> = before.iter().map(String::as_str).collect();
    let scraped = scrape(&agent).await;
    let seen = app.stop(&env).await;
    assert!(seen.failures.is_empty() && seen.broken.is_empty(), "{seen:?}");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(20)).await, 0, "{}", agent.output());
    let (_, body) = root(&env).call("LIST", "sys/leases/lookup/database/creds/app/", None).await;
    assert!(body["data"]["keys"].as_array().is_none_or(Vec::is_empty), "leases left: {body}");
    for user in issued(&env).users.iter().filter(|u| !old.contains(&u.as_str())) {
        assert!(!env.pg.role_exists(user).await, "role {user} of the new server is still there");
    }
    for user in &old {
        assert!(env.pg.valid_until(user).await.is_some(), "the old server's role {user} ends at its VALID UNTIL");
    }
    assert!(agent.events("login").len() >= 2, "logged in again:\n{}", agent.output());
    assert_no_leak(&env, &agent, &scraped);
}
