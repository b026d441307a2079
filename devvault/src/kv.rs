//! The KV version 2 secrets engine, for secrets without a lease:
//! `<mount>/data/<path>` (read, write, soft delete) and
//! `<mount>/metadata/<path>` (list, delete). No lease is registered: the
//! envelope's `lease_id` is empty and `lease_duration` 0 (vault-api.md §6).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::api::{Envelope, Failure, Outcome, Reply};
use crate::core::{Core, Op, Request};
use crate::expiration::rfc3339;

struct Version {
    data: Option<Value>,
    created: DateTime<Utc>,
    deleted: Option<DateTime<Utc>>,
}

#[derive(Default)]
pub struct KvMount {
    secrets: BTreeMap<String, Vec<Version>>,
}

fn metadata(v: &Version, number: usize) -> Value {
    json!({
        "created_time": rfc3339(v.created),
        "custom_metadata": null,
        "deletion_time": v.deleted.map(rfc3339).unwrap_or_default(),
        "destroyed": false,
        "version": number,
    })
}

pub fn handle(core: &Arc<Core>, req: &Request, mount: &str, sub: &str) -> Outcome {
    let (kind, path) = match sub.split_once('/') {
        Some((k, p)) => (k, p.trim_end_matches('/')),
        None => (sub, ""),
    };
    let mut state = core.state();
    let Some(kv) = state.mounts.get_mut::<KvMount>(mount) else { return Err(Failure::unsupported_path()) };
    match (kind, req.op) {
        ("data", Op::Read) if !path.is_empty() => {
            let versions = kv.secrets.get(path).ok_or_else(Failure::not_found)?;
            let wanted = match req.query.iter().find(|(k, _)| k == "version") {
                Some((_, v)) => v.parse::<usize>().map_err(|_| Failure::resp(400, "invalid version"))?,
                None => 0,
            };
            let number = if wanted == 0 { versions.len() } else { wanted };
            let version = versions.get(number.wrapping_sub(1)).ok_or_else(Failure::not_found)?;
            if version.deleted.is_some() {
                // Vault answers 404 with the metadata of the deleted version.
                return Err(Failure::not_found());
            }
            let data = json!({ "data": version.data, "metadata": metadata(version, number) });
            Ok(Reply::Envelope(Envelope::data(data)))
        }
        ("data", Op::Update) if !path.is_empty() => {
            let data = match req.data.get("data") {
                Some(Value::Object(m)) => Value::Object(m.clone()),
                _ => return Err(Failure::resp(400, "no data provided")),
            };
            let versions = kv.secrets.entry(path.to_string()).or_default();
            versions.push(Version { data: Some(data), created: Utc::now(), deleted: None });
            let number = versions.len();
            let meta = versions.last().map(|v| metadata(v, number)).unwrap_or(Value::Null);
            Ok(Reply::Envelope(Envelope::data(meta)))
        }
        ("data", Op::Delete) if !path.is_empty() => {
            if let Some(latest) = kv.secrets.get_mut(path).and_then(|v| v.last_mut()) {
                latest.deleted = Some(Utc::now());
            }
            Ok(Reply::Empty)
        }
        ("metadata", Op::Delete) if !path.is_empty() => {
            kv.secrets.remove(path);
            Ok(Reply::Empty)
        }
        ("metadata", Op::List) => {
            let prefix = if path.is_empty() { String::new() } else { format!("{path}/") };
            crate::core::list_children(kv.secrets.keys().map(String::as_str), &prefix)
        }
        ("data" | "metadata", _) => Err(Failure::unsupported_operation()),
        _ => Err(Failure::unsupported_path()),
    }
}
