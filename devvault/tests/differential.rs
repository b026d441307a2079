//! The differential suite: one scripted sequence of requests sent to devvault
//! and to the real OpenBao, each with its own PostgreSQL, compared response
//! by response (status, key sets and value types under `data`/`auth`,
//! warnings, error texts, TTLs and renewability). Every difference must be
//! listed, with why it cannot match, in devvault/README.md's table
//! "Allowed differences"; the table may list nothing that no longer differs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use devvault::testing::{Api, OpenBao, PgCluster, TokenReviewer};
use devvault::{DevVault, ServiceAccountIssuer, SigningAlg};
use serde_json::{Value, json};

/// Which token a step sends.
#[derive(Clone)]
enum Tok {
    Root,
    /// No token at all.
    Anon,
    /// A captured variable.
    Var(&'static str),
    Literal(&'static str),
}

#[derive(Clone)]
enum Kind {
    Http {
        method: &'static str,
        path: String,
        body: Option<String>,
        tok: Tok,
        ns: Option<&'static str>,
    },
    /// Whether the PostgreSQL role named by a variable exists; with
    /// `gone_within`, polled until it is gone (the expiry and revocation jobs).
    Role {
        var: &'static str,
        gone_within: Option<u64>,
    },
}

#[derive(Clone)]
struct Step {
    name: &'static str,
    kind: Kind,
    capture: Vec<(&'static str, &'static str)>,
    exact: Vec<&'static str>,
    /// Numbers that must agree within 2 s; and warnings compared with
    /// their quoted max TTL blanked.
    near: Vec<&'static str>,
}

fn http(name: &'static str, method: &'static str, path: &str) -> Step {
    Step {
        name,
        kind: Kind::Http { method, path: path.to_string(), body: None, tok: Tok::Root, ns: None },
        capture: vec![],
        exact: vec![],
        near: vec![],
    }
}

fn role(name: &'static str, var: &'static str, gone_within: Option<u64>) -> Step {
    Step { name, kind: Kind::Role { var, gone_within }, capture: vec![], exact: vec![], near: vec![] }
}

impl Step {
    fn body(self, b: Value) -> Step {
        self.raw(&b.to_string())
    }
    fn raw(mut self, text: &str) -> Step {
        if let Kind::Http { body, .. } = &mut self.kind {
            *body = Some(text.to_string());
        }
        self
    }
    fn tok(mut self, t: Tok) -> Step {
        if let Kind::Http { tok, .. } = &mut self.kind {
            *tok = t;
        }
        self
    }
    fn ns(mut self, n: &'static str) -> Step {
        if let Kind::Http { ns, .. } = &mut self.kind {
            *ns = Some(n);
        }
        self
    }
    fn cap(mut self, var: &'static str, pointer: &'static str) -> Step {
        self.capture.push((var, pointer));
        self
    }
    fn near(mut self, pointers: &[&'static str]) -> Step {
        self.near.extend_from_slice(pointers);
        self
    }
    /// JSON pointers whose values must be equal, not only of the same type.
    fn exact(mut self, pointers: &[&'static str]) -> Step {
        self.exact.extend_from_slice(pointers);
        self
    }
}

const APP_POLICY: &str = "path \"database/creds/app\" { capabilities = [\"read\"] }\n\
path \"database/creds/short\" { capabilities = [\"read\"] }\n\
path \"sys/leases/renew\" { capabilities = [\"update\"] }\n\
path \"sys/leases/revoke\" { capabilities = [\"update\"] }\n\
path \"kv/data/*\" { capabilities = [\"read\"] }\n\
path \"pki/issue/web\" { capabilities = [\"update\"] }\n";

const CREATE: &str = "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';";
const REVOKE: &str = "DROP ROLE IF EXISTS \"{{name}}\";";

/// The script. Placeholders `{var}` in paths and bodies are the side's
/// captured or preset variables.
fn script() -> Vec<Step> {
    use Tok::*;
    let role_body = |ttl: &str, max: &str| {
        let mut b = json!({"db_name": "db", "creation_statements": [CREATE], "revocation_statements": [REVOKE]});
        if !ttl.is_empty() {
            b["default_ttl"] = json!(ttl);
            b["max_ttl"] = json!(max);
        }
        b
    };
    let k8s_role = |ttl: &str, max: &str| {
        json!({
            "bound_service_account_names": ["app"],
            "bound_service_account_namespaces": ["default"],
            "token_policies": ["app"],
            "token_ttl": ttl,
            "token_max_ttl": max,
            "audience": "https://kubernetes.default.svc.cluster.local",
        })
    };
    let login = |role: &str, jwt: &str| format!(r#"{{"role": "{role}", "jwt": "{{{jwt}}}"}}"#);
    vec![
        // System.
        http("health", "GET", "sys/health"),
        http("health-head", "HEAD", "sys/health").tok(Anon),
        http("mounts-list", "GET", "sys/mounts"),
        http("auth-list", "GET", "sys/auth"),
        // Database engine and PostgreSQL.
        http("db-mount", "POST", "sys/mounts/database").body(json!({"type": "database"})),
        http("db-mount-again", "POST", "sys/mounts/database").body(json!({"type": "database"})),
        http("db-config", "POST", "database/config/db").raw(
            r#"{"plugin_name": "postgresql-database-plugin", "allowed_roles": "*", "connection_url": "{pg_url}", "username": "{pg_user}", "password": "{pg_password}"}"#,
        ),
        http("db-config-read", "GET", "database/config/db"),
        http("db-config-bad-plugin", "POST", "database/config/bad")
            .body(json!({"plugin_name": "nope-plugin", "connection_url": "x"})),
        http("db-role-app", "POST", "database/roles/app").body(role_body("1h", "2h")),
        http("db-role-short", "POST", "database/roles/short").body(role_body("2s", "2s")),
        http("db-role-nottl", "POST", "database/roles/nottl").body(role_body("", "")),
        http("db-role-read", "GET", "database/roles/app"),
        http("db-role-list", "LIST", "database/roles"),
        http("db-role-bad-ttl", "POST", "database/roles/bad").body(json!({"db_name": "db", "default_ttl": "soon"})),
        http("db-role-missing", "GET", "database/roles/missing"),
        http("db-creds-unknown-role", "GET", "database/creds/missing"),
        // Policies.
        http("policy-write", "PUT", "sys/policies/acl/app").body(json!({"policy": APP_POLICY})),
        http("policy-read", "GET", "sys/policies/acl/app"),
        http("policy-empty", "PUT", "sys/policies/acl/empty").body(json!({"policy": ""})),
        http("policy-bad-hcl", "PUT", "sys/policies/acl/bad").body(json!({"policy": "path \"x\" {"})),
        http("policy-legacy-read", "GET", "sys/policy/app"),
        // Kubernetes auth.
        http("k8s-enable", "POST", "sys/auth/kubernetes").body(json!({"type": "kubernetes"})),
        http("k8s-config-no-ca", "POST", "auth/kubernetes/config")
            .raw(r#"{"kubernetes_host": "{k8s_host}", "disable_local_ca_jwt": true}"#),
        http("k8s-config-no-local-ca", "POST", "auth/kubernetes/config").raw(r#"{"kubernetes_host": "{k8s_host}"}"#),
        http("k8s-config-no-host", "POST", "auth/kubernetes/config").body(json!({"kubernetes_ca_cert": ""})),
        http("k8s-config", "POST", "auth/kubernetes/config").raw(
            r#"{"kubernetes_host": "{k8s_host}", "kubernetes_ca_cert": "{k8s_ca}", "disable_local_ca_jwt": true, "pem_keys": ["{pem_key}"]}"#,
        ),
        http("k8s-config-read", "GET", "auth/kubernetes/config"),
        http("k8s-role", "POST", "auth/kubernetes/role/app").body(k8s_role("1h", "2h")),
        http("k8s-role-short", "POST", "auth/kubernetes/role/short").body(k8s_role("3s", "3s")),
        http("k8s-role-read", "GET", "auth/kubernetes/role/app"),
        http("k8s-login", "POST", "auth/kubernetes/login")
            .raw(&login("app", "jwt"))
            .tok(Anon)
            .cap("token", "/auth/client_token")
            .exact(&["/auth/policies", "/auth/token_policies", "/auth/lease_duration", "/auth/renewable"]),
        http("k8s-login-bad-role", "POST", "auth/kubernetes/login").raw(&login("missing", "jwt")).tok(Anon),
        http("k8s-login-expired", "POST", "auth/kubernetes/login").raw(&login("app", "expired_jwt")).tok(Anon),
        http("k8s-login-foreign-key", "POST", "auth/kubernetes/login").raw(&login("app", "foreign_jwt")).tok(Anon),
        http("k8s-login-no-jwt", "POST", "auth/kubernetes/login").body(json!({"role": "app"})).tok(Anon),
        http("k8s-login-wrong-sa", "POST", "auth/kubernetes/login").raw(&login("app", "other_sa_jwt")).tok(Anon),
        // Tokens.
        http("lookup-self", "GET", "auth/token/lookup-self")
            .tok(Var("token"))
            .exact(&["/data/policies", "/data/renewable", "/data/explicit_max_ttl", "/data/path", "/data/orphan"]),
        http("renew-self", "PUT", "auth/token/renew-self")
            .body(json!({"increment": "1h"}))
            .tok(Var("token"))
            .exact(&["/auth/lease_duration", "/auth/renewable"]),
        http("renew-self-no-increment", "PUT", "auth/token/renew-self")
            .tok(Var("token"))
            .exact(&["/auth/lease_duration", "/auth/renewable"]),
        http("token-create", "POST", "auth/token/create")
            .body(json!({"policies": ["app"], "ttl": "1h", "explicit_max_ttl": "2h"}))
            .cap("created", "/auth/client_token")
            .exact(&["/auth/policies", "/auth/lease_duration", "/auth/renewable"]),
        http("renew-self-explicit-max", "PUT", "auth/token/renew-self")
            .tok(Var("created"))
            .exact(&["/auth/lease_duration", "/auth/renewable"]),
        http("token-create-orphan", "POST", "auth/token/create-orphan")
            .body(json!({"policies": ["app"], "ttl": "10m"}))
            .exact(&["/auth/orphan", "/auth/lease_duration"]),
        http("no-token", "GET", "database/creds/app").tok(Anon),
        http("bad-token", "GET", "database/creds/app").tok(Literal("not-a-token")),
        http("acl-denied", "GET", "database/roles/app").tok(Var("token")),
        // Credentials and leases.
        http("creds", "GET", "database/creds/app")
            .tok(Var("token"))
            .cap("lease", "/lease_id")
            .cap("user", "/data/username")
            .exact(&["/lease_duration", "/renewable"]),
        role("creds-role-exists", "user", None),
        http("lease-lookup", "PUT", "sys/leases/lookup").raw(r#"{"lease_id": "{lease}"}"#).exact(&["/data/renewable"]),
        http("lease-lookup-unknown", "PUT", "sys/leases/lookup").body(json!({"lease_id": "database/creds/app/nope"})),
        http("lease-list", "LIST", "sys/leases/lookup/database/creds/app/"),
        http("renew", "PUT", "sys/leases/renew")
            .raw(r#"{"lease_id": "{lease}", "increment": 3600}"#)
            .tok(Var("token"))
            .exact(&["/lease_duration", "/renewable"]),
        http("renew-path-form", "PUT", "sys/leases/renew/{lease}").tok(Root).exact(&["/lease_duration"]),
        // OpenBao's capped TTL (and the max_ttl its warning prints) is 7198–7200
        // depending on sub-second timing: compared within a second.
        http("renew-capped", "PUT", "sys/leases/renew")
            .raw(r#"{"lease_id": "{lease}", "increment": 86400}"#)
            .tok(Var("token"))
            .near(&["/lease_duration"]),
        http("renew-negative", "PUT", "sys/leases/renew").raw(r#"{"lease_id": "{lease}", "increment": -5}"#),
        http("renew-unknown", "PUT", "sys/leases/renew").body(json!({"lease_id": "database/creds/app/nope"})),
        http("renew-no-lease", "PUT", "sys/leases/renew").body(json!({})),
        http("revoke-prefix-empty", "PUT", "sys/leases/revoke-prefix").body(json!({})),
        http("revoke-prefix-body", "PUT", "sys/leases/revoke-prefix").body(json!({"prefix": "database/creds/app"})),
        http("revoke-force-empty", "PUT", "sys/leases/revoke-force").body(json!({})),
        role("creds-role-survives-bad-prefix", "user", None),
        http("revoke", "PUT", "sys/leases/revoke").raw(r#"{"lease_id": "{lease}"}"#).tok(Var("token")),
        role("revoked-role-gone", "user", Some(10)),
        http("revoke-unknown", "PUT", "sys/leases/revoke").body(json!({"lease_id": "database/creds/app/nope"})),
        http("creds-nottl", "GET", "database/creds/nottl").exact(&["/lease_duration"]),
        http("creds-for-prefix", "GET", "database/creds/app").cap("user2", "/data/username"),
        http("revoke-prefix-path", "PUT", "sys/leases/revoke-prefix/database/creds/app"),
        role("prefix-revoked-role-gone", "user2", Some(10)),
        // Expiry, and a token's revocation taking its leases.
        http("creds-short", "GET", "database/creds/short").cap("short_user", "/data/username").exact(&["/lease_duration"]),
        role("expired-role-gone", "short_user", Some(20)),
        http("k8s-login-2", "POST", "auth/kubernetes/login").raw(&login("app", "jwt")).tok(Anon).cap("token2", "/auth/client_token"),
        http("creds-token2", "GET", "database/creds/app").tok(Var("token2")).cap("user3", "/data/username"),
        http("revoke-self", "PUT", "auth/token/revoke-self").tok(Var("token2")),
        role("revoke-self-role-gone", "user3", Some(10)),
        http("after-revoke-self", "GET", "auth/token/lookup-self").tok(Var("token2")),
        http("k8s-login-short", "POST", "auth/kubernetes/login")
            .raw(&login("short", "jwt"))
            .tok(Anon)
            .cap("token3", "/auth/client_token")
            .exact(&["/auth/lease_duration"]),
        http("creds-token3", "GET", "database/creds/app").tok(Var("token3")).cap("user4", "/data/username"),
        role("token-expiry-role-gone", "user4", Some(20)),
        // Bad input.
        http("malformed-json", "POST", "database/roles/x").raw("{not json"),
        http("null-body", "PUT", "auth/token/renew-self").raw("null").tok(Var("token")).exact(&["/auth/renewable"]),
        http("json-array", "PUT", "sys/leases/renew").raw("[1,2]"),
        http("truncated-json", "POST", "database/roles/x").raw(r#"{"db_name": "db""#),
        http("wrong-type", "POST", "database/roles/x").body(json!({"db_name": "db", "creation_statements": {"a": 1}})),
        http("unknown-path", "GET", "nope/such/path"),
        http("unknown-sys-path", "GET", "sys/nope"),
        http("patch-method", "PATCH", "sys/policies/acl/app").body(json!({"policy": APP_POLICY})),
        http("write-trailing-slash", "POST", "database/roles/").body(json!({"db_name": "db"})),
        http("unknown-namespace", "GET", "sys/health").ns("team-a/apps"),
        http("unknown-namespace-login", "POST", "auth/kubernetes/login").raw(&login("app", "jwt")).tok(Anon).ns("nope"),
        // KV version 2.
        http("kv-mount", "POST", "sys/mounts/kv").body(json!({"type": "kv", "options": {"version": "2"}})),
        http("kv-write", "POST", "kv/data/app").body(json!({"data": {"user": "a", "n": 1}})),
        http("kv-read", "GET", "kv/data/app").tok(Var("token")).exact(&["/data/data", "/lease_duration"]),
        http("kv-read-version", "GET", "kv/data/app?version=1").exact(&["/data/metadata/version"]),
        http("kv-read-missing", "GET", "kv/data/missing"),
        http("kv-list", "LIST", "kv/metadata/"),
        http("kv-delete", "DELETE", "kv/data/app"),
        // PKI.
        http("pki-mount", "POST", "sys/mounts/pki").body(json!({"type": "pki"})),
        http("pki-root", "POST", "pki/root/generate/internal")
            .body(json!({"common_name": "diff CA", "key_type": "ec", "ttl": "1h"})),
        http("pki-role", "POST", "pki/roles/web").body(json!({
            "allowed_domains": "example.com", "allow_subdomains": true, "key_type": "ec", "max_ttl": "1h", "generate_lease": true
        })),
        http("pki-issue", "POST", "pki/issue/web")
            .body(json!({"common_name": "app.example.com", "ttl": "10m"}))
            .tok(Var("token"))
            .cap("serial", "/data/serial_number")
            // Not the TTL: it ends at the certificate's whole-second notAfter,
            // so it is 599 or 600 depending on the sub-second of the request.
            .exact(&["/renewable"]),
        http("pki-issue-bad-name", "POST", "pki/issue/web").body(json!({"common_name": "evil.org"})),
        http("pki-cert", "GET", "pki/cert/{serial}").tok(Anon),
    ]
}

/// One server under comparison.
struct Side {
    api: Api,
    pg: PgCluster,
    vars: HashMap<String, String>,
    _server: Box<dyn std::any::Any + Send>,
}

impl Side {
    fn subst(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (k, v) in &self.vars {
            out = out.replace(&format!("{{{k}}}"), v);
        }
        out
    }

    async fn run(&mut self, step: &Step) -> Value {
        match &step.kind {
            Kind::Http { method, path, body, tok, ns } => {
                let mut api = match tok {
                    Tok::Root => self.api.clone(),
                    Tok::Anon => self.api.anonymous(),
                    Tok::Var(v) => self.api.with_token(self.vars.get(*v).map(String::as_str).unwrap_or("missing")),
                    Tok::Literal(t) => self.api.with_token(t),
                };
                if let Some(ns) = ns {
                    api = api.in_namespace(ns);
                }
                let (status, value) = api.raw(method, &self.subst(path), body.as_ref().map(|b| self.subst(b))).await;
                for (var, pointer) in &step.capture {
                    if let Some(v) = value.pointer(pointer).and_then(Value::as_str) {
                        self.vars.insert(var.to_string(), v.to_string());
                    }
                }
                json!({"status": status, "body": value})
            }
            Kind::Role { var, gone_within } => {
                let name = self.vars.get(*var).cloned().unwrap_or_default();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(gone_within.unwrap_or(0));
                loop {
                    let exists = self.pg.role_exists(&name).await;
                    if !exists || gone_within.is_none() || tokio::time::Instant::now() > deadline {
                        return json!({"role_exists": exists});
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Flattens an object into `prefix.key` → type, two levels deep.
fn shape(prefix: &str, v: &Value, depth: usize, out: &mut BTreeMap<String, String>) {
    if let Value::Object(m) = v {
        for (k, v) in m {
            let key = format!("{prefix}.{k}");
            out.insert(key.clone(), type_name(v).to_string());
            if depth > 0 {
                shape(&key, v, depth - 1, out);
            }
        }
    }
}

/// The fields of one response that must agree, by name.
fn fields(step: &Step, r: &Value) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    if let Some(exists) = r.get("role_exists") {
        f.insert("role_exists".into(), exists.to_string());
        return f;
    }
    f.insert("status".into(), r["status"].to_string());
    let body = &r["body"];
    match body {
        Value::Object(m) => {
            let keys: BTreeSet<&str> = m.keys().map(String::as_str).collect();
            f.insert("keys".into(), format!("{keys:?}"));
            for section in ["data", "auth"].into_iter().filter(|k| m.contains_key(*k)) {
                let mut sh = BTreeMap::new();
                shape(section, &body[section], 1, &mut sh);
                f.insert(section.into(), sh.iter().map(|(k, t)| format!("{k}:{t}")).collect::<Vec<_>>().join(" "));
            }
            if let Some(w) = body.get("warnings").filter(|w| !w.is_null()) {
                let text = w.to_string();
                f.insert("warnings".into(), if step.near.is_empty() { text } else { blank_max_ttl(&text) });
            }
            if let Some(e) = body.get("errors") {
                f.insert("errors".into(), e.to_string());
            }
            if let Some(id) = body.get("lease_id").and_then(Value::as_str) {
                let prefix = id.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                f.insert("lease_id".into(), format!("{prefix:?}/…"));
            }
        }
        other => {
            f.insert("body".into(), type_name(other).to_string());
        }
    }
    for p in &step.near {
        let n = body.pointer(p).and_then(Value::as_i64);
        f.insert(format!("{p} (±2 s)"), n.map_or("null".into(), |n| n.to_string()));
    }
    for p in &step.exact {
        f.insert(p.to_string(), body.pointer(p).cloned().unwrap_or(Value::Null).to_string());
    }
    f
}

/// A warning with the duration after `max_ttl of ` replaced by `…`.
fn blank_max_ttl(text: &str) -> String {
    match text.split_once("max_ttl of \\\"") {
        Some((head, tail)) => {
            let rest = tail.split_once("\\\"").map_or("", |(_, r)| r);
            format!("{head}max_ttl of …{rest}")
        }
        None => text.to_string(),
    }
}

/// Numbers within 2 of each other count as equal.
fn close(a: &str, b: &str) -> bool {
    match (a.parse::<i64>(), b.parse::<i64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= 2,
        _ => a == b,
    }
}

/// Of two shape strings, the `key:type` items that only one has.
fn only_differing(a: &str, b: &str) -> (String, String) {
    let (sa, sb): (BTreeSet<&str>, BTreeSet<&str>) = (a.split(' ').collect(), b.split(' ').collect());
    let only = |x: &BTreeSet<&str>, y: &BTreeSet<&str>| x.difference(y).copied().collect::<Vec<_>>().join(" ");
    (only(&sa, &sb), only(&sb, &sa))
}

/// `| step | field | why |` rows under "### Allowed differences" in the README.
fn allow_list() -> BTreeMap<(String, String), String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("devvault/README.md");
    let section = readme.split("### Allowed differences").nth(1).expect("README has \"### Allowed differences\"");
    let mut out = BTreeMap::new();
    for line in section.lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')).skip(2) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(|c| c.trim().trim_matches('`')).collect();
        if let [step, field, why] = cells[..] {
            assert!(!why.is_empty(), "allow-list entry {step} {field} gives no reason");
            out.insert((step.to_string(), field.to_string()), why.to_string());
        }
    }
    out
}

async fn devvault_side(pg: PgCluster, issuer: &ServiceAccountIssuer, reviewer: &str) -> Side {
    let v = DevVault::start("127.0.0.1:0".parse().unwrap(), "root").await.expect("devvault starts");
    let api = Api::new(&v.url(), Some("root"));
    side(api, pg, issuer, reviewer, Box::new(v)).await
}

async fn openbao_side(pg: PgCluster, issuer: &ServiceAccountIssuer, reviewer: &str) -> Side {
    let bao = tokio::task::spawn_blocking(OpenBao::start).await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    let api = Api::new(&bao.url(), Some(&bao.root_token));
    side(api, pg, issuer, reviewer, Box::new(bao)).await
}

async fn side(
    api: Api,
    pg: PgCluster,
    issuer: &ServiceAccountIssuer,
    reviewer: &str,
    server: Box<dyn std::any::Any + Send>,
) -> Side {
    let admin = format!("vault_admin_{}", std::process::id());
    let password = "diff-admin-password-1";
    pg.create_admin_role(&admin, password).await;
    let esc = |s: &str| s.replace('\n', "\\n");
    let other = ServiceAccountIssuer::generate(SigningAlg::Es256).unwrap();
    let mut expired = ServiceAccountIssuer::claims("default", "app", 600);
    // Beyond the 60 s leeway both servers grant.
    expired["exp"] = json!(chrono_now() - 120);
    let vars: HashMap<String, String> = [
        ("pg_url", pg.templated_url("postgres")),
        ("pg_user", admin),
        ("pg_password", password.to_string()),
        ("k8s_host", reviewer.to_string()),
        ("k8s_ca", esc(issuer.certificate_pem())),
        ("pem_key", esc(issuer.public_pem())),
        ("jwt", issuer.mint("default", "app", 600).unwrap()),
        ("expired_jwt", issuer.sign(&expired).unwrap()),
        ("foreign_jwt", other.mint("default", "app", 600).unwrap()),
        ("other_sa_jwt", issuer.mint("default", "intruder", 600).unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Side { api, pg, vars, _server: server }
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devvault_answers_like_openbao() {
    let issuer = Arc::new(ServiceAccountIssuer::generate(SigningAlg::Es256).unwrap());
    let reviewer = TokenReviewer::start(issuer.clone()).await.unwrap();
    let (pg_a, pg_b) = tokio::task::spawn_blocking(|| (PgCluster::start(), PgCluster::start())).await.unwrap();
    let (pg_a, pg_b) = (pg_a.unwrap_or_else(|e| panic!("{e}")), pg_b.unwrap_or_else(|e| panic!("{e}")));
    let url = reviewer.url();
    let (mut dv, mut bao) = tokio::join!(devvault_side(pg_a, &issuer, &url), openbao_side(pg_b, &issuer, &url));
    let allowed = allow_list();
    let mut used = BTreeSet::new();
    let mut unexplained = Vec::new();
    let (mut compared, mut exact, mut allowed_diffs) = (0, 0, 0);
    for step in script() {
        // Both at once, so TTLs and expiry line up.
        let (a, b) = tokio::join!(dv.run(&step), bao.run(&step));
        let (fa, fb) = (fields(&step, &a), fields(&step, &b));
        compared += 1;
        let names: BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
        let mut differs = false;
        for name in names {
            let (va, vb) = (fa.get(name), fb.get(name));
            let near = name.ends_with("(±2 s)") && va.zip(vb).is_some_and(|(a, b)| close(a, b));
            if va == vb || near {
                continue;
            }
            differs = true;
            let key = (step.name.to_string(), name.clone());
            if allowed.contains_key(&key) {
                used.insert(key);
            } else {
                let (va, vb) =
                    (va.map(String::as_str).unwrap_or("(absent)"), vb.map(String::as_str).unwrap_or("(absent)"));
                let (va, vb) =
                    if name == "data" || name == "auth" { only_differing(va, vb) } else { (va.into(), vb.into()) };
                unexplained.push(format!("{} {name}:\n    devvault: {va}\n    openbao:  {vb}", step.name));
            }
        }
        if differs {
            allowed_diffs += 1;
        } else {
            exact += 1;
        }
    }
    eprintln!(
        "differential: {compared} requests compared, {exact} exact matches, {allowed_diffs} with differences \
         ({} allow-list entries)",
        allowed.len()
    );
    let stale: Vec<_> = allowed.keys().filter(|k| !used.contains(*k)).collect();
    assert!(unexplained.is_empty(), "differences not in the allow-list:\n{}", unexplained.join("\n"));
    assert!(stale.is_empty(), "allow-list entries that no longer differ: {stale:?}");
}
