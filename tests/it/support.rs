//! Harness for the agent's integration tests: the real OpenBao (`bao server
//! -dev`, with devvault's proxy in front for faults and the request log) or
//! devvault alone (`LEASEHOLD_TEST_SERVER=devvault`), the shared PostgreSQL
//! cluster, a minted ServiceAccount token, and the real `leasehold` binary
//! started with real signals.

// The harness measures real time; the agent's clock rule (clippy.toml) is not for it.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use devvault::testing::{
    Api, AuditEntry, OpenBao, PgCluster, RaftCluster, Setup, TokenReviewer, setup_postgres, shared_cluster,
};
use devvault::{DevTls, DevVault, ServiceAccountIssuer, SigningAlg};
use serde_json::Value;

/// The agent's policy for role `app`, least privilege: renew and revoke by
/// the path form, under the role's own prefixes only.
pub const POLICY: &str = r#"
path "database/creds/app" { capabilities = ["read"] }
path "database/static-creds/app-static" { capabilities = ["read"] }
path "sys/leases/renew/database/creds/app/*" { capabilities = ["update"] }
path "sys/leases/revoke/database/creds/app/*" { capabilities = ["update"] }
path "sys/leases/revoke/pki/issue/web/*" { capabilities = ["update"] }
path "kv/data/*" { capabilities = ["read"] }
path "pki/issue/web" { capabilities = ["update"] }
"#;

/// Which server the tests run against: OpenBao unless
/// `LEASEHOLD_TEST_SERVER=devvault`.
pub fn on_devvault() -> bool {
    match std::env::var("LEASEHOLD_TEST_SERVER").as_deref() {
        Ok("devvault") => true,
        Ok("openbao") | Err(_) => false,
        Ok(other) => panic!("LEASEHOLD_TEST_SERVER={other}: expected openbao or devvault"),
    }
}

/// The server under test.
pub enum Server {
    /// Real OpenBao; `proxy` (devvault `--upstream`) sits in front unless
    /// the server speaks HTTPS, whose tests talk to it directly.
    OpenBao {
        bao: OpenBao,
        proxy: Option<DevVault>,
        reviewer: TokenReviewer,
    },
    DevVault(DevVault),
    /// Three real `bao server` nodes with raft storage; the agent is given
    /// `address` (a standby, as behind a Service that balances over all).
    Raft {
        cluster: Arc<RaftCluster>,
        reviewer: TokenReviewer,
        address: String,
    },
}

pub struct Env {
    pub server: Server,
    pub api: Api,
    pub pg: &'static PgCluster,
    pub issuer: Arc<ServiceAccountIssuer>,
    pub dir: tempfile::TempDir,
    /// The CA PEM when the server speaks HTTPS; configs then carry `vault.ca_cert`.
    pub tls: Option<String>,
}

#[derive(Clone, Copy)]
pub struct Ttls<'a> {
    pub db_ttl: &'a str,
    pub db_max: &'a str,
    pub token_ttl: &'a str,
    pub token_max: &'a str,
}

impl Env {
    pub async fn new(ttls: Ttls<'_>) -> Env {
        Self::start(ttls, false).await
    }

    /// The server over HTTPS with a throwaway CA.
    pub async fn new_tls(ttls: Ttls<'_>) -> Env {
        Self::start(ttls, true).await
    }

    /// Always the real OpenBao, whatever `LEASEHOLD_TEST_SERVER` says: for
    /// what devvault does not implement (JWT auth, namespaces).
    pub async fn openbao_only(ttls: Ttls<'_>) -> Env {
        Self::start_on(ttls, false, false).await
    }

    /// A raft cluster of three real OpenBao servers, configured through
    /// the active node; the agent's address is a standby's.
    pub async fn raft(ttls: Ttls<'_>) -> Env {
        let pg = shared_cluster();
        let issuer = Arc::new(ServiceAccountIssuer::generate(SigningAlg::Es256).unwrap());
        let cluster = match tokio::task::spawn_blocking(RaftCluster::start).await.unwrap() {
            Ok(c) => Arc::new(c),
            Err(e) => panic!("the OpenBao raft cluster could not start: {e}"),
        };
        let reviewer = TokenReviewer::start(issuer.clone()).await.expect("TokenReview stand-in starts");
        let active = cluster.active().expect("an active node after start");
        let api = Api::new(&cluster.url(active), Some(&cluster.root_token));
        let address = cluster.url((active + 1) % 3);
        let server = Server::Raft { cluster, reviewer, address };
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
        let env = Env { server, api, pg, issuer, dir, tls: None };
        env.configure(&env.api, &ttls).await;
        std::fs::write(env.token_path(), env.issuer.mint("default", "app", 3600).unwrap()).unwrap();
        env
    }

