//! The token store: `auth/token/lookup-self`, `renew-self`, `revoke-self`
//! and `create` (vault-api.md §3).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::{Envelope, Failure, Outcome, Reply};
use crate::core::{Core, Op, Request, TokenEntry, TokenSource};
use crate::expiration::{revoke_token_locked, rfc3339};
use crate::ttl::{self, TtlInput};

/// What a new token is made of; `issue` fills in ids and expiry.
pub struct NewToken {
    pub policies: Vec<String>,
    pub path: String,
    pub display_name: String,
    pub meta: BTreeMap<String, String>,
    pub ttl: TtlInput,
    pub renewable: bool,
    pub orphan: bool,
    pub parent: Option<String>,
    pub source: TokenSource,
    pub entity_id: String,
    /// Root-policy tokens without any TTL never expire.
    pub no_expiry: bool,
}

/// Creates and stores a token. Returns it with the capping warnings.
pub fn issue(core: &Arc<Core>, new: NewToken) -> Result<(TokenEntry, Vec<String>), Failure> {
    let now = Utc::now();
    let (ttl, warnings) = if new.no_expiry {
        (0, vec![])
    } else {
        let r = ttl::calculate(new.ttl, now, now).map_err(|e| Failure::resp(400, e))?;
        (r.ttl, r.warnings)
    };
    let id = format!("hvs.{}", crate::ids::base62(24));
    let salted = hex::encode(Sha256::digest(id.as_bytes()));
    let entry = TokenEntry {
        lease_id: format!("{}/h{salted}", new.path),
        id,
        accessor: crate::ids::base62(24),
        policies: new.policies,
        path: new.path,
        display_name: new.display_name,
        meta: new.meta,
        creation_time: now,
        creation_ttl: ttl,
        expire_time: (!new.no_expiry).then(|| now + Duration::seconds(ttl)),
        explicit_max_ttl: new.ttl.explicit_max,
        period: new.ttl.period,
        renewable: new.renewable,
        orphan: new.orphan,
        parent: new.parent,
        entity_id: new.entity_id,
        source: new.source,
        last_renewal: None,
    };
    core.state().tokens.insert(entry.id.clone(), entry.clone());
    core.expiry_wake.notify_one();
    Ok((entry, warnings))
}

/// The `auth` block of login, create and renew responses.
pub fn auth_json(t: &TokenEntry, lease_duration: i64) -> Value {
    let token_policies: Vec<&String> = t.policies.iter().collect();
    json!({
        "client_token": t.id,
        "accessor": t.accessor,
        "policies": t.policies,
        "token_policies": token_policies,
        "metadata": if t.meta.is_empty() { Value::Null } else { json!(t.meta) },
        "lease_duration": lease_duration,
        "renewable": t.renewable,
        "entity_id": t.entity_id,
        "token_type": "service",
        "orphan": t.orphan,
        "mfa_requirement": null,
        "num_uses": 0,
    })
}

pub fn sorted_policies(mut policies: Vec<String>, add_default: bool) -> Vec<String> {
    if add_default && !policies.iter().any(|p| p == "root") {
        policies.push("default".into());
    }
    policies.retain(|p| !p.is_empty());
    policies.sort();
    policies.dedup();
    policies
}

pub async fn handle(core: &Arc<Core>, req: &Request, sub: &str, token: Option<TokenEntry>) -> Outcome {
    let Some(token) = token else {
        return Err(Failure::denied());
    };
    match (sub, req.op) {
        ("lookup-self", Op::Read | Op::Update) => Ok(lookup(&token)),
        ("renew-self", Op::Update) => {
            let increment = req.fields().duration("increment")?;
            renew(core, &token, increment)
        }
        ("revoke-self", Op::Update) => {
            revoke_token_locked(&mut core.state(), &token.id, Utc::now());
            core.expiry_wake.notify_one();
            Ok(Reply::Empty)
        }
        ("create" | "create-orphan", Op::Update) => create(core, req, &token, sub == "create-orphan"),
        ("lookup-self" | "renew-self" | "revoke-self" | "create" | "create-orphan", _) => {
            Err(Failure::unsupported_operation())
        }
        _ => Err(Failure::unsupported_path()),
    }
}

