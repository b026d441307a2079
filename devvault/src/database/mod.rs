//! The database secrets engine: connections, roles, `creds/<role>`,
//! `rotate-root/<name>`, and the renew/revoke hooks the expiration manager
//! calls (vault-api.md §4).

mod memory;
mod postgres;
pub mod sql;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde_json::json;

use crate::api::{Envelope, Failure, Outcome, Reply};
use crate::core::{Core, LeaseEntry, LeaseKind, Op, Request, State, TokenEntry};
use crate::ttl::{self, TtlInput, TtlResult};
pub use memory::MemPlugin;
use postgres::PgPlugin;

/// Vault sets `VALID UNTIL` this far past the lease's end.
pub const EXPIRATION_BUFFER_SECS: i64 = 5;

#[derive(Clone)]
pub enum Plugin {
    Postgres(Arc<PgPlugin>),
    Memory(Arc<MemPlugin>),
}

impl Plugin {
    async fn new_user(&self, stmts: &[String], user: &str, password: &str, exp: DateTime<Utc>) -> Result<(), String> {
        let exp = sql::expiration_text(exp);
        match self {
            Plugin::Postgres(p) => p.new_user(stmts, user, password, &exp).await,
            Plugin::Memory(m) => {
                if stmts.iter().all(|s| s.trim().is_empty()) {
                    return Err("empty creation statements".into());
                }
                m.new_user(user, &exp)
            }
        }
    }

    pub async fn update_expiration(&self, user: &str, exp: DateTime<Utc>, stmts: &[String]) -> Result<(), String> {
        let exp = sql::expiration_text(exp);
        match self {
            Plugin::Postgres(p) => p.update_expiration(user, &exp, stmts).await,
            Plugin::Memory(m) => m.update_expiration(user, &exp),
        }
    }

    async fn delete_user(&self, user: &str, stmts: &[String]) -> Result<(), String> {
        match self {
            Plugin::Postgres(p) => p.delete_user(user, stmts).await,
            Plugin::Memory(m) => {
                m.delete_user(user);
                Ok(())
            }
        }
    }

    async fn verify(&self) -> Result<(), String> {
        match self {
            Plugin::Postgres(p) => p.verify().await,
            Plugin::Memory(_) => Ok(()),
        }
    }
}

pub struct DbConnection {
    pub plugin_name: String,
    pub plugin_version: String,
    pub allowed_roles: Vec<String>,
    pub root_rotation_statements: Vec<String>,
    pub password_policy: String,
    pub connection_url: String,
    pub username: String,
    pub password: String,
    pub username_template: String,
    pub disable_escaping: bool,
    pub plugin: Plugin,
}

#[derive(Clone, Default)]
pub struct DbRole {
    pub db_name: String,
    pub creation_statements: Vec<String>,
    pub revocation_statements: Vec<String>,
    pub rollback_statements: Vec<String>,
    pub renew_statements: Vec<String>,
    pub default_ttl: i64,
    pub max_ttl: i64,
    pub credential_type: String,
}

#[derive(Default)]
pub struct DbMount {
    pub connections: BTreeMap<String, DbConnection>,
    pub roles: BTreeMap<String, DbRole>,
}

