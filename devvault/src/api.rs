//! Vault's response shapes: the envelope, the error body and how a handler's
//! outcome becomes a status code (vault-api.md §1.4–1.5).

use serde_json::{Map, Value, json};

/// A failed request: status plus the `errors` array Vault would send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub errors: Vec<String>,
}

impl Failure {
    /// An error *response* (`logical.ErrorResponse`): the text goes out bare.
    pub fn resp(status: u16, msg: impl Into<String>) -> Self {
        Failure { status, errors: vec![msg.into()] }
    }

    /// A plain backend error on a non-login request: Vault wraps it with
    /// go-multierror, so the wire text gains the "1 error occurred" frame.
    pub fn backend(status: u16, msg: impl AsRef<str>) -> Self {
        Failure { status, errors: vec![multierror(msg.as_ref())] }
    }

    /// Missing, unknown, revoked or expired token.
    pub fn denied() -> Self {
        Self::resp(403, "permission denied")
    }

    /// A valid token whose policies do not allow the request.
    pub fn acl_denied() -> Self {
        Self::backend(403, "permission denied")
    }

    /// A read that found nothing, or an unknown route outside `/v1/`.
    pub fn not_found() -> Self {
        Failure { status: 404, errors: vec![] }
    }

    pub fn unsupported_path() -> Self {
        Self::backend(404, "unsupported path")
    }

    pub fn unsupported_operation() -> Self {
        Self::backend(405, "unsupported operation")
    }

    pub fn no_route(path: &str) -> Self {
        Self::resp(404, format!("no handler for route \"{path}\". route entry not found."))
    }

    pub fn body(&self) -> Value {
        json!({ "errors": self.errors })
    }
}

pub fn multierror(msg: &str) -> String {
    format!("1 error occurred:\n\t* {msg}\n\n")
}

/// What a handler produced on success.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Nil response: 204 with no body.
    Empty,
    /// 202, used by asynchronous revocation.
    Accepted,
    /// The standard envelope, 200.
    Envelope(Envelope),
    /// A body that is not an envelope (e.g. `sys/health`) with its own status.
    Raw(u16, Value),
}

#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub lease_id: String,
    pub renewable: bool,
    pub lease_duration: i64,
    pub data: Option<Value>,
    pub warnings: Vec<String>,
    pub auth: Option<Value>,
}

impl Envelope {
    pub fn data(data: Value) -> Self {
        Envelope { data: Some(data), ..Default::default() }
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("request_id".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("lease_id".into(), json!(self.lease_id));
        m.insert("renewable".into(), json!(self.renewable));
        m.insert("lease_duration".into(), json!(self.lease_duration));
        m.insert("data".into(), self.data.clone().unwrap_or(Value::Null));
        m.insert("wrap_info".into(), Value::Null);
        m.insert("warnings".into(), if self.warnings.is_empty() { Value::Null } else { json!(self.warnings) });
        m.insert("auth".into(), self.auth.clone().unwrap_or(Value::Null));
        Value::Object(m)
    }
}

impl Reply {
    /// A reply that only carries warnings is still a 200 envelope in Vault.
    pub fn warnings(warnings: Vec<String>) -> Reply {
        if warnings.is_empty() {
            return Reply::Empty;
        }
        Reply::Envelope(Envelope { warnings, ..Default::default() })
    }
}

pub type Outcome = Result<Reply, Failure>;
