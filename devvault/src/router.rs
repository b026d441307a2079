//! The request pipeline Vault runs for every call: authenticate, check the
//! ACL, then route to the engine that owns the path. Above the core and
//! every engine (the core knows none of them; see `core::Mounts`).

use std::sync::Arc;

use chrono::Utc;

use crate::api::{Failure, Outcome};
use crate::core::{Core, Op, Request, State, TokenEntry, under};
use crate::database::DbMount;
use crate::kubernetes::KubeMount;
use crate::kv::KvMount;
use crate::pki::PkiMount;
use crate::policy::{Acl, Capability, Policy};

/// Runs one logical request. Returns the outcome and the accessor of the
/// token used (empty when there was none), for the request log.
pub async fn handle(core: &Arc<Core>, req: Request) -> (Outcome, String) {
    let now = Utc::now();
    if is_unauthenticated(&core.state(), &req.path) {
        return (route(core, req, None).await, String::new());
    }
    let token = {
        let state = core.state();
        req.token.as_ref().and_then(|t| state.tokens.get(t)).filter(|t| t.live(now)).cloned()
    };
    let Some(token) = token else {
        return (Err(Failure::denied()), String::new());
    };
    let accessor = token.accessor.clone();
    if req.path.starts_with("sys/devvault/") && token.id != core.root_token {
        return (Err(Failure::denied()), accessor);
    }
    if !token.is_root() && !acl_allows(core, &token, &req) {
        return (Err(Failure::acl_denied()), accessor);
    }
    (route(core, req, Some(token)).await, accessor)
}

fn acl_allows(core: &Core, token: &TokenEntry, req: &Request) -> bool {
    let state = core.state();
    let policies: Vec<&Policy> = token.policies.iter().filter_map(|p| state.policies.get(p)).collect();
    let acl = Acl::new(policies);
    let cap = match req.op {
        Op::Read | Op::Head => Capability::Read,
        Op::List => Capability::List,
        Op::Delete => Capability::Delete,
        Op::Update => {
            if exists(&state, &req.path) == Some(false) {
                Capability::Create
            } else {
                Capability::Update
            }
        }
    };
    let caps = acl.capabilities(&req.path);
    caps.contains(&cap) && (!needs_sudo(&req.path) || caps.contains(&Capability::Sudo))
}

async fn route(core: &Arc<Core>, req: Request, token: Option<TokenEntry>) -> Outcome {
    let path = req.path.clone();
    if path.starts_with("sys/") {
        return crate::system::handle(core, &req, token).await;
    }
    if let Some(rest) = path.strip_prefix("auth/token/") {
        return crate::token::handle(core, &req, rest, token).await;
    }
    if let Some(rest) = path.strip_prefix("auth/") {
        let mount = core.state().mounts.paths::<KubeMount>().find(|m| under(rest, m)).cloned();
        if let Some(mount) = mount {
            let sub = rest[mount.len()..].trim_start_matches('/').to_string();
            return crate::kubernetes::handle(core, &req, &mount, &sub).await;
        }
        return Err(Failure::no_route(&path));
    }
    let mount = core.state().mounts.paths::<DbMount>().find(|m| under(&path, m)).cloned();
    if let Some(mount) = mount {
        let sub = path[mount.len()..].trim_start_matches('/').to_string();
        return crate::database::handle(core, &req, &mount, &sub, token).await;
    }
    let mount = core.state().mounts.paths::<KvMount>().find(|m| under(&path, m)).cloned();
    if let Some(mount) = mount {
        let sub = path[mount.len()..].trim_start_matches('/').to_string();
        return crate::kv::handle(core, &req, &mount, &sub);
    }
    let mount = core.state().mounts.paths::<PkiMount>().find(|m| under(&path, m)).cloned();
    if let Some(mount) = mount {
        let sub = path[mount.len()..].trim_start_matches('/').to_string();
        return crate::pki::handle(core, &req, &mount, &sub, token);
    }
    Err(Failure::no_route(&path))
}

fn is_unauthenticated(state: &State, path: &str) -> bool {
    if path == "sys/health" {
        return true;
    }
    if let Some(rest) = path.strip_prefix("auth/") {
        return state.mounts.paths::<KubeMount>().any(|m| rest == format!("{m}/login"));
    }
    // PKI serves certificates without a token, as Vault does.
    state.mounts.paths::<PkiMount>().any(|m| path.strip_prefix(&format!("{m}/cert/")).is_some_and(|s| !s.is_empty()))
}

fn needs_sudo(path: &str) -> bool {
    ["sys/auth", "sys/leases/revoke-prefix/", "sys/leases/revoke-force/", "sys/leases/lookup/"]
        .iter()
        .any(|p| path.starts_with(p))
}

/// For paths with an existence check: whether the object exists (Vault then
/// asks for `create` instead of `update` on a write to a new object).
fn exists(state: &State, path: &str) -> Option<bool> {
    if let Some(name) = path.strip_prefix("sys/policies/acl/").or_else(|| path.strip_prefix("sys/policy/")) {
        return Some(state.policies.contains_key(name));
    }
    for (mount, db) in state.mounts.iter::<DbMount>() {
        if let Some(rest) = path.strip_prefix(&format!("{mount}/")) {
            if let Some(name) = rest.strip_prefix("roles/") {
                return Some(db.roles.contains_key(name));
            }
            if let Some(name) = rest.strip_prefix("config/") {
                return Some(db.connections.contains_key(name));
            }
        }
    }
    for (mount, pki) in state.mounts.iter::<PkiMount>() {
        if let Some(name) = path.strip_prefix(&format!("{mount}/roles/")) {
            return Some(pki.has_role(name));
        }
    }
    for (mount, kube) in state.mounts.iter::<KubeMount>() {
        if let Some(name) = path.strip_prefix(&format!("auth/{mount}/role/")) {
            return Some(kube.roles.contains_key(name));
        }
    }
    None
}