pub async fn handle(core: &Arc<Core>, req: &Request, mount: &str, sub: &str, token: Option<TokenEntry>) -> Outcome {
    let (kind, name) = match sub.split_once('/') {
        Some((k, n)) => (k, n.trim_end_matches('/')),
        None => (sub, ""),
    };
    match (kind, name, req.op) {
        ("config", "", Op::List) => list(core, mount, |m| m.connections.keys().cloned().collect()),
        ("roles", "", Op::List) => list(core, mount, |m| m.roles.keys().cloned().collect()),
        ("config", n, Op::Update) if !n.is_empty() => write_config(core, req, mount, n).await,
        ("config", n, Op::Read) if !n.is_empty() => read_config(core, mount, n),
        ("config", n, Op::Delete) if !n.is_empty() => {
            with_mount(core, mount, |m| m.connections.remove(n));
            Ok(Reply::Empty)
        }
        ("roles", n, Op::Update) if !n.is_empty() => write_role(core, req, mount, n),
        ("roles", n, Op::Read) if !n.is_empty() => read_role(core, mount, n),
        ("roles", n, Op::Delete) if !n.is_empty() => {
            with_mount(core, mount, |m| m.roles.remove(n));
            Ok(Reply::Empty)
        }
        ("creds", n, Op::Read) if !n.is_empty() => creds(core, mount, n, token).await,
        ("rotate-root", n, Op::Update) if !n.is_empty() => rotate_root(core, mount, n).await,
        ("config" | "roles" | "creds" | "rotate-root", n, _) if !n.is_empty() => Err(Failure::unsupported_operation()),
        _ => Err(Failure::unsupported_path()),
    }
}

fn with_mount<T>(core: &Arc<Core>, mount: &str, f: impl FnOnce(&mut DbMount) -> T) -> Option<T> {
    core.state().mounts.get_mut::<DbMount>(mount).map(f)
}

fn list(core: &Arc<Core>, mount: &str, keys: impl FnOnce(&mut DbMount) -> Vec<String>) -> Outcome {
    let keys = with_mount(core, mount, keys).unwrap_or_default();
    if keys.is_empty() {
        return Err(Failure::not_found());
    }
    Ok(Reply::Envelope(Envelope::data(json!({ "keys": keys }))))
}

const CONFIG_FIELDS: &[&str] = &[
    "plugin_name",
    "plugin_version",
    "verify_connection",
    "allowed_roles",
    "root_rotation_statements",
    "password_policy",
    "connection_url",
    "username",
    "password",
    "max_open_connections",
    "max_idle_connections",
    "max_connection_lifetime",
    "username_template",
    "disable_escaping",
    "password_authentication",
];

async fn write_config(core: &Arc<Core>, req: &Request, mount: &str, name: &str) -> Outcome {
    let f = req.fields();
    // Fields not given keep their stored value on update, as in Vault.
    let old = with_mount(core, mount, |m| {
        m.connections.get(name).map(|c| {
            (
                c.plugin_name.clone(),
                c.allowed_roles.clone(),
                c.connection_url.clone(),
                c.username.clone(),
                c.password.clone(),
                c.root_rotation_statements.clone(),
                c.username_template.clone(),
            )
        })
    })
    .flatten();
    let pick = |key: &str, old: Option<String>| -> Result<String, Failure> {
        if f.has(key) { f.str(key) } else { Ok(old.unwrap_or_default()) }
    };
    let plugin_name = pick("plugin_name", old.as_ref().map(|o| o.0.clone()))?;
    if plugin_name.is_empty() {
        return Err(Failure::resp(400, "empty plugin name"));
    }
    let allowed_roles = match f.list("allowed_roles")? {
        Some(l) => l,
        None => old.as_ref().map(|o| o.1.clone()).unwrap_or_default(),
    };
    let connection_url = pick("connection_url", old.as_ref().map(|o| o.2.clone()))?;
    let username = pick("username", old.as_ref().map(|o| o.3.clone()))?;
    let password = pick("password", old.as_ref().map(|o| o.4.clone()))?;
    let root_rotation_statements = match f.statements("root_rotation_statements")? {
        Some(l) => l,
        None => old.as_ref().map(|o| o.5.clone()).unwrap_or_default(),
    };
    let username_template = pick("username_template", old.as_ref().map(|o| o.6.clone()))?;
    let verify_connection = f.bool_or("verify_connection", true)?;
    let disable_escaping = f.bool_or("disable_escaping", false)?;
    let plugin = match plugin_name.as_str() {
        "postgresql-database-plugin" => Plugin::Postgres(Arc::new(
            PgPlugin::new(&connection_url, &username, &password, disable_escaping)
                .map_err(|e| Failure::resp(400, format!("error creating database object: {e}")))?,
        )),
        "memory-database-plugin" => Plugin::Memory(Arc::new(MemPlugin::default())),
        other => {
            return Err(Failure::resp(
                400,
                format!(
                    "error creating database object: invalid database version: 2 errors occurred:\n\t* plugin not found in the catalog: {other}\n\t* plugin not found in the catalog: {other}\n\n"
                ),
            ));
        }
    };
    if verify_connection {
        plugin.verify().await.map_err(|e| {
            Failure::resp(400, format!("error creating database object: error verifying connection: {e}"))
        })?;
    }
    let conn = DbConnection {
        plugin_name,
        plugin_version: f.str("plugin_version")?,
        allowed_roles,
        root_rotation_statements,
        password_policy: f.str("password_policy")?,
        connection_url,
        username,
        password,
        username_template,
        disable_escaping,
        plugin,
    };
    with_mount(core, mount, |m| m.connections.insert(name.to_string(), conn));
    Ok(Core::with_ignored(Reply::Empty, &f, CONFIG_FIELDS))
}

