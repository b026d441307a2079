//! What to inject, read from a pod's `leasehold.dev/*` annotations, and
//! the agent config it becomes. vault-k8s annotations are translated to
//! the same `Plan` (`vault_k8s.rs`).

use std::collections::BTreeMap;

use serde_json::{Value, json};

pub const PREFIX: &str = "leasehold.dev/";
pub const STATUS: &str = "leasehold.dev/status";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("annotation {annotation}: {message}")]
pub struct AnnotationError {
    pub annotation: String,
    pub message: String,
}

pub fn bad(annotation: &str, message: impl Into<String>) -> AnnotationError {
    AnnotationError { annotation: annotation.to_string(), message: message.into() }
}

/// How the agent joins the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An init container with `restartPolicy: Always` (Kubernetes ≥ 1.29).
    Native,
    /// `agent --once` init container plus a regular sidecar container.
    Legacy,
    /// `agent --once` init container only (vault-k8s `agent-pre-populate-only` in legacy mode).
    InitOnly,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub role: String,
    /// `auth/<mount>/login`.
    pub auth_mount: String,
    pub auth_method: String,
    /// Overrides the injector's Vault address.
    pub vault_address: Option<String>,
    pub vault_namespace: Option<String>,
    pub mount_path: String,
    pub mode: Mode,
    pub init_first: bool,
    pub revoke: bool,
    pub secrets: Vec<PlanSecret>,
    pub on_change_signal: Option<(String, String)>,
    pub on_change_http: Option<String>,
    /// The agent containers' resources: (`requests` or `limits`, `cpu`,
    /// `memory` or `ephemeral-storage`) → quantity, over the defaults.
    pub resources: BTreeMap<(String, String), String>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub log_level: Option<String>,
    /// Vault's CA as a file in the agent container (vault-k8s `ca-cert`).
    pub vault_ca_cert: Option<String>,
    /// A Kubernetes Secret mounted in the agent containers at `/vault/tls`
    /// (vault-k8s `tls-secret`).
    pub tls_secret: Option<String>,
    /// The containers that get the credentials volume; all when `None`.
    pub containers: Option<Vec<String>>,
    /// What the client is told as admission warnings: each annotation
    /// accepted but not honoured, with why, and caveats of translated ones.
    pub warnings: Vec<String>,
    /// The annotations accepted but not honoured (each has its warning).
    pub ignored: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSecret {
    pub name: String,
    pub path: String,
    /// A JSON object: the secret is read with POST (e.g. `pki/issue/<role>`).
    pub body: Option<Value>,
    pub files: Vec<PlanFile>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanFile {
    /// Relative to the mount path.
    pub file: String,
    pub format: Option<String>,
    pub template: Option<String>,
    pub mode: Option<String>,
}

impl Plan {
    /// What a pod gets before its annotations say more.
    pub fn new(defaults: &Defaults) -> Plan {
        Plan {
            role: String::new(),
            auth_mount: defaults.auth_mount.clone(),
            auth_method: "kubernetes".into(),
            vault_address: None,
            vault_namespace: None,
            mount_path: "/vault/secrets".into(),
            mode: if defaults.legacy { Mode::Legacy } else { Mode::Native },
            init_first: false,
            revoke: true,
            secrets: Vec::new(),
            on_change_signal: None,
            on_change_http: None,
            resources: BTreeMap::new(),
            run_as_user: None,
            run_as_group: None,
            log_level: None,
            vault_ca_cert: None,
            tls_secret: None,
            containers: None,
            warnings: Vec::new(),
            ignored: Vec::new(),
        }
    }
}

/// Go's `strconv.ParseBool`, which vault-k8s uses for its flags.
pub fn parse_bool(annotation: &str, v: &str) -> Result<bool, AnnotationError> {
    match v.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(bad(annotation, format!("{other:?} is not true or false"))),
    }
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// A file name inside the credentials volume: relative, no `..`.
pub fn valid_file(annotation: &str, f: &str) -> Result<String, AnnotationError> {
    let f = f.trim();
    if f.is_empty() || f.starts_with('/') || f.split('/').any(|seg| seg == ".." || seg.is_empty() || seg == ".") {
        return Err(bad(
            annotation,
            format!("{f:?} must be a relative path inside the credentials volume, without `..`"),
        ));
    }
    Ok(f.to_string())
}

pub fn valid_mode(annotation: &str, m: &str) -> Result<String, AnnotationError> {
    let m = m.trim();
    let digits = m.strip_prefix('0').unwrap_or(m);
    if digits.len() != 3 || u32::from_str_radix(digits, 8).is_err() {
        return Err(bad(annotation, format!("{m:?} is not an octal file mode like 0440")));
    }
    Ok(format!("0{digits}"))
}

pub fn valid_abs_path(annotation: &str, p: &str) -> Result<String, AnnotationError> {
    let p = p.trim().trim_end_matches('/');
    if !p.starts_with('/') || p.split('/').any(|seg| seg == "..") {
        return Err(bad(annotation, format!("{p:?} must be an absolute path without `..`")));
    }
    Ok(p.to_string())
}

/// `auth/kubernetes`, `kubernetes` and `/auth/kubernetes/` are one mount.
pub fn auth_mount(annotation: &str, v: &str) -> Result<String, AnnotationError> {
    let m = v.trim().trim_matches('/');
    let m = m.strip_prefix("auth/").unwrap_or(m);
    if m.is_empty() || m.contains(char::is_whitespace) {
        return Err(bad(annotation, format!("{v:?} is not an auth mount path")));
    }
    Ok(m.to_string())
}

/// The pod's `leasehold.dev/*` annotations (`inject` already true).
pub fn from_annotations(a: &BTreeMap<String, String>, defaults: &Defaults) -> Result<Plan, AnnotationError> {
    let mut plan = Plan::new(defaults);
    let mut per: BTreeMap<String, BTreeMap<&str, (&str, &str)>> = BTreeMap::new();
    let mut pid_file = None;
    let mut signal = None;
    for (key, v) in a {
        let Some(k) = key.strip_prefix(PREFIX) else { continue };
        let value = v.as_str();
        match k {
            "inject" | "status" => {}
            "role" => plan.role = value.trim().to_string(),
            "auth-path" => plan.auth_mount = auth_mount(key, value)?,
            "auth-method" => match value.trim() {
                m @ ("kubernetes" | "jwt") => plan.auth_method = m.to_string(),
                other => return Err(bad(key, format!("{other:?}: use kubernetes or jwt"))),
            },
            "vault-address" => plan.vault_address = Some(http_url(key, value)?),
            "vault-namespace" => plan.vault_namespace = Some(value.trim().to_string()),
            "mount-path" => plan.mount_path = valid_abs_path(key, value)?,
            "legacy-sidecar" => {
                if parse_bool(key, value)? {
                    plan.mode = Mode::Legacy
                }
            }
            "init-first" => plan.init_first = parse_bool(key, value)?,
            "revoke-on-shutdown" => plan.revoke = parse_bool(key, value)?,
            "on-change-signal" => {
                let s = value.trim();
                if s.parse::<nix::sys::signal::Signal>().is_err() {
                    return Err(bad(key, format!("{s:?} is not a signal name like SIGHUP")));
                }
                signal = Some(s.to_string());
            }
            "on-change-pid-file" => pid_file = Some(valid_abs_path(key, value)?),
            "on-change-http" => plan.on_change_http = Some(http_url(key, value)?),
            _ => {
                let Some((kind, name)) = ["secret-", "template-", "format-", "file-", "perms-", "body-"]
                    .iter()
                    .find_map(|p| k.strip_prefix(p).map(|n| (&p[..p.len() - 1], n)))
                else {
                    return Err(bad(key, "unknown leasehold annotation (docs/injector.md lists them)"));
                };
                if !valid_name(name) {
                    return Err(bad(key, format!("{name:?} is not a secret name ([a-z0-9_-])")));
                }
                per.entry(name.to_string()).or_default().insert(kind, (key.as_str(), value));
            }
        }
    }
    match (signal, pid_file) {
        (Some(s), Some(p)) => plan.on_change_signal = Some((s, p)),
        (Some(_), None) => {
            return Err(bad(
                "leasehold.dev/on-change-signal",
                "needs leasehold.dev/on-change-pid-file (the app's pid file)",
            ));
        }
        (None, Some(_)) => return Err(bad("leasehold.dev/on-change-pid-file", "needs leasehold.dev/on-change-signal")),
        (None, None) => {}
    }
    if plan.role.is_empty() {
        return Err(bad("leasehold.dev/role", "is required (the Vault auth role)"));
    }
    for (name, kinds) in per {
        plan.secrets.push(secret(name, &kinds)?);
    }
    if plan.secrets.is_empty() {
        return Err(bad("leasehold.dev/inject", "no leasehold.dev/secret-<name> annotation: nothing to inject"));
    }
    Ok(plan)
}

/// One secret from its `leasehold.dev/<kind>-<name>` annotations (each
/// kind with its annotation's key and value).
fn secret(name: String, kinds: &BTreeMap<&str, (&str, &str)>) -> Result<PlanSecret, AnnotationError> {
    let Some(&(_, path)) = kinds.get("secret") else {
        let (key, _) = kinds.values().next().copied().unwrap_or_default();
        return Err(bad(key, format!("needs leasehold.dev/secret-{name} (the Vault path to read)")));
    };
    let path = path.trim().trim_matches('/').to_string();
    if path.is_empty() {
        return Err(bad(&format!("{PREFIX}secret-{name}"), "is empty (the Vault path to read)"));
    }
    let file = match kinds.get("file") {
        Some(&(k, f)) => valid_file(k, f)?,
        None => name.clone(),
    };
    let template = kinds.get("template").map(|&(_, t)| t.to_string());
    let format = match kinds.get("format") {
        Some(&(k, f)) => match f.trim() {
            f @ ("json" | "env") if template.is_none() => Some(f.to_string()),
            "json" | "env" => return Err(bad(k, "a file has a format or a template, not both")),
            other => return Err(bad(k, format!("{other:?}: use json or env (or a template)"))),
        },
        None if template.is_none() => Some("json".to_string()),
        None => None,
    };
    let mode = kinds.get("perms").map(|&(k, m)| valid_mode(k, m)).transpose()?;
    let body = match kinds.get("body") {
        Some(&(k, b)) => match serde_json::from_str::<Value>(b) {
            Ok(v @ Value::Object(_)) => Some(v),
            _ => return Err(bad(k, "is not a JSON object")),
        },
        None => None,
    };
    Ok(PlanSecret { name, path, body, files: vec![PlanFile { file, format, template, mode }] })
}

pub fn http_url(annotation: &str, v: &str) -> Result<String, AnnotationError> {
    let v = v.trim();
    match config::http_url_problem(v) {
        Some(problem) => Err(bad(annotation, problem)),
        None => Ok(v.to_string()),
    }
}

/// The injector's own settings, from its flags.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub vault_address: String,
    pub vault_ca_pem: Option<String>,
    pub vault_namespace: String,
    pub auth_mount: String,
    pub image: String,
    pub legacy: bool,
    pub token_audience: Option<String>,
    pub telemetry_port: u16,
}

