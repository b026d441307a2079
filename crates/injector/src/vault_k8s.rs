//! vault-k8s compatibility: every `vault.hashicorp.com/*` annotation
//! vault-k8s documents is translated to a `Plan`, or accepted and ignored
//! with an admission warning saying why (`ignored`). A pod is denied,
//! naming the annotation and why, only where honouring it would be unsafe
//! (`tls-skip-verify`, running the agent as root) or where ignoring it
//! would write files that mean something else (a template file, a
//! template leasehold cannot translate). Nothing is silently dropped.

use std::collections::BTreeMap;

use super::gotemplate::{self, DEFAULT_JSON_TEMPLATE, DEFAULT_MAP_TEMPLATE};
use super::plan::{
    AnnotationError, Defaults, Mode, Plan, PlanFile, PlanSecret, auth_mount, bad, http_url, parse_bool, valid_abs_path,
    valid_file, valid_mode,
};

pub const PREFIX: &str = "vault.hashicorp.com/";
pub const INJECT: &str = "vault.hashicorp.com/agent-inject";
pub const STATUS: &str = "vault.hashicorp.com/agent-inject-status";

struct Secret<'a> {
    path: Option<&'a str>,
    template: Option<&'a str>,
    file: Option<&'a str>,
    perms: Option<&'a str>,
}

/// What vault-k8s annotations leasehold accepts without honouring, and
/// why: each becomes an admission warning, so a migrated pod is admitted
/// (its ReplicaSet is not left at 0) and its owner told. `None`: not one
/// of these.
fn ignored(k: &str, value: &str) -> Option<&'static str> {
    let why = match k {
        "agent-cache-enable"
        | "agent-cache-use-auto-auth-token"
        | "agent-cache-listener-port"
        | "agent-cache-exit-on-err" => "leasehold has no cache listener: the app reads files, not a local Vault",
        "agent-inject-token" => {
            "the Vault token stays with the agent: in the app's volume it would let the app read every secret of the role"
        }
        "agent-pre-populate" => {
            "the credentials are always written before the app starts (the sidecar's startup probe)"
        }
        "agent-image" => "the injector's --image is used",
        "agent-revoke-grace" => "leasehold revokes at shutdown within its own shutdown timeout",
        "agent-run-as-same-user" => "the agent runs as its own non-root user; the files' mode lets the app read them",
        "agent-set-security-context" => "the agent always runs with its restricted security context",
        "agent-share-process-namespace" => "use leasehold.dev/on-change-signal to signal the app",
        "agent-copy-volume-mounts" | "agent-service-account-token-volume-name" => {
            "the agent mounts a projected ServiceAccount token of its own"
        }
        "agent-configmap" | "agent-extra-secret" => {
            "a Vault Agent configuration is not read: the annotations say what to render"
        }
        "agent-json-patch" | "agent-init-json-patch" => "the agent container is not patched further",
        "agent-enable-quit"
        | "agent-auto-auth-exit-on-err"
        | "go-max-procs"
        | "auth-min-backoff"
        | "auth-max-backoff"
        | "client-max-retries"
        | "client-timeout"
        | "template-config-exit-on-retry-failure"
        | "template-static-secret-render-interval"
        | "template-max-connections-per-host"
        | "disable-idle-connections"
        | "disable-keep-alives" => "leasehold's own retry, backoff and connection settings apply (docs/reliability.md)",
        "log-format" => "the agent logs JSON",
        "tls-server-name" => "the name in the Vault address is verified",
        "proxy-address" => "the agent connects to Vault directly (HTTPS_PROXY in its environment is not set)",
        "error-on-missing-key" if value.trim() == "true" => return None,
        "error-on-missing-key" => "templates are strict: a missing key is always an error",
        "client-cert" | "client-key" | "ca-key" => "client certificates to Vault are not supported",
        _ if k.starts_with("agent-telemetry-") => "the agent serves /metrics on its telemetry port",
        _ if k.starts_with("auth-config-") => "the kubernetes (or jwt) login needs only the role",
        _ if k.starts_with("agent-inject-command-") => {
            "commands are not run (the image has no shell): use leasehold.dev/on-change-signal or on-change-http"
        }
        _ => return None,
    };
    Some(why)
}