fn read_config(core: &Arc<Core>, mount: &str, name: &str) -> Outcome {
    let data = with_mount(core, mount, |m| {
        m.connections.get(name).map(|c| {
            json!({
                "plugin_name": c.plugin_name,
                "plugin_version": c.plugin_version,
                "allowed_roles": c.allowed_roles,
                "connection_details": {
                    "connection_url": c.connection_url,
                    "username": c.username,
                },
                "password_policy": c.password_policy,
                "root_credentials_rotate_statements": c.root_rotation_statements,
            })
        })
    })
    .flatten();
    match data {
        Some(d) => Ok(Reply::Envelope(Envelope::data(d))),
        None => Err(Failure::not_found()),
    }
}

const ROLE_FIELDS: &[&str] = &[
    "db_name",
    "creation_statements",
    "revocation_statements",
    "rollback_statements",
    "renew_statements",
    "default_ttl",
    "max_ttl",
    "credential_type",
    "credential_config",
];

fn write_role(core: &Arc<Core>, req: &Request, mount: &str, name: &str) -> Outcome {
    let f = req.fields();
    let mut role = with_mount(core, mount, |m| m.roles.get(name).cloned()).flatten().unwrap_or_default();
    if f.has("db_name") {
        role.db_name = f.str("db_name")?;
    }
    if role.db_name.is_empty() {
        return Err(Failure::resp(400, "database name is required"));
    }
    let stmts = |key: &str, slot: &mut Vec<String>| -> Result<(), Failure> {
        if let Some(v) = f.statements(key)? {
            *slot = v;
        }
        Ok(())
    };
    stmts("creation_statements", &mut role.creation_statements)?;
    stmts("revocation_statements", &mut role.revocation_statements)?;
    stmts("rollback_statements", &mut role.rollback_statements)?;
    stmts("renew_statements", &mut role.renew_statements)?;
    if let Some(d) = f.duration_opt("default_ttl")? {
        role.default_ttl = d;
    }
    if let Some(d) = f.duration_opt("max_ttl")? {
        role.max_ttl = d;
    }
    if f.has("credential_type") {
        role.credential_type = f.str("credential_type")?;
    }
    if role.credential_type.is_empty() {
        role.credential_type = "password".into();
    }
    if role.credential_type != "password" {
        return Err(Failure::resp(400, format!("invalid credential_type {:?}", role.credential_type)));
    }
    with_mount(core, mount, |m| m.roles.insert(name.to_string(), role));
    Ok(Core::with_ignored(Reply::Empty, &f, ROLE_FIELDS))
}

fn read_role(core: &Arc<Core>, mount: &str, name: &str) -> Outcome {
    let role = with_mount(core, mount, |m| m.roles.get(name).cloned()).flatten();
    let Some(r) = role else {
        return Err(Failure::not_found());
    };
    Ok(Reply::Envelope(Envelope::data(json!({
        "db_name": r.db_name,
        "creation_statements": r.creation_statements,
        "revocation_statements": r.revocation_statements,
        "rollback_statements": r.rollback_statements,
        "renew_statements": r.renew_statements,
        "default_ttl": r.default_ttl,
        "max_ttl": r.max_ttl,
        "credential_type": r.credential_type,
    }))))
}

