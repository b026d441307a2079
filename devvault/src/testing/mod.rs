//! Test harness (feature `testing`): a throwaway PostgreSQL cluster and a
//! small client for configuring devvault through its API.
//!
//! A cluster that cannot start is an error with the reason; callers fail the
//! test, never skip it.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod openbao;
mod raft;
mod tokenreview;

pub use openbao::{AuditEntry, OpenBao, bao_bin};
pub use raft::{Health, RaftCluster};
pub use tokenreview::TokenReviewer;

/// A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1.
/// It lives as long as the process holding it: a watchdog shell stops the
/// server and removes the directory when our end of its stdin closes.
pub struct PgCluster {
    pub port: u16,
    pub dir: PathBuf,
    /// The CA of the server's TLS certificate (for `localhost` and
    /// 127.0.0.1): PostgreSQL serves TLS as production databases do, and
    /// plain connections too.
    pub ca_pem: String,
    password: String,
    _watchdog: Mutex<(Child, ChildStdin)>,
}

pub const ADMIN_USER: &str = "postgres";

/// PostgreSQL's programs (`initdb`, `pgbench`, …): `PG_BINDIR`, or the
/// newest under /usr/lib/postgresql.
pub fn pg_bindir() -> Result<PathBuf, String> {
    bindir()
}

fn bindir() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().map(|(_, p)| p).ok_or_else(|| {
        "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb, PG_BINDIR unset); \
         run scripts/test, which installs postgresql"
            .to_string()
    })
}

/// initdb and postgres refuse to run as root: run them as `postgres` then.
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn postgres_ids() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("reading /etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"postgres")).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
        })
        .ok_or_else(|| "running as root but there is no `postgres` user to run PostgreSQL as".to_string())
}

fn command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub(crate) fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

impl PgCluster {
    pub fn start() -> Result<PgCluster, String> {
        let bin = bindir()?;
        let root = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("leasehold-pg-")
            .tempdir()
            .map_err(|e| format!("creating a temp dir: {e}"))?
            .keep();
        let password = format!("pg-{}", crate::ids::base62(16));
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).map_err(|e| format!("writing pwfile: {e}"))?;
        let tls = crate::tls::DevTls::generate().map_err(|e| e.to_string())?;
        let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&cert, &tls.cert_pem).map_err(|e| format!("writing the server certificate: {e}"))?;
        std::fs::write(&key, tls.key_pem()).map_err(|e| format!("writing the server key: {e}"))?;
        // PostgreSQL refuses a key others can read.
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| format!("chmod the server key: {e}"))?;
        if root {
            let (uid, gid) = postgres_ids()?;
            for p in [&dir, &pwfile, &cert, &key] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", p.display()))?;
            }
        }
        let data = dir.join("data");
        let out = command(root, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", ADMIN_USER, "-A", "scram-sha-256", "--auth-local=trust", "-E", "UTF8", "-N"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = free_port()?;
        let log = dir.join("postgres.log");
        let script = format!(
            "'{postgres}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
             -c ssl=on -c ssl_cert_file='{cert}' -c ssl_key_file='{key}' >'{log}' 2>&1 & pid=$!; \
             read _ignored; kill -INT $pid; wait $pid; rm -rf '{dir}'",
            postgres = bin.join("postgres").display(),
            data = data.display(),
            dir = dir.display(),
            log = log.display(),
            cert = cert.display(),
            key = key.display(),
        );
        let mut child = command(root, Path::new("sh"))
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting postgres: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin for the postgres watchdog")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        // An open port is not enough: PostgreSQL accepts TCP connections while
        // it still answers "the database system is starting up".
        let ready = || {
            Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-t", "1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        };
        while !ready() {
            if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("PostgreSQL did not start on port {port}: {log_text}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(PgCluster { port, dir, ca_pem: tls.ca_pem, password, _watchdog: Mutex::new((child, stdin)) })
    }

    pub fn admin_password(&self) -> &str {
        &self.password
    }

    /// A connection URL for devvault's `database/config`, templated the way
    /// Vault expects (`{{username}}`/`{{password}}`).
    pub fn templated_url(&self, database: &str) -> String {
        format!("postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/{database}?sslmode=disable", self.port)
    }

    pub fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!("postgresql://{user}:{password}@127.0.0.1:{}/{database}?sslmode=disable", self.port)
    }

    pub async fn connect(&self, user: &str, password: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&self.url(user, password, "postgres"), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    pub async fn admin(&self) -> tokio_postgres::Client {
        match self.connect(ADMIN_USER, &self.password).await {
            Ok(c) => c,
            Err(e) => {
                let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
                panic!("cannot connect to the test PostgreSQL as {ADMIN_USER}: {e} {detail}")
            }
        }
    }

    pub async fn role_exists(&self, name: &str) -> bool {
        let rows = self.admin().await.query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name]).await;
        !rows.expect("querying pg_roles").is_empty()
    }

    /// `rolvaliduntil` as Unix seconds.
    pub async fn valid_until(&self, name: &str) -> Option<i64> {
        let row = self
            .admin()
            .await
            .query_opt("SELECT extract(epoch FROM rolvaliduntil)::bigint FROM pg_roles WHERE rolname = $1", &[&name])
            .await
            .expect("querying pg_roles");
        row.and_then(|r| r.get::<_, Option<i64>>(0))
    }

    /// Roles whose name starts with `prefix`.
    pub async fn roles_like(&self, prefix: &str) -> Vec<String> {
        let pattern = format!("{prefix}%");
        let rows = self
            .admin()
            .await
            .query("SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1", &[&pattern])
            .await
            .expect("querying pg_roles");
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Creates a superuser role for one devvault connection, so tests that
    /// rotate root do not touch the harness's own password.
    pub async fn create_admin_role(&self, name: &str, password: &str) {
        let sql = format!("CREATE ROLE \"{name}\" WITH LOGIN SUPERUSER PASSWORD '{password}'");
        self.admin().await.batch_execute(&sql).await.expect("creating an admin role");
    }
}