/// A Kubernetes quantity (`500m`, `128Mi`, `1.5`), as vault-k8s takes it.
fn quantity(key: &str, v: &str) -> Result<String, AnnotationError> {
    let v = v.trim();
    let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &v[digits.len()..];
    let ok = !digits.is_empty()
        && digits.parse::<f64>().is_ok_and(|n| n >= 0.0)
        && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix);
    if !ok {
        return Err(bad(key, format!("{v:?} is not a Kubernetes quantity like 500m or 128Mi")));
    }
    Ok(v.to_string())
}

fn id(key: &str, v: &str) -> Result<i64, AnnotationError> {
    v.trim().parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| bad(key, format!("{v:?} is not a user or group id")))
}

pub fn from_annotations(a: &BTreeMap<String, String>, defaults: &Defaults) -> Result<Plan, AnnotationError> {
    let mut plan = Plan::new(defaults);
    let mut per: BTreeMap<String, Secret> = BTreeMap::new();
    let get = |k: &str| a.get(&format!("{PREFIX}{k}")).map(String::as_str);
    let preserve_case = get("preserve-secret-case").map(|v| parse_bool(&format!("{PREFIX}preserve-secret-case"), v));
    let preserve_case = preserve_case.transpose()?.unwrap_or(false);
    let default_json = match get("agent-inject-default-template").map(str::trim) {
        None | Some("map") => false,
        Some("json") => true,
        Some(other) => {
            return Err(bad(&format!("{PREFIX}agent-inject-default-template"), format!("{other:?}: use map or json")));
        }
    };
    for (key, v) in a {
        let Some(k) = key.strip_prefix(PREFIX) else { continue };
        let value = v.as_str();
        let resource = |kind: &str, what: &str| ((kind.to_string(), what.to_string()), quantity(key, value));
        match k {
            "agent-inject" | "agent-inject-status" | "preserve-secret-case" | "agent-inject-default-template" => {}
            "role" => plan.role = value.trim().to_string(),
            "auth-path" => plan.auth_mount = auth_mount(key, value)?,
            "auth-type" => match value.trim() {
                m @ ("kubernetes" | "jwt") => plan.auth_method = m.to_string(),
                other => return Err(bad(key, format!("{other:?}: leasehold logs in with kubernetes or jwt"))),
            },
            "namespace" => plan.vault_namespace = Some(value.trim().to_string()),
            "service" => plan.vault_address = Some(http_url(key, value)?),
            "secret-volume-path" => plan.mount_path = valid_abs_path(key, value)?,
            "agent-init-first" => plan.init_first = parse_bool(key, value)?,
            "agent-pre-populate-only" => {
                // Native sidecars do not keep a Job running, and they revoke
                // at its end; only the legacy layout needs the init-only form.
                if parse_bool(key, value)? && plan.mode == Mode::Legacy {
                    plan.mode = Mode::InitOnly;
                }
            }
            // leasehold revokes at shutdown anyway (vault-k8s's default is not to).
            "agent-revoke-on-shutdown" => {
                parse_bool(key, value)?;
            }
            "agent-limits-cpu"
            | "agent-limits-mem"
            | "agent-limits-ephemeral"
            | "agent-requests-cpu"
            | "agent-requests-mem"
            | "agent-requests-ephemeral" => {
                let (kind, what) = k.trim_start_matches("agent-").split_once('-').unwrap_or_default();
                let what = match what {
                    "cpu" => "cpu",
                    "mem" => "memory",
                    _ => "ephemeral-storage",
                };
                let (slot, q) = resource(kind, what);
                plan.resources.insert(slot, q?);
            }
            "agent-run-as-user" => {
                let uid = id(key, value)?;
                if uid == 0 {
                    return Err(bad(key, "the agent does not run as root (0): it holds the pod's Vault token"));
                }
                plan.run_as_user = Some(uid);
            }
            "agent-run-as-group" => plan.run_as_group = Some(id(key, value)?),
            "log-level" => {
                plan.log_level = Some(match value.trim() {
                    l @ ("trace" | "debug" | "info" | "warn" | "error") => l.to_string(),
                    "warning" => "warn".into(),
                    "err" => "error".into(),
                    other => return Err(bad(key, format!("{other:?}: use trace, debug, info, warn or error"))),
                })
            }
            "ca-cert" => plan.vault_ca_cert = Some(valid_abs_path(key, value)?),
            "tls-secret" => {
                let name = value.trim();
                let dns = !name.is_empty()
                    && name.len() <= 253
                    && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
                if !dns {
                    return Err(bad(key, format!("{name:?} is not a Secret name")));
                }
                plan.tls_secret = Some(name.to_string());
            }
            "tls-skip-verify" => {
                if parse_bool(key, value)? {
                    // Unsafe to honour: whoever answers at Vault's address
                    // would get the pod's JWT and hand out credentials.
                    return Err(bad(
                        key,
                        "leasehold always verifies Vault's certificate: give its CA with ca-cert and tls-secret (or the injector's --vault-ca-cert)",
                    ));
                }
            }
            "agent-inject-containers" => {
                let names: Vec<String> =
                    value.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
                if names.is_empty() {
                    return Err(bad(key, "names no container"));
                }
                plan.containers = Some(names);
            }
            _ => match ignored(k, value) {
                Some(why) => {
                    plan.warnings.push(format!("{key} is ignored: {why}"));
                    plan.ignored.push(key.clone());
                }
                None => secret_field(key, k, value, preserve_case, &mut per)?,
            },
        }
    }
    if plan.role.is_empty() {
        return Err(bad("vault.hashicorp.com/role", "is required (the Vault auth role)"));
    }
    if plan.vault_ca_cert.is_some() && plan.tls_secret.is_none() && defaults.vault_ca_pem.is_none() {
        plan.warnings.push(format!(
            "{PREFIX}ca-cert names a file in the agent container: without {PREFIX}tls-secret it must come from the image"
        ));
    }
    // One secret per Vault path: consul-template reads a path once however
    // many templates use it, so their files share one credential set.
    let mut by_path: BTreeMap<String, usize> = BTreeMap::new();
    for (name, s) in &per {
        let (path, f) = secret_file(name, s, default_json)?;
        match by_path.get(&path) {
            Some(&i) => plan.secrets[i].files.push(f),
            None => {
                by_path.insert(path.clone(), plan.secrets.len());
                plan.secrets.push(PlanSecret {
                    name: agent_name(name, &plan.secrets),
                    path,
                    body: None,
                    files: vec![f],
                });
            }
        }
    }
    if plan.secrets.is_empty() {
        return Err(bad(INJECT, "no agent-inject-secret-<name> or agent-inject-template-<name>: nothing to inject"));
    }
    Ok(plan)
}