/// Vault's default username template:
/// `v-<display name, 8>-<role, 8>-<random 20>-<unix time>`, at most 63 bytes.
pub fn username(display_name: &str, role: &str, now: DateTime<Utc>) -> String {
    let trunc = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    let name =
        format!("v-{}-{}-{}-{}", trunc(display_name, 8), trunc(role, 8), crate::ids::base62(20), now.timestamp());
    trunc(&name, 63)
}

async fn creds(core: &Arc<Core>, mount: &str, role_name: &str, token: Option<TokenEntry>) -> Outcome {
    let now = Utc::now();
    let (role, plugin) = {
        let state = core.state();
        let Some(db) = state.mounts.get::<DbMount>(mount) else {
            return Err(Failure::unsupported_path());
        };
        let Some(role) = db.roles.get(role_name).cloned() else {
            return Err(Failure::resp(400, format!("unknown role: {role_name}")));
        };
        let Some(conn) = db.connections.get(&role.db_name) else {
            return Err(Failure::backend(500, format!("could not find connection with name \"{}\"", role.db_name)));
        };
        if !crate::glob::matches_any(&conn.allowed_roles, role_name) {
            return Err(Failure::backend(500, format!("\"{role_name}\" is not an allowed role")));
        }
        (role, conn.plugin.clone())
    };
    let ttl = ttl::calculate(
        TtlInput { backend_ttl: role.default_ttl, backend_max: role.max_ttl, ..Default::default() },
        now,
        now,
    )
    .map_err(|e| Failure::backend(500, e))?;
    let display_name = token.as_ref().map(|t| t.display_name.as_str()).unwrap_or("root");
    let user = username(display_name, role_name, now);
    let password = crate::ids::password();
    let valid_until = now + Duration::seconds(ttl.ttl + EXPIRATION_BUFFER_SECS);
    plugin
        .new_user(&role.creation_statements, &user, &password, valid_until)
        .await
        .map_err(|e| Failure::backend(500, e))?;
    let lease_id = format!("{mount}/creds/{role_name}/{}", crate::ids::base62(24));
    let creator = token.filter(|t| !t.is_root()).map(|t| t.id);
    {
        let mut state = core.state();
        // Vault couples the lease to its token; a token revoked while the user
        // was being created takes the lease with it.
        let token_alive = creator.as_ref().is_none_or(|t| state.tokens.contains_key(t));
        state.leases.insert(
            lease_id.clone(),
            LeaseEntry {
                id: lease_id.clone(),
                mount: mount.to_string(),
                role: role_name.to_string(),
                db_name: role.db_name.clone(),
                username: user.clone(),
                revocation_statements: role.revocation_statements.clone(),
                kind: LeaseKind::Database,
                issue_time: now,
                expire_time: if token_alive { now + Duration::seconds(ttl.ttl) } else { now },
                last_renewal: None,
                renewable: true,
                token: creator,
                revoking: false,
                attempts: 0,
                next_attempt: None,
                irrevocable: None,
            },
        );
    }
    core.expiry_wake.notify_one();
    Ok(Reply::Envelope(Envelope {
        lease_id,
        renewable: true,
        lease_duration: ttl.ttl,
        data: Some(json!({ "username": user, "password": password })),
        warnings: ttl.warnings,
        ..Default::default()
    }))
}