/// One cluster per test binary, started on first use.
pub fn shared_cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<Result<PgCluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(PgCluster::start) {
        Ok(c) => c,
        Err(e) => panic!("the test PostgreSQL could not start: {e}"),
    }
}

/// A minimal Vault API client for tests: method, path, JSON body in;
/// status and JSON body out.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: Option<String>,
    /// Sent as `X-Vault-Namespace` when set.
    pub namespace: Option<String>,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, token: Option<&str>) -> Api {
        Api {
            base: base.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
            namespace: None,
            http: reqwest::Client::new(),
        }
    }

    /// A client for an HTTPS devvault that trusts only `ca_pem`.
    pub fn with_ca(base: &str, token: Option<&str>, ca_pem: &str) -> Api {
        let certs = reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("a PEM CA");
        let http = reqwest::Client::builder().tls_certs_only(certs).build().expect("an HTTPS client");
        Api { http, ..Api::new(base, token) }
    }

    /// The same client, in namespace `ns` (OpenBao and Vault Enterprise).
    pub fn in_namespace(&self, ns: &str) -> Api {
        Api { namespace: Some(ns.to_string()), ..self.clone() }
    }

    /// The same client sending no token.
    pub fn anonymous(&self) -> Api {
        Api { token: None, ..self.clone() }
    }

    pub fn with_token(&self, token: &str) -> Api {
        Api { token: Some(token.to_string()), ..self.clone() }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.raw(method, path, body.map(|b| b.to_string())).await
    }

    pub async fn raw(&self, method: &str, path: &str, body: Option<String>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
        let mut req = self.http.request(method, format!("{}/v1/{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("request to {path} failed: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        (status, value)
    }

    /// Asserts success (200/204) and returns the body.
    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.call(method, path, body).await;
        assert!(status == 200 || status == 204, "{method} {path}: {status} {value}");
        value
    }

    /// The devvault request log.
    pub async fn requests(&self) -> Vec<Value> {
        let v = self.ok("GET", "sys/devvault/requests", None).await;
        v["data"]["requests"].as_array().cloned().unwrap_or_default()
    }
}

/// The setup steps of the seed article, done through the API: Kubernetes
/// auth trusting `issuer`'s key, a policy, a role, and (optionally) a
/// database connection with a role.
pub struct Setup<'a> {
    pub api: &'a Api,
    pub k8s_role: &'a str,
    pub policy: String,
    pub token_ttl: &'a str,
    pub token_max_ttl: &'a str,
}

