//! The server's state and the request pipeline Vault runs for every call:
//! authenticate, check the ACL, then route to the mount that owns the path.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::api::{Failure, Outcome, Reply};
use crate::database::DbMount;
use crate::fields::Fields;
use crate::kubernetes::KubeMount;
use crate::kv::KvMount;
use crate::pki::PkiMount;
use crate::policy::{Acl, Capability, DEFAULT_POLICY, Policy};
use crate::testext::{Faults, RequestLog};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    List,
    Update,
    Delete,
    Head,
}

/// A request after HTTP decoding: Vault's "logical" request.
pub struct Request {
    pub op: Op,
    /// Path without `/v1/` and without the query string; list ops end in `/`.
    pub path: String,
    pub data: Map<String, Value>,
    pub query: Vec<(String, String)>,
    pub token: Option<String>,
}

impl Request {
    pub fn fields(&self) -> Fields {
        Fields::new(self.data.clone())
    }
}

/// Who issued a token, which decides how it renews.
#[derive(Debug, Clone)]
pub enum TokenSource {
    Root,
    Create,
    Kubernetes { mount: String, role: String },
}

#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub id: String,
    pub accessor: String,
    pub policies: Vec<String>,
    pub path: String,
    pub display_name: String,
    pub meta: BTreeMap<String, String>,
    pub creation_time: DateTime<Utc>,
    pub creation_ttl: i64,
    pub expire_time: Option<DateTime<Utc>>,
    pub explicit_max_ttl: i64,
    pub period: i64,
    pub renewable: bool,
    pub orphan: bool,
    pub parent: Option<String>,
    pub entity_id: String,
    pub source: TokenSource,
    pub last_renewal: Option<DateTime<Utc>>,
    pub lease_id: String,
}

impl TokenEntry {
    pub fn is_root(&self) -> bool {
        self.policies.iter().any(|p| p == "root")
    }

    pub fn live(&self, now: DateTime<Utc>) -> bool {
        self.expire_time.is_none_or(|t| t > now)
    }
}

/// What revoking a lease undoes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseKind {
    /// A database user (`db_name`, `username`, `revocation_statements`).
    Database,
    /// A certificate, marked revoked.
    Pki { serial: String },
}

#[derive(Debug, Clone)]
pub struct LeaseEntry {
    pub id: String,
    pub mount: String,
    pub role: String,
    pub db_name: String,
    pub username: String,
    pub revocation_statements: Vec<String>,
    pub kind: LeaseKind,
    pub issue_time: DateTime<Utc>,
    pub expire_time: DateTime<Utc>,
    pub last_renewal: Option<DateTime<Utc>>,
    pub renewable: bool,
    /// The token that created the lease; its revocation revokes the lease.
    pub token: Option<String>,
    pub revoking: bool,
    pub attempts: u32,
    pub next_attempt: Option<DateTime<Utc>>,
    pub irrevocable: Option<String>,
}

#[derive(Default)]
pub struct State {
    pub tokens: HashMap<String, TokenEntry>,
    pub leases: BTreeMap<String, LeaseEntry>,
    pub policies: BTreeMap<String, Policy>,
    pub auth_mounts: BTreeMap<String, KubeMount>,
    pub secret_mounts: BTreeMap<String, DbMount>,
    pub kv_mounts: BTreeMap<String, KvMount>,
    pub pki_mounts: BTreeMap<String, PkiMount>,
}

pub struct Core {
    pub root_token: String,
    state: Mutex<State>,
    pub expiry_wake: Notify,
    pub log: RequestLog,
    pub faults: Faults,
    pub lease_locks: crate::expiration::LeaseLocks,
    /// Proxy mode: requests outside `sys/devvault/` go to this server.
    pub upstream: Option<crate::proxy::Upstream>,
}

impl Core {
    pub fn new(root_token: &str, upstream: Option<crate::proxy::Upstream>) -> Arc<Core> {
        let mut state = State::default();
        if let Ok(p) = Policy::parse("default", DEFAULT_POLICY) {
            state.policies.insert("default".into(), p);
        }
        let now = Utc::now();
        state.tokens.insert(
            root_token.to_string(),
            TokenEntry {
                id: root_token.to_string(),
                accessor: crate::ids::base62(24),
                policies: vec!["root".into()],
                path: "auth/token/root".into(),
                display_name: "root".into(),
                meta: BTreeMap::new(),
                creation_time: now,
                creation_ttl: 0,
                expire_time: None,
                explicit_max_ttl: 0,
                period: 0,
                renewable: false,
                orphan: true,
                parent: None,
                entity_id: String::new(),
                source: TokenSource::Root,
                last_renewal: None,
                lease_id: String::new(),
            },
        );
        Arc::new(Core {
            root_token: root_token.to_string(),
            state: Mutex::new(state),
            expiry_wake: Notify::new(),
            log: RequestLog::default(),
            faults: Faults::default(),
            lease_locks: Default::default(),
            upstream,
        })
    }

