//! Harness for the agent's integration tests: devvault in-process, the
//! shared PostgreSQL cluster, a minted ServiceAccount token, and the real
//! `leasehold` binary started with real signals.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use devvault::testing::{Api, PgCluster, Setup, setup_postgres, shared_cluster};
use devvault::{DevTls, DevVault, ServiceAccountIssuer, SigningAlg};
use serde_json::Value;

pub const POLICY: &str = r#"
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "kv/data/*" { capabilities = ["read"] }
path "pki/issue/web" { capabilities = ["update"] }
"#;

pub struct Env {
    pub vault: DevVault,
    pub api: Api,
    pub pg: &'static PgCluster,
    pub issuer: ServiceAccountIssuer,
    pub dir: tempfile::TempDir,
    /// Set when devvault serves HTTPS; configs then carry `vault.ca_cert`.
    pub tls: Option<DevTls>,
}

pub struct Ttls<'a> {
    pub db_ttl: &'a str,
    pub db_max: &'a str,
    pub token_ttl: &'a str,
    pub token_max: &'a str,
}

impl Env {
    pub async fn new(ttls: Ttls<'_>) -> Env {
        Self::start(ttls, None).await
    }

    /// devvault over HTTPS with a throwaway CA.
    pub async fn new_tls(ttls: Ttls<'_>) -> Env {
        Self::start(ttls, Some(DevTls::generate().unwrap())).await
    }

    async fn start(ttls: Ttls<'_>, tls: Option<DevTls>) -> Env {
        let pg = shared_cluster();
        let listen = "127.0.0.1:0".parse().unwrap();
        let (vault, api) = match &tls {
            Some(tls) => {
                let vault = DevVault::start_tls(listen, "root", tls).await.expect("devvault starts");
                let api = Api::with_ca(&vault.url(), Some("root"), &tls.ca_pem);
                (vault, api)
            }
            None => {
                let vault = DevVault::start(listen, "root").await.expect("devvault starts");
                let api = Api::new(&vault.url(), Some("root"));
                (vault, api)
            }
        };
        let issuer = ServiceAccountIssuer::generate(SigningAlg::Es256).unwrap();
        setup_postgres(&api, pg, "app", ttls.db_ttl, ttls.db_max).await;
        Setup {
            api: &api,
            k8s_role: "app",
            policy: POLICY.into(),
            token_ttl: ttls.token_ttl,
            token_max_ttl: ttls.token_max,
        }
        .kubernetes(&issuer)
        .await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
        let env = Env { vault, api, pg, issuer, dir, tls };
        std::fs::write(env.token_path(), env.issuer.mint("default", "app", 3600).unwrap()).unwrap();
        if let Some(tls) = &env.tls {
            std::fs::write(env.ca_path(), &tls.ca_pem).unwrap();
        }
        env
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
            url = self.vault.url(),
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

    /// devvault's request log as (time, method, path, status).
    pub async fn requests(&self) -> Vec<Req> {
        self.api
            .requests()
            .await
            .iter()
            .map(|e| Req {
                time: humantime::parse_rfc3339(e["time"].as_str().unwrap()).unwrap(),
                method: e["method"].as_str().unwrap().to_string(),
                path: e["path"].as_str().unwrap().to_string(),
                status: e["status"].as_u64().unwrap() as u16,
                namespace: e["namespace"].as_str().unwrap().to_string(),
            })
            .collect()
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
    pub path: String,
    pub status: u16,
    /// The `X-Vault-Namespace` header sent ("" when none).
    pub namespace: String,
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
        let log = dir.join(format!("agent-{}.log", rand_suffix()));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
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
