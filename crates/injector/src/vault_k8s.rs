//! vault-k8s compatibility: the common `vault.hashicorp.com/*` annotations
//! translated to a `Plan`. An annotation that cannot be translated denies
//! the pod, naming it: never silently dropped.

use std::collections::BTreeMap;

use super::gotemplate::{self, DEFAULT_MAP_TEMPLATE};
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

pub fn from_annotations(a: &BTreeMap<String, String>, defaults: &Defaults) -> Result<Plan, AnnotationError> {
    let mut plan = Plan::new(defaults);
    let mut per: BTreeMap<String, Secret> = BTreeMap::new();
    for (key, v) in a {
        let Some(k) = key.strip_prefix(PREFIX) else { continue };
        let value = v.as_str();
        match k {
            "agent-inject" | "agent-inject-status" => {}
            "role" => plan.role = value.trim().to_string(),
            "auth-path" => plan.auth_mount = auth_mount(key, value)?,
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
            _ => secret_field(key, k, value, &mut per)?,
        }
    }
    if plan.role.is_empty() {
        return Err(bad("vault.hashicorp.com/role", "is required (the Vault auth role)"));
    }
    // One secret per Vault path: consul-template reads a path once however
    // many templates use it, so their files share one credential set.
    let mut by_path: BTreeMap<String, usize> = BTreeMap::new();
    for (name, s) in &per {
        let (path, f) = secret_file(name, s)?;
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
    let s = per.entry(name.to_lowercase()).or_insert(Secret { path: None, template: None, file: None, perms: None });
    match field {
        "secret" => s.path = Some(value),
        "template" => s.template = Some(value),
        "file" => s.file = Some(value),
        _ => s.perms = Some(value),
    }
    Ok(())
}

/// A secret's Vault path and its file, from its annotations.
fn secret_file(name: &str, s: &Secret) -> Result<(String, PlanFile), AnnotationError> {
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
    fn what_is_not_translated_is_refused_by_name() {
        let base = [("agent-inject", "true"), ("role", "app"), ("agent-inject-secret-db", "database/creds/app")];
        for (k, v) in [
            ("agent-inject-command-db", "kill -HUP 1"),
            ("agent-cache-enable", "true"),
            ("agent-inject-token", "true"),
            ("agent-inject-template-file-db", "/t"),
            ("tls-skip-verify", "true"),
            ("agent-inject-perms-db", "rw"),
            ("agent-inject-template-db", "{{ with secret \"a\" }}{{ .Data.x | base64Decode }}{{ end }}"),
        ] {
            let all: Vec<(&str, &str)> = base.iter().copied().chain([(k, v)]).collect();
            let e = plan(&all, false).expect_err(k);
            assert_eq!(e.annotation, format!("{PREFIX}{k}"), "{e}");
        }
        let e = plan(&[("agent-inject", "true"), ("agent-inject-secret-db", "x")], false).unwrap_err();
        assert_eq!(e.annotation, "vault.hashicorp.com/role");
    }
}
