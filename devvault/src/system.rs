//! `sys/*`: health, mounts, auth methods, ACL policies, leases and the
//! devvault test extensions.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::api::{Envelope, Failure, Outcome, Reply};
use crate::core::{Core, Op, Request, TokenEntry};
use crate::database::DbMount;
use crate::expiration;
use crate::kubernetes::KubeMount;
use crate::kv::KvMount;
use crate::pki::PkiMount;
use crate::policy::Policy;
use crate::testext::Fault;

/// The Vault version devvault reports in `sys/health`.
pub const VAULT_VERSION: &str = "1.17.0+devvault";
const CLUSTER_ID: &str = "d3v0a017-0000-4000-8000-000000000000";

pub async fn handle(core: &Arc<Core>, req: &Request, _token: Option<TokenEntry>) -> Outcome {
    let path = req.path.strip_prefix("sys/").unwrap_or(&req.path);
    match path {
        "health" => health(req),
        "mounts" | "mounts/" => list_mounts(core, req, false),
        "auth" | "auth/" => list_mounts(core, req, true),
        p if p.starts_with("mounts/") => mount(core, req, &p["mounts/".len()..], false),
        p if p.starts_with("auth/") => mount(core, req, &p["auth/".len()..], true),
        "policies/acl" | "policies/acl/" | "policy" | "policy/" => list_policies(core, req),
        p if p.starts_with("policies/acl/") => policy(core, req, &p["policies/acl/".len()..], "policy"),
        // The legacy form hvac uses; reads answer with `rules`.
        p if p.starts_with("policy/") => policy(core, req, &p["policy/".len()..], "rules"),
        p if p.starts_with("leases/") => leases(core, req, &p["leases/".len()..]).await,
        p if p.starts_with("devvault/") => devvault(core, req, &p["devvault/".len()..]),
        _ => Err(Failure::unsupported_path()),
    }
}

fn health(req: &Request) -> Outcome {
    if !matches!(req.op, Op::Read | Op::Head) {
        return Err(Failure::unsupported_operation());
    }
    let mut code = 200u16;
    for (k, v) in &req.query {
        if k == "activecode" {
            code = v.parse().map_err(|_| Failure::resp(400, format!("unable to parse activecode code: {v}")))?;
        }
    }
    let now = chrono::Utc::now().timestamp();
    Ok(Reply::Raw(
        code,
        json!({
            "initialized": true,
            "sealed": false,
            "standby": false,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": now,
            "version": VAULT_VERSION,
            "cluster_name": "devvault",
            "cluster_id": CLUSTER_ID,
        }),
    ))
}

fn list_mounts(core: &Arc<Core>, req: &Request, auth: bool) -> Outcome {
    if req.op != Op::Read {
        return Err(Failure::unsupported_operation());
    }
    let state = core.state();
    let mut data = serde_json::Map::new();
    if auth {
        data.insert("token/".into(), json!({"type": "token", "description": "token based credentials"}));
        for m in state.mounts.paths::<KubeMount>() {
            data.insert(format!("{m}/"), json!({"type": "kubernetes", "description": ""}));
        }
    } else {
        data.insert(
            "sys/".into(),
            json!({"type": "system", "description": "system endpoints used for control, policy and debugging"}),
        );
        for m in state.mounts.paths::<DbMount>() {
            data.insert(format!("{m}/"), json!({"type": "database", "description": ""}));
        }
        for m in state.mounts.paths::<KvMount>() {
            data.insert(format!("{m}/"), json!({"type": "kv", "description": "", "options": {"version": "2"}}));
        }
        for m in state.mounts.paths::<PkiMount>() {
            data.insert(format!("{m}/"), json!({"type": "pki", "description": ""}));
        }
    }
    Ok(Reply::Envelope(Envelope::data(Value::Object(data))))
}

