//! The JSONPatch (RFC 6902) that adds the agent to a pod: volumes, the
//! agent container(s), the credentials mount in the app containers, the
//! `leasehold.dev/status: injected` mark.

use serde_json::{Value, json};

use super::plan::{Defaults, Mode, Plan, STATE_DIR, TOKEN_DIR, agent_config};

pub const AGENT: &str = "leasehold";
pub const AGENT_INIT: &str = "leasehold-init";
pub const CREDENTIALS: &str = "leasehold-credentials";
pub const STATE: &str = "leasehold-state";
pub const TOKEN: &str = "leasehold-token";
pub const CONFIG_ENV: &str = "LEASEHOLD_CONFIG";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("the pod already has a volume or container named {0:?}")]
    Taken(String),
    #[error("spec.shareProcessNamespace is false, but leasehold.dev/on-change-signal needs it")]
    NoSharedPids,
    /// The annotations passed their own checks but make a config the
    /// agent would refuse (exit 78 in the pod): deny it now instead.
    #[error("the agent config made from the annotations is invalid: {0}")]
    Config(String),
}

fn list<'a>(pod: &'a Value, ptr: &str) -> &'a [Value] {
    pod.pointer(ptr).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
}

fn has_name(items: &[Value], name: &str) -> bool {
    items.iter().any(|i| i.get("name").and_then(Value::as_str) == Some(name))
}

/// Whether the pod already has the agent (a second admission, or a pod
/// made from an injected pod's spec).
pub fn already_injected(pod: &Value) -> bool {
    let annotated =
        pod.pointer("/metadata/annotations/leasehold.dev~1status").and_then(Value::as_str) == Some("injected");
    annotated || has_name(list(pod, "/spec/initContainers"), AGENT) || has_name(list(pod, "/spec/containers"), AGENT)
}

struct Ops(Vec<Value>);

impl Ops {
    fn add(&mut self, path: String, value: Value) {
        self.0.push(json!({ "op": "add", "path": path, "value": value }));
    }

    /// Appends to the array at `ptr`, creating it when the pod has none.
    fn append(&mut self, pod: &Value, ptr: &str, items: Vec<Value>) {
        if pod.pointer(ptr).is_some_and(Value::is_array) {
            for i in items {
                self.add(format!("{ptr}/-"), i);
            }
        } else {
            self.add(ptr.to_string(), Value::Array(items));
        }
    }
}

/// Where vault-k8s's `tls-secret` is mounted in the agent containers.
pub const TLS_DIR: &str = "/vault/tls";
pub const TLS: &str = "leasehold-vault-tls";

fn security_context(plan: &Plan) -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": plan.run_as_user.unwrap_or(65532),
        "runAsGroup": plan.run_as_group.unwrap_or(65532),
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

/// The agent's resources: small defaults, what the annotations set over them.
fn resources(plan: &Plan) -> Value {
    let mut r = json!({
        "requests": { "cpu": "5m", "memory": "8Mi" },
        "limits": { "memory": "32Mi" },
    });
    for ((kind, what), q) in &plan.resources {
        r[kind.as_str()][what.as_str()] = json!(q);
    }
    r
}