fn lookup(t: &TokenEntry) -> Reply {
    let now = Utc::now();
    let ttl = t.expire_time.map(|e| (e - now).num_seconds().max(0)).unwrap_or(0);
    let mut data = json!({
        "accessor": t.accessor,
        "creation_time": t.creation_time.timestamp(),
        "creation_ttl": t.creation_ttl,
        "display_name": t.display_name,
        "entity_id": t.entity_id,
        "expire_time": t.expire_time.map(rfc3339),
        "explicit_max_ttl": t.explicit_max_ttl,
        "id": t.id,
        "issue_time": rfc3339(t.creation_time),
        "meta": if t.meta.is_empty() { Value::Null } else { json!(t.meta) },
        "num_uses": 0,
        "orphan": t.orphan,
        "path": t.path,
        "policies": t.policies,
        "renewable": t.renewable,
        "ttl": ttl,
        "type": "service",
    });
    if let Some(last) = t.last_renewal {
        data["last_renewal_time"] = json!(last.timestamp());
        data["last_renewal"] = json!(rfc3339(last));
    }
    if t.period > 0 {
        data["period"] = json!(t.period);
    }
    Reply::Envelope(Envelope::data(data))
}

fn renew(core: &Arc<Core>, t: &TokenEntry, increment: i64) -> Outcome {
    if !t.renewable || t.expire_time.is_none() {
        return Err(Failure::resp(400, "lease is not renewable"));
    }
    let now = Utc::now();
    let input = match &t.source {
        TokenSource::Kubernetes { mount, role, limits } => {
            let Some(r) = limits(&core.state(), mount, role) else {
                return Err(Failure::backend(500, format!("role {role} does not exist during renewal")));
            };
            TtlInput {
                increment,
                backend_ttl: r.ttl,
                backend_max: r.max_ttl,
                period: r.period,
                explicit_max: r.explicit_max_ttl,
            }
        }
        _ => TtlInput {
            increment,
            backend_ttl: t.creation_ttl,
            period: t.period,
            explicit_max: t.explicit_max_ttl,
            ..Default::default()
        },
    };
    let r = ttl::calculate(input, t.creation_time, now).map_err(|e| Failure::resp(400, e))?;
    let updated = {
        let mut state = core.state();
        let Some(entry) = state.tokens.get_mut(&t.id) else {
            return Err(Failure::denied());
        };
        entry.expire_time = Some(now + Duration::seconds(r.ttl));
        entry.last_renewal = Some(now);
        entry.clone()
    };
    core.expiry_wake.notify_one();
    Ok(Reply::Envelope(Envelope { auth: Some(auth_json(&updated, r.ttl)), warnings: r.warnings, ..Default::default() }))
}

const CREATE_FIELDS: &[&str] = &[
    "policies",
    "ttl",
    "explicit_max_ttl",
    "period",
    "renewable",
    "display_name",
    "no_default_policy",
    "meta",
    "num_uses",
    "no_parent",
    "type",
];

fn create(core: &Arc<Core>, req: &Request, parent: &TokenEntry, orphan: bool) -> Outcome {
    let f = req.fields();
    let requested = f.list("policies")?;
    let policies = match requested {
        Some(p) => {
            if !parent.is_root() {
                let allowed = |p: &String| p == "default" || parent.policies.contains(p);
                if !p.iter().all(allowed) {
                    return Err(Failure::resp(400, "child policies must be subset of parent"));
                }
            }
            p
        }
        None => parent.policies.clone(),
    };
    let no_default = f.bool_or("no_default_policy", false)?;
    let policies = sorted_policies(policies, !no_default);
    let input = TtlInput {
        backend_ttl: f.duration("ttl")?,
        explicit_max: f.duration("explicit_max_ttl")?,
        period: f.duration("period")?,
        ..Default::default()
    };
    let no_expiry =
        policies.iter().any(|p| p == "root") && input.backend_ttl == 0 && input.period == 0 && input.explicit_max == 0;
    let name = f.str("display_name")?;
    let display_name = if name.is_empty() { "token".to_string() } else { format!("token-{name}") };
    let meta: BTreeMap<String, String> = f.map_of_strings("meta")?.unwrap_or_default().into_iter().collect();
    let orphan = orphan || f.bool_or("no_parent", false)?;
    let (entry, warnings) = issue(
        core,
        NewToken {
            policies,
            path: if orphan { "auth/token/create-orphan".into() } else { "auth/token/create".into() },
            display_name,
            meta,
            ttl: input,
            renewable: f.bool_or("renewable", true)?,
            orphan,
            parent: (!orphan && !parent.is_root()).then(|| parent.id.clone()),
            source: TokenSource::Create,
            entity_id: String::new(),
            no_expiry,
        },
    )?;
    let reply =
        Reply::Envelope(Envelope { auth: Some(auth_json(&entry, entry.creation_ttl)), warnings, ..Default::default() });
    Ok(Core::with_ignored(reply, &f, CREATE_FIELDS))
}

pub fn entity_id(seed: &str) -> String {
    let h = hex::encode(Sha256::digest(seed.as_bytes()));
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}