pub const TOKEN_DIR: &str = "/var/run/secrets/leasehold";
pub const STATE_DIR: &str = "/vault/state";

/// The agent's config (JSON, which is YAML) for `plan`. `fs_group`: the
/// pod's, whose members (every container) may read files of mode 0440;
/// without one the files are 0444 (the volume is the pod's alone).
pub fn agent_config(plan: &Plan, defaults: &Defaults, fs_group: bool) -> Value {
    let default_mode = if fs_group { "0440" } else { "0444" };
    let secrets: Vec<Value> = plan
        .secrets
        .iter()
        .map(|s| {
            let files: Vec<Value> = s
                .files
                .iter()
                .map(|f| {
                    let mut v = json!({
                        "path": format!("{}/{}", plan.mount_path, f.file),
                        "mode": f.mode.clone().unwrap_or_else(|| default_mode.to_string()),
                    });
                    if let Some(t) = &f.template {
                        v["template"] = json!(t);
                    }
                    if let Some(fmt) = &f.format {
                        v["format"] = json!(fmt);
                    }
                    v
                })
                .collect();
            let mut v = json!({ "name": s.name, "path": s.path, "files": files });
            if let Some(b) = &s.body {
                v["method"] = json!("POST");
                v["body"] = b.clone();
            }
            let mut hooks = serde_json::Map::new();
            if let Some((sig, pid)) = &plan.on_change_signal {
                hooks.insert("signal".into(), json!({ "pid_file": pid, "signal": sig }));
            }
            if let Some(url) = &plan.on_change_http {
                hooks.insert("http".into(), json!({ "url": url }));
            }
            if !hooks.is_empty() {
                v["on_change"] = Value::Object(hooks);
            }
            v
        })
        .collect();
    let mut vault = json!({ "address": plan.vault_address.clone().unwrap_or_else(|| defaults.vault_address.clone()) });
    let ns = plan.vault_namespace.clone().unwrap_or_else(|| defaults.vault_namespace.clone());
    if !ns.is_empty() {
        vault["namespace"] = json!(ns);
    }
    match (&plan.vault_ca_cert, &defaults.vault_ca_pem) {
        (Some(file), _) => vault["ca_cert"] = json!(file),
        (None, Some(pem)) => vault["ca_cert_pem"] = json!(pem),
        (None, None) => {}
    }
    let mut auth = serde_json::Map::new();
    auth.insert(
        plan.auth_method.clone(),
        json!({ "role": plan.role, "mount": plan.auth_mount, "token_path": format!("{TOKEN_DIR}/token") }),
    );
    json!({
        "vault": vault,
        "auth": auth,
        "secrets": secrets,
        "state_dir": STATE_DIR,
        "shutdown": { "revoke": plan.revoke },
        "telemetry": { "listen": format!("0.0.0.0:{}", defaults.telemetry_port) },
        "log": { "format": "json", "level": plan.log_level.as_deref().unwrap_or("info") },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn defaults() -> Defaults {
        Defaults {
            vault_address: "https://vault:8200".into(),
            vault_ca_pem: None,
            vault_namespace: String::new(),
            auth_mount: "kubernetes".into(),
            image: "leasehold:test".into(),
            legacy: false,
            token_audience: None,
            telemetry_port: 9102,
        }
    }

    fn plan(pairs: &[(&str, &str)]) -> Result<Plan, AnnotationError> {
        let a = pairs.iter().map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string())).collect();
        from_annotations(&a, &defaults())
    }

    #[test]
    fn a_secret_with_defaults() {
        let p = plan(&[("inject", "true"), ("role", "app"), ("secret-db", "/database/creds/app/")]).unwrap();
        assert_eq!(p.secrets.len(), 1);
        assert_eq!(p.secrets[0].path, "database/creds/app");
        assert_eq!(
            p.secrets[0].files[0],
            PlanFile { file: "db".into(), format: Some("json".into()), template: None, mode: None }
        );
        assert_eq!((p.mode, p.auth_mount.as_str(), p.revoke), (Mode::Native, "kubernetes", true));
    }

    #[test]
    fn each_mistake_names_its_annotation() {
        let base = [("inject", "true"), ("role", "app"), ("secret-db", "database/creds/app")];
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("perms-db", "rw")], "leasehold.dev/perms-db"),
            (&[("file-db", "../etc/passwd")], "leasehold.dev/file-db"),
            (&[("format-db", "yaml")], "leasehold.dev/format-db"),
            (&[("format-db", "env"), ("template-db", "x")], "leasehold.dev/format-db"),
            (&[("template-cache", "x")], "leasehold.dev/template-cache"),
            (&[("secret-DB", "x")], "leasehold.dev/secret-DB"),
            (&[("body-db", "[1]")], "leasehold.dev/body-db"),
            (&[("legacy-sidecar", "yes")], "leasehold.dev/legacy-sidecar"),
            (&[("on-change-signal", "SIGHUP")], "leasehold.dev/on-change-signal"),
            (&[("on-change-signal", "HUP"), ("on-change-pid-file", "/run/app.pid")], "leasehold.dev/on-change-signal"),
            (&[("mount-path", "relative")], "leasehold.dev/mount-path"),
            (&[("vault-address", "vault:8200")], "leasehold.dev/vault-address"),
            (&[("rol", "app")], "leasehold.dev/rol"),
        ];
        for (extra, named) in cases {
            let all: Vec<(&str, &str)> = base.iter().chain(extra.iter()).copied().collect();
            let e = plan(&all).expect_err(named);
            assert_eq!(e.annotation, *named, "{e}");
        }
        assert_eq!(plan(&[("inject", "true"), ("secret-db", "x")]).unwrap_err().annotation, "leasehold.dev/role");
        assert_eq!(plan(&[("inject", "true"), ("role", "app")]).unwrap_err().annotation, "leasehold.dev/inject");
    }

    #[test]
    fn the_config_names_files_under_the_mount_path() {
        let p = plan(&[
            ("inject", "true"),
            ("role", "app"),
            ("secret-db", "database/creds/app"),
            ("mount-path", "/etc/creds/"),
            ("file-db", "db/url"),
            ("template-db", "{{ username }}"),
            ("on-change-signal", "SIGHUP"),
            ("on-change-pid-file", "/run/app/pid"),
        ])
        .unwrap();
        let c = agent_config(&p, &defaults(), true);
        let f = &c["secrets"][0]["files"][0];
        assert_eq!(f["path"], "/etc/creds/db/url");
        assert_eq!(f["mode"], "0440");
        assert!(f.get("format").is_none());
        assert_eq!(c["secrets"][0]["on_change"]["signal"], json!({ "pid_file": "/run/app/pid", "signal": "SIGHUP" }));
        assert_eq!(c["auth"]["kubernetes"]["token_path"], "/var/run/secrets/leasehold/token");
        assert_eq!(agent_config(&p, &defaults(), false)["secrets"][0]["files"][0]["mode"], "0444");
    }
}