fn mount(core: &Arc<Core>, req: &Request, path: &str, auth: bool) -> Outcome {
    let path = path.trim_end_matches('/').to_string();
    if path.is_empty() {
        return Err(Failure::unsupported_path());
    }
    match req.op {
        Op::Update => {
            let f = req.fields();
            let kind = f.str("type")?;
            let mut state = core.state();
            let taken = if auth {
                path == "token" || state.mounts.contains::<KubeMount>(&path)
            } else {
                ["sys", "auth", "cubbyhole", "identity"].contains(&path.as_str())
                    || state.mounts.contains::<DbMount>(&path)
                    || state.mounts.contains::<KvMount>(&path)
                    || state.mounts.contains::<PkiMount>(&path)
            };
            if taken {
                let prefix = if auth { "auth/" } else { "" };
                return Err(Failure::resp(400, format!("path is already in use at {prefix}{path}/")));
            }
            match (auth, kind.as_str()) {
                (true, "kubernetes") => {
                    state.mounts.insert(path, KubeMount::default());
                }
                (false, "database") => {
                    state.mounts.insert(path, DbMount::default());
                }
                (false, "pki") => {
                    state.mounts.insert(path, PkiMount::default());
                }
                (false, "kv-v2") => {
                    state.mounts.insert(path, KvMount::default());
                }
                (false, "kv") => {
                    let version = f
                        .raw("options")
                        .and_then(|o| o.get("version"))
                        .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
                    if version.as_deref() != Some("2") {
                        return Err(Failure::resp(400, "devvault serves KV version 2 only: set options.version to 2"));
                    }
                    state.mounts.insert(path, KvMount::default());
                }
                (_, "") => return Err(Failure::resp(400, "plugin not found in the catalog: ")),
                (_, other) => {
                    return Err(Failure::resp(400, format!("plugin not found in the catalog: {other}")));
                }
            }
            Ok(Reply::Empty)
        }
        Op::Delete => {
            let removed = {
                let mut state = core.state();
                if auth {
                    state.mounts.remove::<KubeMount>(&path).is_some()
                } else {
                    let kv = state.mounts.remove::<KvMount>(&path).is_some();
                    let pki = state.mounts.remove::<PkiMount>(&path).is_some();
                    state.mounts.remove::<DbMount>(&path).is_some() || kv || pki
                }
            };
            if removed && !auth {
                expiration::expire_prefix(core, &format!("{path}/"));
            }
            Ok(Reply::Empty)
        }
        _ => Err(Failure::unsupported_operation()),
    }
}

fn list_policies(core: &Arc<Core>, req: &Request) -> Outcome {
    if !matches!(req.op, Op::List | Op::Read) {
        return Err(Failure::unsupported_operation());
    }
    let mut keys: Vec<String> = core.state().policies.keys().cloned().collect();
    keys.push("root".into());
    keys.sort();
    Ok(Reply::Envelope(Envelope::data(json!({ "keys": keys, "policies": keys }))))
}

fn policy(core: &Arc<Core>, req: &Request, name: &str, text_key: &str) -> Outcome {
    let name = name.to_lowercase();
    match req.op {
        Op::Read => {
            let state = core.state();
            let Some(p) = state.policies.get(&name) else {
                return Err(Failure::not_found());
            };
            let data = json!({
                "name": p.name,
                text_key: p.text,
                "version": p.version,
                "modified": p.modified,
                "cas_required": false,
                "allow_wildcards_in_identity_templates": false,
                "allow_slashes_in_identity_templates": false,
            });
            if text_key == "rules" {
                // The legacy endpoint repeats `data` at the top level.
                let mut body = Envelope::data(data.clone()).to_json();
                if let (Some(top), Value::Object(d)) = (body.as_object_mut(), data) {
                    top.extend(d);
                }
                return Ok(Reply::Raw(200, body));
            }
            Ok(Reply::Envelope(Envelope::data(data)))
        }
        Op::Update => {
            if name == "root" {
                return Err(Failure::resp(400, "cannot update \"root\" policy"));
            }
            let f = req.fields();
            let text = if f.has("policy") { f.str("policy")? } else { f.str("rules")? };
            if text.trim().is_empty() {
                return Err(Failure::resp(400, "'policy' parameter not supplied or empty"));
            }
            let mut parsed =
                Policy::parse(&name, &text).map_err(|e| Failure::resp(400, format!("failed to parse policy: {e}")))?;
            let mut state = core.state();
            parsed.version = state.policies.get(&name).map_or(1, |old| old.version + 1);
            state.policies.insert(name, parsed);
            Ok(Reply::Empty)
        }
        Op::Delete => {
            if name == "root" || name == "default" {
                return Err(Failure::resp(400, format!("cannot delete \"{name}\" policy")));
            }
            core.state().policies.remove(&name);
            Ok(Reply::Empty)
        }
        _ => Err(Failure::unsupported_operation()),
    }
}