fn agent_container(name: &str, once: bool, plan: &Plan, d: &Defaults, config: &str) -> Value {
    let mut args = vec!["agent", "-c", "env:LEASEHOLD_CONFIG"];
    if once {
        args.push("--once");
    }
    let mut c = json!({
        "name": name,
        "image": d.image,
        "args": args,
        "env": [
            { "name": CONFIG_ENV, "value": config },
            // The proxy names the pod in application_name (proxy.attribution).
            { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
            { "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
        ],
        "resources": resources(plan),
        "securityContext": security_context(plan),
        "volumeMounts": [
            { "name": CREDENTIALS, "mountPath": plan.mount_path },
            { "name": STATE, "mountPath": STATE_DIR },
            { "name": TOKEN, "mountPath": TOKEN_DIR, "readOnly": true },
        ],
    });
    if plan.tls_secret.is_some()
        && let Some(mounts) = c["volumeMounts"].as_array_mut()
    {
        mounts.push(json!({ "name": TLS, "mountPath": TLS_DIR, "readOnly": true }));
    }
    if !once {
        c["ports"] = json!([{ "name": "lh-telemetry", "containerPort": d.telemetry_port, "protocol": "TCP" }]);
        c["startupProbe"] = json!({
            "httpGet": { "path": "/readyz", "port": d.telemetry_port },
            "periodSeconds": 1,
            "failureThreshold": 300,
        });
        c["livenessProbe"] = json!({
            "httpGet": { "path": "/healthz", "port": d.telemetry_port },
            "periodSeconds": 10,
            "failureThreshold": 3,
        });
    }
    if plan.mode == Mode::Native && !once {
        c["restartPolicy"] = json!("Always");
    }
    c
}

/// The patch for `pod` (an admission request's `object`).
pub fn patch(pod: &Value, plan: &Plan, d: &Defaults) -> Result<Vec<Value>, PatchError> {
    let volumes = list(pod, "/spec/volumes");
    let inits = list(pod, "/spec/initContainers");
    let containers = list(pod, "/spec/containers");
    for n in [CREDENTIALS, STATE, TOKEN, TLS] {
        if has_name(volumes, n) {
            return Err(PatchError::Taken(n.into()));
        }
    }
    for n in [AGENT, AGENT_INIT] {
        if has_name(inits, n) || has_name(containers, n) {
            return Err(PatchError::Taken(n.into()));
        }
    }
    let share = pod.pointer("/spec/shareProcessNamespace").and_then(Value::as_bool);
    if plan.on_change_signal.is_some() && share == Some(false) {
        return Err(PatchError::NoSharedPids);
    }
    let fs_group = pod.pointer("/spec/securityContext/fsGroup").is_some_and(Value::is_number);
    let config = agent_config(plan, d, fs_group).to_string();
    // Parsed as the agent will parse it (the pod's VAULT_* are not known here).
    config::Config::parse(&config, std::path::Path::new(CONFIG_ENV), &|_| None)
        .map_err(|e| PatchError::Config(e.to_string()))?;

    let mut ops = Ops(Vec::new());
    let mut projected = json!({ "path": "token", "expirationSeconds": 3600 });
    if let Some(aud) = &d.token_audience {
        projected["audience"] = json!(aud);
    }
    ops.append(
        pod,
        "/spec/volumes",
        vec![
            // In memory: credentials never touch the node's disk.
            json!({ "name": CREDENTIALS, "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } }),
            json!({ "name": STATE, "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } }),
            json!({ "name": TOKEN, "projected": { "sources": [{ "serviceAccountToken": projected }] } }),
        ]
        .into_iter()
        .chain(plan.tls_secret.iter().map(|s| json!({ "name": TLS, "secret": { "secretName": s } })))
        .collect(),
    );
    // Read-only, as a directory (never subPath, which hides every update).
    let mount = json!({ "name": CREDENTIALS, "mountPath": plan.mount_path, "readOnly": true });
    for (i, c) in containers.iter().enumerate() {
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        if plan.containers.as_ref().is_none_or(|only| only.iter().any(|n| n == name)) {
            ops.append(pod, &format!("/spec/containers/{i}/volumeMounts"), vec![mount.clone()]);
        }
    }
    // Init containers that run after the agent is up can read the files too.
    if plan.init_first {
        for i in 0..inits.len() {
            ops.append(pod, &format!("/spec/initContainers/{i}/volumeMounts"), vec![mount.clone()]);
        }
    }
    let first = match plan.mode {
        Mode::Native => agent_container(AGENT, false, plan, d, &config),
        Mode::Legacy | Mode::InitOnly => agent_container(AGENT_INIT, true, plan, d, &config),
    };
    if inits.is_empty() {
        ops.add("/spec/initContainers".into(), json!([first]));
    } else if plan.init_first {
        ops.add("/spec/initContainers/0".into(), first);
    } else {
        ops.add("/spec/initContainers/-".into(), first);
    }
    if plan.mode == Mode::Legacy {
        ops.add("/spec/containers/-".into(), agent_container(AGENT, false, plan, d, &config));
    }
    if plan.on_change_signal.is_some() && share.is_none() {
        ops.add("/spec/shareProcessNamespace".into(), json!(true));
    }
    if pod.pointer("/metadata/annotations").is_some_and(Value::is_object) {
        ops.add("/metadata/annotations/leasehold.dev~1status".into(), json!("injected"));
    } else {
        ops.add("/metadata/annotations".into(), json!({ "leasehold.dev/status": "injected" }));
    }
    Ok(ops.0)
}
