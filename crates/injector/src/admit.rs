//! One `admission.k8s.io/v1` AdmissionReview: allow untouched, allow with
//! the agent's patch, or deny naming the annotation that is wrong.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Value, json};

use super::patch::{already_injected, patch};
use super::plan::{self, Defaults};
use super::vault_k8s;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped,
    Denied,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::Denied => "denied",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub defaults: Defaults,
    /// Translate `vault.hashicorp.com/*` annotations too.
    pub vault_k8s_compat: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview: {0}")]
    Malformed(&'static str),
}

/// What the webhook decided, and for whom.
pub struct Decision {
    pub outcome: Outcome,
    pub namespace: String,
    /// Why it was denied or skipped.
    pub reason: String,
    pub response: Value,
}

/// Namespaces whose pods are never touched: the control plane's.
const EXEMPT: [&str; 2] = ["kube-system", "kube-public"];

pub fn review(body: &Value, s: &Settings) -> Result<Decision, ReviewError> {
    let req = body.get("request").ok_or(ReviewError::Malformed("no `request`"))?;
    let uid = req.get("uid").and_then(Value::as_str).ok_or(ReviewError::Malformed("no `request.uid`"))?;
    let namespace = req.get("namespace").and_then(Value::as_str).unwrap_or_default().to_string();
    let answer = |outcome: Outcome, reason: String, response: Value| Decision {
        outcome,
        namespace: namespace.clone(),
        reason,
        response,
    };
    let allow = json!({ "uid": uid, "allowed": true });
    let is_pod = req.pointer("/kind/kind").and_then(Value::as_str) == Some("Pod");
    let Some(pod) = req.get("object").filter(|o| o.is_object() && is_pod) else {
        return Ok(answer(Outcome::Skipped, "not a pod".into(), wrap(allow)));
    };
    if EXEMPT.contains(&namespace.as_str()) {
        return Ok(answer(Outcome::Skipped, format!("namespace {namespace} is exempt"), wrap(allow)));
    }
    let annotations: BTreeMap<String, String> = match pod.pointer("/metadata/annotations") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(a) => match serde_json::from_value(a.clone()) {
            Ok(m) => m,
            Err(_) => return Err(ReviewError::Malformed("metadata.annotations is not a map of strings")),
        },
    };
    let deny = |message: String| {
        let response = json!({ "uid": uid, "allowed": false, "status": { "code": 400, "message": message } });
        answer(Outcome::Denied, message, wrap(response))
    };
    let ours = match annotations.get("leasehold.dev/inject").map(|v| plan::parse_bool("leasehold.dev/inject", v)) {
        Some(Ok(b)) => b,
        Some(Err(e)) => return Ok(deny(e.to_string())),
        None => false,
    };
    let theirs = s.vault_k8s_compat
        && match annotations.get(vault_k8s::INJECT).map(|v| plan::parse_bool(vault_k8s::INJECT, v)) {
            Some(Ok(b)) => b,
            Some(Err(e)) => return Ok(deny(e.to_string())),
            None => false,
        };
    if !ours && !theirs {
        return Ok(answer(Outcome::Skipped, "not annotated for injection".into(), wrap(allow)));
    }
    if ours && theirs {
        return Ok(deny(format!("both leasehold.dev/inject and {} ask for injection: keep one", vault_k8s::INJECT)));
    }
    let vault_k8s_done = annotations.get(vault_k8s::STATUS).is_some_and(|v| v == "injected");
    if already_injected(pod) || (theirs && vault_k8s_done) {
        return Ok(answer(Outcome::Skipped, "already injected".into(), wrap(allow)));
    }
    let planned = if ours {
        plan::from_annotations(&annotations, &s.defaults)
    } else {
        vault_k8s::from_annotations(&annotations, &s.defaults)
    };
    let planned = match planned {
        Ok(p) => p,
        Err(e) => return Ok(deny(e.to_string())),
    };
    let ops = match patch(pod, &planned, &s.defaults) {
        Ok(ops) => ops,
        Err(e) => return Ok(deny(e.to_string())),
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(Value::Array(ops).to_string());
    let mut response = json!({ "uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": encoded });
    // Shown by kubectl and in the API server's audit: what was not honoured.
    if !planned.warnings.is_empty() {
        response["warnings"] = json!(planned.warnings);
    }
    Ok(answer(Outcome::Injected, String::new(), wrap(response)))
}

fn wrap(response: Value) -> Value {
    json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response })
}
