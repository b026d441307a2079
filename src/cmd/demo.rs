//! `leasehold demo`: a zero-dependency tour. Starts devvault in-process,
//! configures it through its API the way the seed article configures Vault
//! (database engine, connection, role; Kubernetes auth, role, policy), mints
//! a ServiceAccount JWT, and runs the agent against it with short TTLs
//! (10 s, max 30 s) so renewals, a re-issue and the final revocation happen
//! within a minute. Ctrl-C stops it the way Kubernetes stops a pod.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use devvault::{DevVault, ServiceAccountIssuer, SigningAlg};
use serde_json::json;

use agent::run::Loaded;
use vault::VaultClient;
use vault::secret::SecretString;

const POLICY: &str = r#"
path "database/creds/app-role" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"#;

pub fn main(database_url: Option<String>, dir: PathBuf) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("leasehold demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(database_url, dir)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("leasehold demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(database_url: Option<String>, dir: PathBuf) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir.join("secrets")).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let vault = DevVault::start(([127, 0, 0, 1], 0).into(), "demo-root").await.context("starting devvault")?;
    let issuer = ServiceAccountIssuer::generate(SigningAlg::Es256)?;
    configure(&vault, &issuer, database_url.as_deref()).await?;
    let token_path = dir.join("serviceaccount-token");
    std::fs::write(&token_path, issuer.mint("default", "app", 24 * 3600)?)?;
    let config_path = dir.join("leasehold.yaml");
    // A port known before the agent starts, so it can be printed: the
    // demo's telemetry is where `leasehold status` finds it.
    let telemetry = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let yaml = config_yaml(&vault.url(), &token_path, &dir.join("secrets"))
        .replace("  listen: 127.0.0.1:0\n", &format!("  listen: {telemetry}\n"));
    std::fs::write(&config_path, yaml)?;
    let loaded = Loaded::read(&config_path, &no_env)?;
    println!("devvault (a Vault-compatible dev server) is listening on {}", vault.url());
    println!(
        "database role app-role: ttl 10s, max_ttl 30s ({})",
        if database_url.is_some() { "PostgreSQL" } else { "in-memory database plugin" }
    );
    println!("config:      {}", config_path.display());
    println!("credentials: {}/secrets/ (db.json, db.env, db.url)", dir.display());
    println!("telemetry:   http://{telemetry} (/metrics, /readyz, /v1/status; `leasehold status http://{telemetry}`)");
    println!("Watch the lease timeline below; press Ctrl-C to stop and revoke.\n");
    agent::telemetry::init_demo_logging();
    let signals = agent::signals::install()?;
    let outcome =
        agent::run::run(loaded, &config_path, signals, agent::run::Options { once: false, env: &no_env }).await?;
    if database_url.is_none() {
        let left = vault.memory_users();
        println!("\ndatabase users left in devvault after shutdown: {}", left.len());
    }
    Ok(crate::exit_code(outcome))
}

/// The demo's config is complete; the user's `VAULT_*` must not redirect it.
fn no_env(_: &str) -> Option<String> {
    None
}

async fn configure(vault: &DevVault, issuer: &ServiceAccountIssuer, database_url: Option<&str>) -> anyhow::Result<()> {
    let client = VaultClient::new(vault::ClientConfig {
        address: vault.url(),
        ca_cert_pem: None,
        namespace: String::new(),
        request_timeout: std::time::Duration::from_secs(10),
        tls_skip_verify: false,
        max_retries: 0,
        redirect_hosts: Vec::new(),
    })?;
    let root = SecretString::from(vault.root_token().to_string());
    let connection = match database_url {
        Some(url) => {
            json!({"plugin_name": "postgresql-database-plugin", "allowed_roles": "app-role", "connection_url": url})
        }
        None => json!({"plugin_name": "memory-database-plugin", "allowed_roles": "app-role"}),
    };
    let steps = [
        ("sys/mounts/database", json!({"type": "database"})),
        ("database/config/demo-db", connection),
        (
            "database/roles/app-role",
            json!({
                "db_name": "demo-db",
                "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
                "revocation_statements": ["DROP ROLE IF EXISTS \"{{name}}\";"],
                "default_ttl": "10s",
                "max_ttl": "30s",
            }),
        ),
        ("sys/policies/acl/app", json!({"policy": POLICY})),
        ("sys/auth/kubernetes", json!({"type": "kubernetes"})),
        (
            "auth/kubernetes/config",
            json!({
                "kubernetes_host": "https://kubernetes.default.svc",
                "kubernetes_ca_cert": issuer.certificate_pem(),
                "disable_local_ca_jwt": true,
                "pem_keys": [issuer.public_pem()],
            }),
        ),
        (
            "auth/kubernetes/role/app-role",
            json!({
                "bound_service_account_names": ["app"],
                "bound_service_account_namespaces": ["default"],
                "token_policies": ["app"],
                "token_ttl": "1h",
                "audience": "https://kubernetes.default.svc.cluster.local",
            }),
        ),
    ];
    for (path, body) in steps {
        client.write(&root, path, &body).await.with_context(|| format!("configuring devvault: {path}"))?;
    }
    Ok(())
}

fn config_yaml(vault_url: &str, token_path: &Path, secrets_dir: &Path) -> String {
    let secrets = secrets_dir.display();
    format!(
        r#"# Written by `leasehold demo`.
vault:
  address: {vault_url}
auth:
  kubernetes:
    role: app-role
    token_path: {token}
secrets:
  - name: db
    path: database/creds/app-role
    revoke_replaced_after: 5s
    files:
      - path: {secrets}/db.json
        format: json
        mode: "0600"
      - path: {secrets}/db.env
        format: env
        mode: "0600"
      - path: {secrets}/db.url
        template: "postgresql://{{{{ username|urlencode }}}}:{{{{ password|urlencode }}}}@db:5432/app"
        mode: "0600"
shutdown:
  timeout: 5s
telemetry:
  listen: 127.0.0.1:0
log:
  format: text
"#,
        token = token_path.display(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_config_is_valid() {
        let yaml =
            super::config_yaml("http://127.0.0.1:8200", std::path::Path::new("/tmp/t"), std::path::Path::new("/tmp/s"));
        let c = config::Config::parse(&yaml, std::path::Path::new("demo.yaml"), &|_| None).unwrap();
        assert_eq!(c.secrets[0].files.len(), 3);
    }
}