impl Setup<'_> {
    /// Kubernetes auth verifying JWTs locally with `issuer`'s key
    /// (`pem_keys`), as devvault does.
    pub async fn kubernetes(&self, issuer: &crate::ServiceAccountIssuer) {
        self.kubernetes_with(json!({
            "kubernetes_host": "https://kubernetes.default.svc",
            "kubernetes_ca_cert": issuer.certificate_pem(),
            "disable_local_ca_jwt": true,
            "pem_keys": [issuer.public_pem()],
        }))
        .await;
    }

    /// Kubernetes auth through the TokenReview API at `host` (the harness's
    /// [`TokenReviewer`]), as a real server outside the cluster is set up:
    /// no local CA or reviewer JWT, a CA certificate given.
    pub async fn kubernetes_tokenreview(&self, host: &str, ca_pem: &str) {
        self.kubernetes_with(json!({
            "kubernetes_host": host,
            "kubernetes_ca_cert": ca_pem,
            "disable_local_ca_jwt": true,
        }))
        .await;
    }

    async fn kubernetes_with(&self, config: Value) {
        let api = self.api;
        api.ok("POST", "sys/auth/kubernetes", Some(json!({"type": "kubernetes"}))).await;
        api.ok("POST", "auth/kubernetes/config", Some(config)).await;
        api.ok("PUT", "sys/policies/acl/app", Some(json!({"policy": self.policy}))).await;
        api.ok(
            "POST",
            &format!("auth/kubernetes/role/{}", self.k8s_role),
            Some(json!({
                "bound_service_account_names": ["app"],
                "bound_service_account_namespaces": ["default"],
                "token_policies": ["app"],
                "token_ttl": self.token_ttl,
                "token_max_ttl": self.token_max_ttl,
                "audience": "https://kubernetes.default.svc.cluster.local",
            })),
        )
        .await;
    }

    /// JWT auth at `jwt/` verifying ServiceAccount tokens with `issuer`'s
    /// key (`jwt_validation_pubkeys`): no TokenReview, as in clusters that
    /// publish their issuer. OpenBao only: devvault has no JWT auth method.
    pub async fn jwt(&self, issuer: &crate::ServiceAccountIssuer) {
        let api = self.api;
        api.ok("POST", "sys/auth/jwt", Some(json!({"type": "jwt"}))).await;
        let config =
            json!({"jwt_validation_pubkeys": [issuer.public_pem()], "bound_issuer": crate::jwt::DEFAULT_ISSUER});
        api.ok("POST", "auth/jwt/config", Some(config)).await;
        api.ok("PUT", "sys/policies/acl/app", Some(json!({"policy": self.policy}))).await;
        api.ok(
            "POST",
            &format!("auth/jwt/role/{}", self.k8s_role),
            Some(json!({
                "role_type": "jwt",
                "user_claim": "sub",
                "bound_subject": "system:serviceaccount:default:app",
                "bound_audiences": ["https://kubernetes.default.svc.cluster.local"],
                "token_policies": ["app"],
                "token_ttl": self.token_ttl,
                "token_max_ttl": self.token_max_ttl,
            })),
        )
        .await;
    }
}

/// Enables `database/` and configures connection `db` on `cluster` through a
/// fresh superuser, with role `role` of the given TTLs.
///
/// The role's statements touch only rows of their own role: a `GRANT … ON
/// DATABASE` rewrites the database's shared ACL row, and tests running in
/// parallel then fail with "tuple concurrently updated".
pub async fn setup_postgres(api: &Api, cluster: &PgCluster, role: &str, default_ttl: &str, max_ttl: &str) {
    let (status, _) = api.call("POST", "sys/mounts/database", Some(json!({"type": "database"}))).await;
    assert!(status == 204 || status == 400, "mounting database: {status}");
    let admin = format!("vault_admin_{}", crate::ids::base62(8).to_lowercase());
    let password = crate::ids::password();
    cluster.create_admin_role(&admin, &password).await;
    api.ok(
        "POST",
        "database/config/db",
        Some(json!({
            "plugin_name": "postgresql-database-plugin",
            "allowed_roles": "*",
            "connection_url": cluster.templated_url("postgres"),
            "username": admin,
            "password": password,
        })),
    )
    .await;
    api.ok(
        "POST",
        &format!("database/roles/{role}"),
        Some(json!({
            "db_name": "db",
            "creation_statements": [
                "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
                "GRANT pg_read_all_data TO \"{{name}}\";"
            ],
            "revocation_statements": [
                "REVOKE pg_read_all_data FROM \"{{name}}\";",
                "DROP ROLE IF EXISTS \"{{name}}\";"
            ],
            "default_ttl": default_ttl,
            "max_ttl": max_ttl,
        })),
    )
    .await;
}

/// Enables `database/` with a memory-plugin connection `mem` that allows
/// `allowed_roles`, and role `app` with the given TTLs.
pub async fn setup_memory(api: &Api, allowed_roles: &str, default_ttl: &str, max_ttl: &str) {
    api.ok("POST", "sys/mounts/database", Some(json!({"type": "database"}))).await;
    let config = json!({"plugin_name": "memory-database-plugin", "allowed_roles": allowed_roles});
    api.ok("POST", "database/config/mem", Some(config)).await;
    let role = json!({
        "db_name": "mem",
        "creation_statements": ["CREATE ROLE \"{{name}}\""],
        "default_ttl": default_ttl,
        "max_ttl": max_ttl,
    });
    api.ok("POST", "database/roles/app", Some(role)).await;
}

/// Enables `pki/` with an EC root CA (`ca_ttl`) and role `role` for
/// `*.example.com` (EC keys, `max_ttl`), leased when `generate_lease`.
pub async fn setup_pki(api: &Api, role: &str, ca_ttl: &str, max_ttl: &str, generate_lease: bool) {
    api.ok("POST", "sys/mounts/pki", Some(json!({"type": "pki"}))).await;
    let root = json!({"common_name": "devvault test CA", "key_type": "ec", "ttl": ca_ttl});
    api.ok("POST", "pki/root/generate/internal", Some(root)).await;
    let role_body = json!({
        "allowed_domains": "example.com",
        "allow_subdomains": true,
        "key_type": "ec",
        "max_ttl": max_ttl,
        "generate_lease": generate_lease,
    });
    api.ok("POST", &format!("pki/roles/{role}"), Some(role_body)).await;
}

/// Writes a line to stderr; tests print timelines with it.
pub fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}