    async fn start(ttls: Ttls<'_>, tls: bool) -> Env {
        Self::start_on(ttls, tls, on_devvault()).await
    }

    async fn start_on(ttls: Ttls<'_>, tls: bool, devvault: bool) -> Env {
        let pg = shared_cluster();
        let issuer = Arc::new(ServiceAccountIssuer::generate(SigningAlg::Es256).unwrap());
        let (server, api, ca) = if devvault { devvault_server(tls).await } else { openbao_server(tls, &issuer).await };
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
        let env = Env { server, api, pg, issuer, dir, tls: ca };
        env.configure(&env.api, &ttls).await;
        std::fs::write(env.token_path(), env.issuer.mint("default", "app", 3600).unwrap()).unwrap();
        if let Some(ca) = &env.tls {
            std::fs::write(env.ca_path(), ca).unwrap();
        }
        env
    }

    /// The seed article's setup through `api`: database role `app` on the
    /// shared cluster, Kubernetes auth role `app` with [`POLICY`].
    pub async fn configure(&self, api: &Api, ttls: &Ttls<'_>) {
        setup_postgres(api, self.pg, "app", ttls.db_ttl, ttls.db_max).await;
        let setup = Setup {
            api,
            k8s_role: "app",
            policy: POLICY.into(),
            token_ttl: ttls.token_ttl,
            token_max_ttl: ttls.token_max,
        };
        match &self.server {
            Server::OpenBao { reviewer, .. } | Server::Raft { reviewer, .. } => {
                setup.kubernetes_tokenreview(&reviewer.url(), self.issuer.certificate_pem()).await
            }
            Server::DevVault(_) => setup.kubernetes(&self.issuer).await,
        }
    }

    /// Creates namespace `path` (nested, `a/b`) on OpenBao and configures it
    /// as the root one is.
    pub async fn namespace(&self, path: &str, ttls: &Ttls<'_>) {
        assert!(self.openbao().is_some(), "namespaces need OpenBao (Env::openbao_only)");
        let mut parent = String::new();
        for part in path.split('/') {
            let api = if parent.is_empty() { self.api.clone() } else { self.api.in_namespace(&parent) };
            api.ok("POST", &format!("sys/namespaces/{part}"), None).await;
            parent = if parent.is_empty() { part.to_string() } else { format!("{parent}/{part}") };
        }
        self.configure(&self.api.in_namespace(path), ttls).await;
    }

    /// The address the agent is given.
    pub fn url(&self) -> String {
        match &self.server {
            Server::OpenBao { proxy: Some(p), .. } => p.url(),
            Server::OpenBao { bao, proxy: None, .. } => bao.url(),
            Server::DevVault(v) => v.url(),
            Server::Raft { address, .. } => address.clone(),
        }
    }

    /// The real server, when the tests run against it.
    pub fn openbao(&self) -> Option<&OpenBao> {
        match &self.server {
            Server::OpenBao { bao, .. } => Some(bao),
            Server::DevVault(_) | Server::Raft { .. } => None,
        }
    }

    /// OpenBao's audit log (empty on devvault).
    pub fn audit(&self) -> Vec<AuditEntry> {
        self.openbao().map(OpenBao::audit).unwrap_or_default()
    }

    pub fn token_path(&self) -> PathBuf {
        self.dir.path().join("sa-token")
    }

