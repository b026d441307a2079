//! The server's state and the request pipeline Vault runs for every call:
//! authenticate, check the ACL, then route to the mount that owns the path.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::api::{Failure, Outcome, Reply};
use crate::fields::Fields;
use crate::policy::{DEFAULT_POLICY, Policy};
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
    /// A login: at each renewal, `limits` reads the role's limits as they
    /// are then (Vault re-reads the role; a deleted role fails the renewal).
    /// A function of the auth engine's, so the token store needs no import
    /// of it.
    Kubernetes {
        mount: String,
        role: String,
        limits: RoleLimits,
    },
}

/// The auth engine's reader of a role's token limits.
pub type RoleLimits = fn(&State, mount: &str, role: &str) -> Option<TokenLimits>;

/// A role's token limits, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct TokenLimits {
    pub ttl: i64,
    pub max_ttl: i64,
    pub period: i64,
    pub explicit_max_ttl: i64,
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
    /// Every engine's mounts, by engine and path.
    pub mounts: Mounts,
}

/// The mounts of every engine, each engine's by path. The core keeps them
/// without knowing their types (each engine knows its own), so it imports
/// no engine: the engines and the router (`router.rs`) sit above it.
#[derive(Default)]
pub struct Mounts(HashMap<TypeId, Box<dyn Any + Send>>);

impl Mounts {
    fn table<T: Any + Send>(&self) -> Option<&BTreeMap<String, T>> {
        self.0.get(&TypeId::of::<T>()).and_then(|t| t.downcast_ref())
    }

    fn table_mut<T: Any + Send>(&mut self) -> &mut BTreeMap<String, T> {
        self.0
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(BTreeMap::<String, T>::new()))
            .downcast_mut()
            .expect("each table is stored under its own type's id")
    }

    pub fn get<T: Any + Send>(&self, path: &str) -> Option<&T> {
        self.table().and_then(|t| t.get(path))
    }

    pub fn get_mut<T: Any + Send>(&mut self, path: &str) -> Option<&mut T> {
        self.table_mut().get_mut(path)
    }

    pub fn contains<T: Any + Send>(&self, path: &str) -> bool {
        self.get::<T>(path).is_some()
    }

    /// The mounts of engine `T` with their paths, in path order.
    pub fn iter<T: Any + Send>(&self) -> impl Iterator<Item = (&String, &T)> {
        self.table::<T>().into_iter().flatten()
    }

    pub fn paths<T: Any + Send>(&self) -> impl Iterator<Item = &String> {
        self.iter::<T>().map(|(p, _)| p)
    }

    pub fn insert<T: Any + Send>(&mut self, path: String, mount: T) {
        self.table_mut().insert(path, mount);
    }

    pub fn remove<T: Any + Send>(&mut self, path: &str) -> Option<T> {
        self.table_mut().remove(path)
    }
}

/// Per-lease locks, as Vault's expiration manager holds them: a revocation
/// requested while the expiry job is revoking the same lease waits for it,
/// then finds the lease gone and succeeds, instead of running the
/// revocation statements a second time against a dropped user.
#[derive(Default)]
pub struct LeaseLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl LeaseLocks {
    pub async fn lock(&self, lease_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.map().entry(lease_id.to_string()).or_default().clone();
        lock.lock_owned().await
    }

    /// Forgets the lock once the lease is gone (revoked, or never known:
    /// revoking an unknown id succeeds), so the map does not grow.
    pub fn forget_if_gone(&self, core: &Core, lease_id: &str) {
        if !core.state().leases.contains_key(lease_id) {
            self.map().remove(lease_id);
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Core {
    pub root_token: String,
    state: Mutex<State>,
    pub expiry_wake: Notify,
    pub log: RequestLog,
    pub faults: Faults,
    pub lease_locks: LeaseLocks,
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