async fn rotate_root(core: &Arc<Core>, mount: &str, name: &str) -> Outcome {
    let (plugin, username, url, statements, disable_escaping) = {
        let state = core.state();
        let Some(conn) = state.mounts.get::<DbMount>(mount).and_then(|m| m.connections.get(name)) else {
            return Err(Failure::backend(
                500,
                format!("unable to rotate root credentials: no configuration found for {name}"),
            ));
        };
        if conn.username.is_empty() {
            return Err(Failure::backend(500, "unable to rotate root credentials: no username in configuration"));
        }
        if conn.password.is_empty() {
            return Err(Failure::backend(500, "unable to rotate root credentials: no password in configuration"));
        }
        (
            conn.plugin.clone(),
            conn.username.clone(),
            conn.connection_url.clone(),
            conn.root_rotation_statements.clone(),
            conn.disable_escaping,
        )
    };
    let new_password = crate::ids::password();
    if let Plugin::Postgres(pg) = &plugin {
        pg.rotate_root(&username, &new_password, &statements)
            .await
            .map_err(|e| Failure::backend(500, format!("unable to rotate root credentials: {e}")))?;
    }
    let new_plugin = match plugin {
        Plugin::Postgres(_) => Plugin::Postgres(Arc::new(
            PgPlugin::new(&url, &username, &new_password, disable_escaping).map_err(|e| Failure::backend(500, e))?,
        )),
        memory => memory,
    };
    with_mount(core, mount, |m| {
        if let Some(conn) = m.connections.get_mut(name) {
            conn.password = new_password;
            conn.plugin = new_plugin;
        }
    });
    Ok(Reply::Empty)
}

pub struct RenewPlan {
    pub plugin: Plugin,
    pub renew_statements: Vec<String>,
    pub ttl: TtlResult,
}

/// The backend half of a renewal, computed under the state lock.
pub fn plan_renew(state: &State, lease: &LeaseEntry, increment: i64, now: DateTime<Utc>) -> Result<RenewPlan, String> {
    let db = state.mounts.get::<DbMount>(&lease.mount).ok_or("no database mount")?;
    let role = db
        .roles
        .get(&lease.role)
        .ok_or_else(|| format!("error during renew: could not find role with name {:?}", lease.role))?;
    let conn = db
        .connections
        .get(&lease.db_name)
        .ok_or_else(|| format!("could not find connection with name {:?}", lease.db_name))?;
    let ttl = ttl::calculate(
        TtlInput { increment, backend_ttl: role.default_ttl, backend_max: role.max_ttl, ..Default::default() },
        lease.issue_time,
        now,
    )?;
    Ok(RenewPlan { plugin: conn.plugin.clone(), renew_statements: role.renew_statements.clone(), ttl })
}

pub struct RevokePlan {
    plugin: Plugin,
    username: String,
    statements: Vec<String>,
}

impl RevokePlan {
    pub async fn run(self) -> Result<(), String> {
        self.plugin.delete_user(&self.username, &self.statements).await
    }
}

pub fn plan_revoke(state: &State, lease: &LeaseEntry) -> Result<RevokePlan, String> {
    let conn = state
        .mounts
        .get::<DbMount>(&lease.mount)
        .and_then(|m| m.connections.get(&lease.db_name))
        .ok_or_else(|| format!("could not find connection with name {:?}", lease.db_name))?;
    Ok(RevokePlan {
        plugin: conn.plugin.clone(),
        username: lease.username.clone(),
        statements: lease.revocation_statements.clone(),
    })
}

/// Users recorded by every memory plugin, for the demo.
pub fn memory_users(state: &State) -> Vec<(String, String)> {
    state
        .mounts
        .iter::<DbMount>()
        .flat_map(|(_, m)| m.connections.values())
        .filter_map(|c| match &c.plugin {
            Plugin::Memory(m) => Some(m.list()),
            Plugin::Postgres(_) => None,
        })
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_follows_vault_template() {
        let now = DateTime::from_timestamp(1716800000, 0).unwrap();
        let u = username("kubernetes-default-app", "readonly-role", now);
        assert!(u.starts_with("v-kubernet-readonly-"), "{u}");
        assert!(u.ends_with("-1716800000"));
        assert_eq!(u.len(), 2 + 8 + 1 + 8 + 1 + 20 + 1 + 10);
    }
}