/// One `agent-inject-{secret,template,file,perms}-<name>` annotation, into
/// its secret's entry.
fn secret_field<'a>(
    key: &str,
    k: &str,
    value: &'a str,
    preserve_case: bool,
    per: &mut BTreeMap<String, Secret<'a>>,
) -> Result<(), AnnotationError> {
    let (field, name) = if let Some(n) = k.strip_prefix("agent-inject-secret-") {
        ("secret", n)
    } else if let Some(n) = k.strip_prefix("agent-inject-template-file-") {
        return Err(bad(
            key,
            format!("template files are not supported; put the template of {n:?} in agent-inject-template-{n}"),
        ));
    } else if let Some(n) = k.strip_prefix("agent-inject-template-") {
        ("template", n)
    } else if let Some(n) = k.strip_prefix("agent-inject-file-") {
        ("file", n)
    } else if let Some(n) = k.strip_prefix("agent-inject-perms-") {
        ("perms", n)
    } else {
        return Err(bad(
            key,
            "not supported by leasehold's vault-k8s compatibility (docs/injector.md says why and what to use)",
        ));
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(bad(key, format!("{name:?} is not a secret name (letters, digits, `.`, `_`, `-`)")));
    }
    // vault-k8s lower-cases secret names (without preserve-secret-case).
    let name = if preserve_case { name.to_string() } else { name.to_lowercase() };
    let s = per.entry(name).or_insert(Secret { path: None, template: None, file: None, perms: None });
    match field {
        "secret" => s.path = Some(value),
        "template" => s.template = Some(value),
        "file" => s.file = Some(value),
        _ => s.perms = Some(value),
    }
    Ok(())
}