    /// The state lock. Never held across an await: database calls run
    /// between two short critical sections.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs one logical request. Returns the outcome and the accessor of the
    /// token used (empty when there was none), for the request log.
    pub async fn handle(self: &Arc<Self>, req: Request) -> (Outcome, String) {
        let now = Utc::now();
        if is_unauthenticated(&self.state(), &req.path) {
            return (self.route(req, None).await, String::new());
        }
        let token = {
            let state = self.state();
            req.token.as_ref().and_then(|t| state.tokens.get(t)).filter(|t| t.live(now)).cloned()
        };
        let Some(token) = token else {
            return (Err(Failure::denied()), String::new());
        };
        let accessor = token.accessor.clone();
        if req.path.starts_with("sys/devvault/") && token.id != self.root_token {
            return (Err(Failure::denied()), accessor);
        }
        if !token.is_root() && !self.acl_allows(&token, &req) {
            return (Err(Failure::acl_denied()), accessor);
        }
        (self.route(req, Some(token)).await, accessor)
    }

    fn acl_allows(&self, token: &TokenEntry, req: &Request) -> bool {
        let state = self.state();
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

    async fn route(self: &Arc<Self>, req: Request, token: Option<TokenEntry>) -> Outcome {
        let path = req.path.clone();
        if path.starts_with("sys/") {
            return crate::system::handle(self, &req, token).await;
        }
        if let Some(rest) = path.strip_prefix("auth/token/") {
            return crate::token::handle(self, &req, rest, token).await;
        }
        if let Some(rest) = path.strip_prefix("auth/") {
            let mount = self.state().auth_mounts.keys().find(|m| under(rest, m)).cloned();
            if let Some(mount) = mount {
                let sub = rest[mount.len()..].trim_start_matches('/').to_string();
                return crate::kubernetes::handle(self, &req, &mount, &sub).await;
            }
            return Err(Failure::no_route(&path));
        }
        let mount = self.state().secret_mounts.keys().find(|m| under(&path, m)).cloned();
        if let Some(mount) = mount {
            let sub = path[mount.len()..].trim_start_matches('/').to_string();
            return crate::database::handle(self, &req, &mount, &sub, token).await;
        }
        let mount = self.state().kv_mounts.keys().find(|m| under(&path, m)).cloned();
        if let Some(mount) = mount {
            let sub = path[mount.len()..].trim_start_matches('/').to_string();
            return crate::kv::handle(self, &req, &mount, &sub);
        }
        let mount = self.state().pki_mounts.keys().find(|m| under(&path, m)).cloned();
        if let Some(mount) = mount {
            let sub = path[mount.len()..].trim_start_matches('/').to_string();
            return crate::pki::handle(self, &req, &mount, &sub, token);
        }
        Err(Failure::no_route(&path))
    }

    /// Attaches Vault's warning about parameters the endpoint ignored; Vault
    /// adds it only when the handler returned a body.
    pub fn with_ignored(reply: Reply, fields: &Fields, known: &[&str]) -> Reply {
        let unknown = fields.unknown(known);
        match reply {
            Reply::Envelope(mut env) if !unknown.is_empty() => {
                env.warnings.push(format!("Endpoint ignored these unrecognized parameters: [{}]", unknown.join(" ")));
                Reply::Envelope(env)
            }
            other => other,
        }
    }
}

/// A LIST answer: the entries directly below `prefix` among `paths` (sorted),
/// deeper ones as `dir/`; 404 when there is none, as in Vault.
pub fn list_children<'a>(paths: impl IntoIterator<Item = &'a str>, prefix: &str) -> Outcome {
    let mut keys: Vec<String> = paths
        .into_iter()
        .filter_map(|p| p.strip_prefix(prefix))
        .map(|rest| match rest.find('/') {
            Some(i) => rest[..=i].to_string(),
            None => rest.to_string(),
        })
        .collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return Err(Failure::not_found());
    }
    Ok(Reply::Envelope(crate::api::Envelope::data(serde_json::json!({ "keys": keys }))))
}

/// `path` is `mount` or lies below it.
pub fn under(path: &str, mount: &str) -> bool {
    path == mount || path.starts_with(&format!("{mount}/"))
}

fn is_unauthenticated(state: &State, path: &str) -> bool {
    if path == "sys/health" {
        return true;
    }
    if let Some(rest) = path.strip_prefix("auth/") {
        return state.auth_mounts.keys().any(|m| rest == format!("{m}/login"));
    }
    // PKI serves certificates without a token, as Vault does.
    state.pki_mounts.keys().any(|m| path.strip_prefix(&format!("{m}/cert/")).is_some_and(|s| !s.is_empty()))
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
    for (mount, db) in &state.secret_mounts {
        if let Some(rest) = path.strip_prefix(&format!("{mount}/")) {
            if let Some(name) = rest.strip_prefix("roles/") {
                return Some(db.roles.contains_key(name));
            }
            if let Some(name) = rest.strip_prefix("config/") {
                return Some(db.connections.contains_key(name));
            }
        }
    }
    for (mount, pki) in &state.pki_mounts {
        if let Some(name) = path.strip_prefix(&format!("{mount}/roles/")) {
            return Some(pki.has_role(name));
        }
    }
    for (mount, kube) in &state.auth_mounts {
        if let Some(name) = path.strip_prefix(&format!("auth/{mount}/role/")) {
            return Some(kube.roles.contains_key(name));
        }
    }
    None
}
