//! Types that hold secrets. Their `Debug` and `Display` print placeholders,
//! and they are zeroized on drop, so a secret cannot reach a log line, an
//! error or a panic message by accident.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};
use zeroize::Zeroize;

pub use secrecy::{ExposeSecret, SecretString};

/// The longest TTL taken from an answer: far beyond any Vault allows, and
/// short enough that adding it to a time can never overflow.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A Vault lease id. Displayed shortened (`database/creds/app/Ab3x…`) so the
/// printed form cannot be used to renew or revoke the lease.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct LeaseId(String);

impl LeaseId {
    pub fn new(id: String) -> Self {
        LeaseId(id)
    }

    /// The full id, for requests to Vault and the state file only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `text` with the full id replaced by the short form, for error texts
    /// that might echo it.
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() { text.to_string() } else { text.replace(&self.0, &self.short()) }
    }

    pub fn short(&self) -> String {
        match self.0.rsplit_once('/') {
            Some((prefix, tail)) => {
                format!("{prefix}/{}…", tail.chars().take(4).collect::<String>())
            }
            None if self.0.is_empty() => String::new(),
            None => "…".into(),
        }
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({})", self.short())
    }
}

impl Drop for LeaseId {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A token's accessor. The full accessor lets a privileged token look the
/// token up or revoke it, so it goes only to Vault and the state file
/// (serialized whole); `Display` and `Debug`, hence logs, `/v1/status` and
/// every struct that holds one, show its first six characters.
#[derive(Clone, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Accessor(String);

impl Accessor {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Accessor {
    fn from(s: String) -> Self {
        Accessor(s)
    }
}

impl From<&str> for Accessor {
    fn from(s: &str) -> Self {
        Accessor(s.to_string())
    }
}

impl fmt::Display for Accessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head: String = self.0.chars().take(6).collect();
        if head.len() < self.0.len() { write!(f, "{head}…") } else { f.write_str(&head) }
    }
}

impl fmt::Debug for Accessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Accessor({self})")
    }
}

/// The `data` object of a secret (usernames, passwords, keys). `Debug`
/// lists the keys only; every string in it is zeroized on drop.
#[derive(Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretData(Map<String, Value>);

impl SecretData {
    pub fn new(map: Map<String, Value>) -> Self {
        SecretData(map)
    }

    pub fn expose(&self) -> &Map<String, Value> {
        &self.0
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    /// `expiration` (Unix seconds), which PKI certificates carry whether or
    /// not Vault leased them. Only certificate-shaped data counts (a
    /// `certificate` and a `serial_number` beside it): a KV secret may well
    /// have a field of that name that means nothing to us.
    pub fn expiration(&self) -> Option<std::time::SystemTime> {
        let is_cert = ["certificate", "serial_number"].iter().all(|k| self.0.get(*k).is_some_and(Value::is_string));
        if !is_cert {
            return None;
        }
        let secs = self.0.get("expiration").and_then(Value::as_i64).filter(|s| *s > 0)?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64))
    }
}

impl SecretData {
    /// How long until Vault rotates a static role's password: the `ttl` of
    /// `database/static-creds/<role>`, which carries `last_vault_rotation`
    /// beside it and no lease.
    pub fn rotates_in(&self) -> Option<std::time::Duration> {
        if !self.0.get("last_vault_rotation").is_some_and(Value::is_string) {
            return None;
        }
        let ttl = self.0.get("ttl").and_then(Value::as_u64)?;
        Some(Duration::from_secs(ttl).min(MAX_TTL))
    }

    /// The same static-role credentials (only `ttl` moved on).
    pub fn same_static_credentials(&self, other: &SecretData) -> bool {
        self.rotates_in().is_some()
            && other.rotates_in().is_some()
            && ["username", "password", "last_vault_rotation"].iter().all(|k| self.0.get(*k) == other.0.get(*k))
    }
}

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretData(keys: {:?})", self.0.keys().collect::<Vec<_>>())
    }
}

fn zeroize_value(v: &mut Value) {
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(zeroize_value),
        Value::Object(m) => m.values_mut().for_each(zeroize_value),
        _ => {}
    }
}

impl Drop for SecretData {
    fn drop(&mut self) {
        self.0.values_mut().for_each(zeroize_value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn debug_and_display_hide_secrets() {
        let id = LeaseId::new("database/creds/app/AbCdEfGhIjKlMnOpQrStUvWx".into());
        assert_eq!(id.to_string(), "database/creds/app/AbCd…");
        assert!(!format!("{id:?}").contains("EfGh"));
        let data = SecretData::new(json!({"username": "u", "password": "hunter2"}).as_object().unwrap().clone());
        let dbg = format!("{data:?}");
        assert!(dbg.contains("password") && !dbg.contains("hunter2"));
        let token = SecretString::from("hvs.secret".to_string());
        assert!(!format!("{token:?}").contains("hvs.secret"));
    }

    #[test]
    fn only_certificates_have_an_expiration() {
        let data = |v: serde_json::Value| SecretData::new(v.as_object().unwrap().clone());
        let cert = data(json!({"certificate": "-----BEGIN…", "serial_number": "1a:2b", "expiration": 1_900_000_000}));
        assert_eq!(cert.expiration(), Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000)));
        // A KV secret with a field of that name is polled, not scheduled by it.
        let kv = data(json!({"api_key": "k", "expiration": 1_900_000_000}));
        assert_eq!(kv.expiration(), None);
    }
}