    /// The CA file of an HTTPS devvault.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    pub fn secrets(&self) -> PathBuf {
        self.dir.path().join("secrets")
    }

    /// A config with one secret `db` (database/creds/app) rendered to
    /// `db.json` (0640) plus `extra` YAML appended under the secret.
    pub fn config(&self, secret_extra: &str, top_extra: &str) -> PathBuf {
        let secrets = format!(
            r#"  - name: db
    path: database/creds/app
    files:
      - path: {}/db.json
        format: json
        mode: "0640"
{secret_extra}
"#,
            self.secrets().display()
        );
        self.write_config(&secrets, "  level: debug\n", top_extra)
    }

    /// Replaces the config's `auth:` block with JWT auth at the default
    /// mount, same role and token file.
    pub fn use_jwt_auth(&self, config: &Path) {
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(config, text.replace("auth:\n  kubernetes:\n", "auth:\n  jwt:\n")).unwrap();
    }

    /// A config around the given `secrets:` list items (YAML), with this
    /// Env's Vault, token and JSON logs.
    pub fn config_with_secrets(&self, secrets: &str) -> PathBuf {
        self.write_config(secrets, "", "")
    }

    fn write_config(&self, secrets: &str, log_extra: &str, top_extra: &str) -> PathBuf {
        let yaml = format!(
            r#"vault:
  address: {url}
{ca}auth:
  kubernetes:
    role: app
    token_path: {token}
secrets:
{secrets}log:
  format: json
{log_extra}telemetry:
  listen: 127.0.0.1:0
{top_extra}"#,
            url = self.url(),
            ca = if self.tls.is_some() { format!("  ca_cert: {}\n", self.ca_path().display()) } else { String::new() },
            token = self.token_path().display(),
        );
        let path = self.dir.path().join("leasehold.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    pub async fn spawn(&self, config: &Path) -> Agent {
        Agent::spawn(&["agent", "-c", &config.display().to_string()], self.dir.path()).await
    }

    /// Every request the server answered, as (time, method, path, status):
    /// devvault's request log (devvault alone, or as OpenBao's proxy), or
    /// for OpenBao over HTTPS its audit log, where the status is inferred
    /// (403 for a denial, 400 for another error, 200 with a body, else 204)
    /// and the method from the operation.
    pub async fn requests(&self) -> Vec<Req> {
        if let Server::OpenBao { bao, proxy: None, .. } = &self.server {
            return bao.audit().iter().filter(|e| e.kind == "response").map(Req::from_audit).collect();
        }
        if let Server::Raft { cluster, .. } = &self.server {
            let mut all: Vec<Req> =
                cluster.audit().iter().filter(|e| e.kind == "response").map(Req::from_audit).collect();
            all.sort_by_key(|r| r.time);
            return all;
        }
        self.api
            .requests()
            .await
            .iter()
            .map(|e| {
                let (path, lease) = split_lease(e["path"].as_str().unwrap());
                Req {
                    time: humantime::parse_rfc3339(e["time"].as_str().unwrap()).unwrap(),
                    method: e["method"].as_str().unwrap().to_string(),
                    path,
                    lease,
                    status: e["status"].as_u64().unwrap() as u16,
                    namespace: e["namespace"].as_str().unwrap().to_string(),
                }
            })
            .collect()
    }

    /// Adds a devvault fault (devvault alone or as OpenBao's proxy).
    pub async fn fault(&self, fault: Value) {
        self.api.ok("POST", "sys/devvault/faults", Some(fault)).await;
    }

    pub async fn clear_faults(&self) {
        self.api.ok("DELETE", "sys/devvault/faults", None).await;
    }

    /// Waits up to `secs` for `db.json` to name a user other than `first`
    /// (a re-issue); true when it did.
    pub async fn rotated_from(&self, first: &str, secs: u64) -> bool {
        eventually(secs, async || {
            self.read_json("db.json").and_then(|v| v["username"].as_str().map(|u| u != first)).unwrap_or(false)
        })
        .await
    }

    pub fn read_json(&self, file: &str) -> Option<Value> {
        let text = std::fs::read_to_string(self.secrets().join(file)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

#[derive(Debug, Clone)]
pub struct Req {
    pub time: SystemTime,
    pub method: String,
    /// The route: `sys/leases/renew` and `sys/leases/revoke` also for their
    /// path forms, whose lease id is in `lease`.
    pub path: String,
    pub lease: Option<String>,
    pub status: u16,
    /// The `X-Vault-Namespace` header sent ("" when none).
    pub namespace: String,
}

impl Req {
    fn from_audit(e: &AuditEntry) -> Req {
        let method = match e.operation.as_str() {
            "read" => "GET",
            "list" => "LIST",
            "delete" => "DELETE",
            _ => "PUT",
        };
        let status = if e.error.contains("permission denied") {
            403
        } else if !e.error.is_empty() {
            400
        } else if e.has_body {
            200
        } else {
            204
        };
        let time = humantime::parse_rfc3339_weak(&e.time[..19]).unwrap_or(SystemTime::UNIX_EPOCH);
        let nanos: String = e.time[20..].chars().take_while(char::is_ascii_digit).collect();
        let frac = format!("0.{nanos}").parse::<f64>().unwrap_or(0.0);
        let (path, lease) = split_lease(&e.path);
        Req {
            time: time + Duration::from_secs_f64(frac),
            method: method.into(),
            path,
            lease,
            status,
            namespace: String::new(),
        }
    }
}

/// `sys/leases/renew/<id>` → (`sys/leases/renew`, `Some(id)`); other paths unchanged.
pub fn split_lease(path: &str) -> (String, Option<String>) {
    for route in ["sys/leases/renew/", "sys/leases/revoke/"] {
        if let Some(id) = path.strip_prefix(route) {
            return (route.trim_end_matches('/').to_string(), Some(id.to_string()));
        }
    }
    (path.to_string(), None)
}

async fn devvault_server(tls: bool) -> (Server, Api, Option<String>) {
    let listen = "127.0.0.1:0".parse().unwrap();
    if tls {
        let tls = DevTls::generate().unwrap();
        let vault = DevVault::start_tls(listen, "root", &tls).await.expect("devvault starts");
        let api = Api::with_ca(&vault.url(), Some("root"), &tls.ca_pem);
        (Server::DevVault(vault), api, Some(tls.ca_pem.clone()))
    } else {
        let vault = DevVault::start(listen, "root").await.expect("devvault starts");
        let api = Api::new(&vault.url(), Some("root"));
        (Server::DevVault(vault), api, None)
    }
}

async fn openbao_server(tls: bool, issuer: &Arc<ServiceAccountIssuer>) -> (Server, Api, Option<String>) {
    let bao = match tokio::task::spawn_blocking(move || OpenBao::start_with(tls)).await.unwrap() {
        Ok(b) => b,
        Err(e) => panic!("OpenBao could not start: {e}"),
    };
    let reviewer = TokenReviewer::start(issuer.clone()).await.expect("TokenReview stand-in starts");
    if tls {
        let ca = std::fs::read_to_string(bao.ca_path()).expect("bao -dev-tls wrote its CA");
        let api = Api::with_ca(&bao.url(), Some(&bao.root_token), &ca);
        return (Server::OpenBao { bao, proxy: None, reviewer }, api, Some(ca));
    }
    let proxy = DevVault::start_proxy("127.0.0.1:0".parse().unwrap(), &bao.root_token, &bao.url())
        .await
        .expect("devvault proxy starts");
    let api = Api::new(&proxy.url(), Some(&bao.root_token));
    (Server::OpenBao { bao, proxy: Some(proxy), reviewer }, api, None)
}

pub fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// The real binary, its output captured to files for later inspection.
pub struct Agent {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Agent {
    pub async fn spawn(args: &[&str], dir: &Path) -> Agent {
        let mut command = vec![env!("CARGO_BIN_EXE_leasehold")];
        command.extend(args);
        Self::spawn_command(&command, dir).await
    }

    /// `command` (the binary, or a wrapper such as `ip netns exec <ns>` that
    /// execs it, so the pid stays the agent's) with its output captured.
    pub async fn spawn_command(command: &[&str], dir: &Path) -> Agent {
        let (program, args) = command.split_first().expect("a command");
        let program = if *program == "leasehold" { env!("CARGO_BIN_EXE_leasehold") } else { program };
        let args: Vec<&str> =
            args.iter().map(|a| if *a == "leasehold" { env!("CARGO_BIN_EXE_leasehold") } else { a }).collect();
        let log = dir.join(format!("agent-{}.log", rand_suffix()));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("leasehold starts");
        Agent { child, log }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().expect("running") as i32);
        nix::sys::signal::kill(pid, sig).expect("signal delivered");
    }

    pub async fn wait(&mut self, limit: Duration) -> i32 {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.unwrap().code().unwrap_or(-1),
            Err(_) => panic!("agent did not exit within {limit:?}; output:\n{}", self.output()),
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The telemetry address the agent logged.
    pub fn telemetry_addr(&self) -> Option<String> {
        self.events("telemetry_listening").first().and_then(|e| e["addr"].as_str().map(str::to_string))
    }

    /// Log lines (JSON) with this `event`.
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.output()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }
}

fn rand_suffix() -> String {
    format!("{:x}", SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos())
}

/// Polls `cond` every 50 ms up to `secs`: the condition is what is asserted;
/// the deadline only bounds the wait.
pub async fn eventually<F: AsyncFnMut() -> bool>(secs: u64, mut cond: F) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The soft open-files limit of `pid` (from /proc), and a setter for it
/// (`prlimit`, util-linux; the hard limit is left alone).
pub fn nofile(pid: u32) -> (usize, impl Fn(usize)) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("the process's open-files limit");
    let set = move |n: usize| {
        let arg = format!("--nofile={n}:");
        let out = std::process::Command::new("prlimit").args(["--pid", &pid.to_string(), &arg]).output();
        assert!(out.as_ref().is_ok_and(|o| o.status.success()), "prlimit (util-linux, run as root): {out:?}");
    };
    (soft, set)
}

/// The number of descriptors `pid` holds once it stops changing (closed
/// clients are drained for up to a second before their socket goes).
pub async fn settled_fds(pid: u32) -> usize {
    let count = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let mut last = count();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = count();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// A TCP forwarder on `listen_ip` to `to` (how a network namespace reaches
/// a server on the host's loopback; a stand-in upstream that counts), and
/// how many connections it was asked for.
pub async fn forward(listen_ip: &str, to: String) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((listen_ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, count)
}