/// A secret's Vault path and its file, from its annotations.
fn secret_file(name: &str, s: &Secret, default_json: bool) -> Result<(String, PlanFile), AnnotationError> {
    let key = |f: &str| format!("{PREFIX}agent-inject-{f}-{name}");
    let (template, path) = match s.template {
        Some(t) => {
            let tr = gotemplate::translate(t).map_err(|e| bad(&key("template"), e.to_string()))?;
            let path = tr.path.or(s.path.map(str::to_string)).ok_or_else(|| {
                bad(
                    &key("template"),
                    "reads no secret (no `with secret \"…\"`) and there is no agent-inject-secret of that name",
                )
            })?;
            (tr.template, path)
        }
        None => match s.path {
            // vault-k8s's `json` default template: the secret's data as JSON.
            Some(p) if default_json => (DEFAULT_JSON_TEMPLATE.to_string(), p.to_string()),
            Some(p) => (DEFAULT_MAP_TEMPLATE.to_string(), p.to_string()),
            None => {
                let field = if s.file.is_some() { "file" } else { "perms" };
                return Err(bad(
                    &key(field),
                    format!("needs agent-inject-secret-{name} or agent-inject-template-{name}"),
                ));
            }
        },
    };
    let path = path.trim().trim_matches('/').to_string();
    if path.is_empty() {
        return Err(bad(&key("secret"), "is empty (the Vault path to read)"));
    }
    let file = match s.file {
        Some(f) => valid_file(&key("file"), f)?,
        None => valid_file(&key("secret"), name)?,
    };
    let mode = s.perms.map(|m| valid_mode(&key("perms"), m)).transpose()?;
    Ok((path, PlanFile { file, format: None, template: Some(template), mode }))
}