async fn leases(core: &Arc<Core>, req: &Request, path: &str) -> Outcome {
    let f = req.fields();
    let (action, suffix) = match path.split_once('/') {
        Some((a, s)) => (a, s),
        None => (path, ""),
    };
    // The body's lease_id wins over the path form.
    let lease_id = match f.str("lease_id")? {
        id if !id.is_empty() => id,
        _ => suffix.to_string(),
    };
    match (action, req.op) {
        ("renew", Op::Update) => {
            let increment = f.duration("increment")?;
            expiration::renew(core, &lease_id, increment).await
        }
        ("revoke", Op::Update) => {
            if lease_id.is_empty() {
                return Err(Failure::resp(400, "lease_id must be specified"));
            }
            if f.bool_or("sync", true)? {
                expiration::revoke_now(core, &lease_id).await.map_err(|e| Failure::resp(400, e))?;
                Ok(Reply::Empty)
            } else {
                expiration::expire_prefix_exact(core, &lease_id);
                Ok(Reply::Accepted)
            }
        }
        // Only the path form exists: without a prefix there is no route (a
        // `prefix` in the body is ignored), so `{}` never revokes everything.
        ("revoke-prefix" | "revoke-force", Op::Update) if suffix.is_empty() => Err(Failure::unsupported_path()),
        ("revoke-prefix" | "revoke-force", Op::Update) => {
            let prefix = suffix.to_string();
            let force = action == "revoke-force";
            for id in expiration::ids_with_prefix(core, &prefix) {
                if let Err(e) = expiration::revoke_now(core, &id).await
                    && !force
                {
                    return Err(Failure::resp(400, e));
                }
                if force {
                    core.state().leases.remove(&id);
                }
            }
            Ok(Reply::Empty)
        }
        ("lookup", Op::Update) => expiration::lookup(core, &lease_id),
        ("lookup", Op::List) => {
            let ids = expiration::ids_with_prefix(core, suffix);
            crate::core::list_children(ids.iter().map(String::as_str), suffix)
        }
        ("renew" | "revoke" | "revoke-prefix" | "revoke-force" | "lookup", _) => Err(Failure::unsupported_operation()),
        _ => Err(Failure::unsupported_path()),
    }
}

fn devvault(core: &Arc<Core>, req: &Request, path: &str) -> Outcome {
    match (path, req.op) {
        ("faults", Op::Update) => {
            let fault: Fault = serde_json::from_value(Value::Object(req.data.clone()))
                .map_err(|e| Failure::resp(400, format!("invalid fault: {e}")))?;
            if fault.status.is_some_and(|s| !(100..=599).contains(&s)) {
                return Err(Failure::resp(400, "invalid fault: status must be 100-599"));
            }
            core.faults.add(fault);
            Ok(Reply::Empty)
        }
        ("faults", Op::Read) => Ok(Reply::Envelope(Envelope::data(json!({ "faults": core.faults.list() })))),
        ("faults", Op::Delete) => {
            core.faults.clear();
            Ok(Reply::Empty)
        }
        ("requests", Op::Read) => Ok(Reply::Envelope(Envelope::data(json!({ "requests": core.log.entries() })))),
        ("requests", Op::Delete) => {
            core.log.clear();
            Ok(Reply::Empty)
        }
        ("faults" | "requests", _) => Err(Failure::unsupported_operation()),
        _ => Err(Failure::unsupported_path()),
    }
}
