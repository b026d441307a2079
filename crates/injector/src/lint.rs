//! `leasehold injector lint`: what the webhook would do with existing
//! workloads (YAML files, or `kubectl get -o yaml` output), before anything
//! is swapped: for each pod template annotated for vault-k8s or leasehold,
//! the annotations translated, those accepted and ignored (the admission
//! warnings, with why), or why the pod would be denied; and whether it
//! carries the opt-in label the webhook's `objectSelector` asks for.
//! Pure: documents in, findings out (the binary reads the files).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::plan::{self, Defaults};
use super::{patch, vault_k8s};

/// The label a pod must carry for the webhook to see it at all.
pub const OPT_IN_LABEL: &str = "leasehold.dev/inject";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted with the agent: the annotations honoured, and the
    /// admission warnings (the ignored ones with why, caveats of the rest).
    Injected {
        translated: Vec<String>,
        ignored: Vec<String>,
    },
    Denied(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `Deployment shop/api`.
    pub workload: String,
    pub verdict: Verdict,
    /// The pod template lacks `leasehold.dev/inject: "true"` as a label.
    pub needs_label: bool,
}

/// Every workload of `docs` (a `List`'s items too) whose pod template asks
/// for injection.
pub fn lint(docs: &[Value], defaults: &Defaults) -> Vec<Finding> {
    let mut out = Vec::new();
    for d in docs {
        match d.get("kind").and_then(Value::as_str) {
            Some("List") => out.extend(lint(d.get("items").and_then(Value::as_array).unwrap_or(&Vec::new()), defaults)),
            Some(kind) => out.extend(workload(kind, d, defaults)),
            None => {}
        }
    }
    out
}

/// The pod template of a workload: (its metadata, its spec).
fn template<'a>(kind: &str, d: &'a Value) -> Option<&'a Value> {
    match kind {
        "Pod" => Some(d),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            d.pointer("/spec/template")
        }
        "CronJob" => d.pointer("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn workload(kind: &str, d: &Value, defaults: &Defaults) -> Option<Finding> {
    let pod = template(kind, d)?;
    let annotations: BTreeMap<String, String> = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    let asks = |key: &str| annotations.get(key).is_some_and(|v| plan::parse_bool(key, v).unwrap_or(false));
    let ours = asks("leasehold.dev/inject");
    let theirs = asks(vault_k8s::INJECT);
    if !ours && !theirs {
        return None;
    }
    let ns = d.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default");
    let name = d.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("(unnamed)");
    let labelled =
        pod.pointer("/metadata/labels").and_then(|l| l.get(OPT_IN_LABEL)).and_then(Value::as_str) == Some("true");
    let planned = if ours {
        plan::from_annotations(&annotations, defaults)
    } else {
        vault_k8s::from_annotations(&annotations, defaults)
    };
    let verdict = match planned {
        Err(e) => Verdict::Denied(e.to_string()),
        Ok(p) => {
            // The patch checks what the annotations alone cannot: the agent
            // config they make, names taken in the pod.
            let as_pod = json!({ "metadata": pod.get("metadata"), "spec": pod.get("spec") });
            match patch::patch(&as_pod, &p, defaults) {
                Err(e) => Verdict::Denied(e.to_string()),
                Ok(_) => {
                    let translated = annotations
                        .keys()
                        .filter(|k| k.starts_with(vault_k8s::PREFIX) || k.starts_with(plan::PREFIX))
                        .filter(|k| !p.ignored.contains(k))
                        .cloned()
                        .collect();
                    Verdict::Injected { translated, ignored: p.warnings }
                }
            }
        }
    };
    Some(Finding { workload: format!("{kind} {ns}/{name}"), verdict, needs_label: !labelled })
}

/// The findings as the command prints them.
pub fn report(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        match &f.verdict {
            Verdict::Injected { translated, ignored } => {
                let _ = writeln!(out, "{}: injected", f.workload);
                for t in translated {
                    let _ = writeln!(out, "  translated  {t}");
                }
                for w in ignored {
                    let _ = writeln!(out, "  ignored     {w}");
                }
            }
            Verdict::Denied(why) => {
                let _ = writeln!(out, "{}: DENIED: {why}", f.workload);
            }
        }
        if f.needs_label {
            let _ = writeln!(
                out,
                "  add label   {OPT_IN_LABEL}: \"true\" to its pod template (the webhook sees only pods that opted in)"
            );
        }
    }
    let denied = findings.iter().filter(|f| matches!(f.verdict, Verdict::Denied(_))).count();
    let _ = writeln!(out, "{} workloads: {} injected, {denied} denied", findings.len(), findings.len() - denied);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(name: &str, annotations: Value, labels: Value) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": name, "namespace": "shop" },
            "spec": { "template": {
                "metadata": { "annotations": annotations, "labels": labels },
                "spec": { "containers": [{ "name": "app", "image": "app:1" }] },
            } },
        })
    }

    #[test]
    fn workloads_are_translated_ignored_or_denied_by_annotation() {
        let ok = deployment(
            "api",
            json!({
                "vault.hashicorp.com/agent-inject": "true",
                "vault.hashicorp.com/role": "app",
                "vault.hashicorp.com/agent-inject-secret-db": "database/creds/app",
                "vault.hashicorp.com/agent-cache-enable": "true",
            }),
            json!({ "leasehold.dev/inject": "true" }),
        );
        let denied = deployment(
            "worker",
            json!({
                "vault.hashicorp.com/agent-inject": "true",
                "vault.hashicorp.com/role": "app",
                "vault.hashicorp.com/agent-inject-secret-db": "database/creds/app",
                "vault.hashicorp.com/tls-skip-verify": "true",
            }),
            json!({}),
        );
        let plain = deployment("web", json!({}), json!({}));
        let list = json!({ "apiVersion": "v1", "kind": "List", "items": [ok, denied, plain] });
        let f = lint(&[list], &crate::plan::tests::defaults());
        assert_eq!(f.len(), 2, "the one not annotated is not listed: {f:?}");
        let Verdict::Injected { translated, ignored } = &f[0].verdict else { panic!("{f:?}") };
        assert!(translated.contains(&"vault.hashicorp.com/agent-inject-secret-db".to_string()), "{translated:?}");
        assert!(ignored[0].starts_with("vault.hashicorp.com/agent-cache-enable is ignored"), "{ignored:?}");
        assert!(!f[0].needs_label);
        assert!(matches!(&f[1].verdict, Verdict::Denied(w) if w.contains("tls-skip-verify")), "{f:?}");
        assert!(f[1].needs_label);
        let text = report(&f);
        assert!(
            text.contains("Deployment shop/worker: DENIED: annotation vault.hashicorp.com/tls-skip-verify"),
            "{text}"
        );
        assert!(text.ends_with("2 workloads: 1 injected, 1 denied\n"), "{text}");
    }
}