/// vault-k8s names may hold `.` and capitals; the agent's are `[a-z0-9_-]`.
fn agent_name(name: &str, taken: &[PlanSecret]) -> String {
    let base: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let mut n = base.clone();
    let mut i = 2;
    while taken.iter().any(|s| s.name == n) {
        n = format!("{base}-{i}");
        i += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(legacy: bool) -> Defaults {
        Defaults { legacy, ..crate::plan::tests::defaults() }
    }

    fn plan(pairs: &[(&str, &str)], legacy: bool) -> Result<Plan, AnnotationError> {
        let a = pairs.iter().map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string())).collect();
        from_annotations(&a, &defaults(legacy))
    }

    #[test]
    fn a_plan_the_agent_would_refuse_is_denied_at_admission() {
        // Two secrets written to one file: each annotation is fine, the
        // agent's config is not (it would exit 78 in the pod).
        let p = plan(
            &[
                ("role", "app"),
                ("agent-inject-secret-a", "database/creds/a"),
                ("agent-inject-file-a", "db"),
                ("agent-inject-secret-b", "database/creds/b"),
                ("agent-inject-file-b", "db"),
            ],
            false,
        )
        .unwrap();
        let pod = serde_json::json!({ "spec": { "containers": [{ "name": "app" }] } });
        let e = crate::patch::patch(&pod, &p, &defaults(false)).unwrap_err();
        assert!(e.to_string().contains("is written by another file entry"), "{e}");
    }

    #[test]
    fn one_secret_per_path_and_names_the_agent_accepts() {
        let p = plan(
            &[
                ("agent-inject", "true"),
                ("role", "app"),
                ("auth-path", "auth/k8s"),
                ("agent-inject-secret-Config.TXT", "database/creds/app"),
                ("agent-inject-secret-b", "database/creds/app"),
                ("agent-inject-secret-kv", "kv/data/app"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(p.auth_mount, "k8s");
        let names: Vec<(&str, usize)> = p.secrets.iter().map(|s| (s.name.as_str(), s.files.len())).collect();
        assert_eq!(names, [("b", 2), ("kv", 1)]);
        let files: Vec<&str> = p.secrets[0].files.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(files, ["b", "config.txt"], "names lower-cased, as vault-k8s does");
        assert_eq!(p.secrets[0].files[0].template.as_deref(), Some(DEFAULT_MAP_TEMPLATE));
        let p = plan(&[("agent-inject", "true"), ("role", "app"), ("agent-inject-secret-c.d", "kv/data/x")], false)
            .unwrap();
        assert_eq!((p.secrets[0].name.as_str(), p.secrets[0].files[0].file.as_str()), ("c-d", "c.d"));
    }

    #[test]
    fn pre_populate_only_is_the_native_sidecar_or_the_init_container() {
        let a = [
            ("agent-inject", "true"),
            ("role", "r"),
            ("agent-inject-secret-db", "database/creds/r"),
            ("agent-pre-populate-only", "true"),
        ];
        assert_eq!(plan(&a, false).unwrap().mode, Mode::Native);
        assert_eq!(plan(&a, true).unwrap().mode, Mode::InitOnly);
    }

    #[test]
    fn only_what_would_be_unsafe_or_wrong_is_refused_by_name() {
        let base = [("agent-inject", "true"), ("role", "app"), ("agent-inject-secret-db", "database/creds/app")];
        for (k, v) in [
            ("agent-inject-template-file-db", "/t"),
            ("tls-skip-verify", "true"),
            ("agent-run-as-user", "0"),
            ("agent-inject-perms-db", "rw"),
            ("agent-limits-cpu", "lots"),
            ("log-level", "chatty"),
            ("auth-type", "gcp"),
            ("agent-inject-default-template", "yaml"),
            ("agent-inject-template-db", "{{ with secret \"a\" }}{{ .Data.x | sha256Hex }}{{ end }}"),
        ] {
            let all: Vec<(&str, &str)> = base.iter().copied().chain([(k, v)]).collect();
            let e = plan(&all, false).expect_err(k);
            assert_eq!(e.annotation, format!("{PREFIX}{k}"), "{e}");
        }
        let e = plan(&[("agent-inject", "true"), ("agent-inject-secret-db", "x")], false).unwrap_err();
        assert_eq!(e.annotation, "vault.hashicorp.com/role");
        // Accepted, each with a warning naming it and why.
        for (k, v) in [
            ("agent-inject-command-db", "kill -HUP 1"),
            ("agent-cache-enable", "true"),
            ("agent-inject-token", "true"),
            ("agent-telemetry-prometheus-retention-time", "30s"),
            ("auth-config-token-path", "/t"),
            ("tls-skip-verify", "false"),
        ] {
            let all: Vec<(&str, &str)> = base.iter().copied().chain([(k, v)]).collect();
            let p = plan(&all, false).unwrap_or_else(|e| panic!("{k}: {e}"));
            let warned = p.warnings.iter().any(|w| w.starts_with(&format!("{PREFIX}{k} is ignored: ")));
            assert_eq!(warned, k != "tls-skip-verify", "{k}: {:?}", p.warnings);
        }
    }

    #[test]
    fn resources_users_and_names_are_translated() {
        let p = plan(
            &[
                ("agent-inject", "true"),
                ("role", "app"),
                ("agent-inject-secret-Db", "database/creds/app"),
                ("preserve-secret-case", "true"),
                ("agent-limits-mem", "64Mi"),
                ("agent-requests-ephemeral", "1Mi"),
                ("agent-run-as-user", "1000"),
                ("log-level", "warning"),
                ("agent-inject-containers", "app, sidecar"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(p.secrets[0].files[0].file, "Db", "the case preserved");
        assert_eq!(p.resources[&("limits".to_string(), "memory".to_string())], "64Mi");
        assert_eq!(p.resources[&("requests".to_string(), "ephemeral-storage".to_string())], "1Mi");
        assert_eq!((p.run_as_user, p.log_level.as_deref()), (Some(1000), Some("warn")));
        assert_eq!(p.containers, Some(vec!["app".to_string(), "sidecar".to_string()]));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }
}
