//! The `sys/devvault/` test extensions: injected faults and the request log.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    #[serde(default)]
    pub path_prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub drop: bool,
    /// A raw response body (malformed, truncated or wrong-typed JSON, as a
    /// broken server or proxy might send), answered with `status` or 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Apply the fault after the request was handled (forwarded in proxy
    /// mode): the server acted, its answer is delayed, replaced or lost.
    #[serde(default)]
    pub after: bool,
    /// Matches left; 0 means until cleared.
    #[serde(default)]
    pub count: u64,
}

/// What a matching fault does to a request.
#[derive(Debug, Clone)]
pub struct FaultAction {
    pub delay_ms: u64,
    pub status: Option<u16>,
    pub errors: Vec<String>,
    pub drop: bool,
    pub body: Option<String>,
    pub after: bool,
}

#[derive(Default)]
pub struct Faults {
    list: Mutex<Vec<Fault>>,
}

impl Faults {
    pub fn add(&self, fault: Fault) {
        self.lock().push(fault);
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn list(&self) -> Vec<Fault> {
        self.lock().clone()
    }

    /// The first fault matching the request, consuming one of its uses.
    pub fn take(&self, method: &str, path: &str) -> Option<FaultAction> {
        let mut list = self.lock();
        let idx = list.iter().position(|f| {
            path.starts_with(&f.path_prefix) && f.method.as_deref().is_none_or(|m| m.eq_ignore_ascii_case(method))
        })?;
        let fault = &mut list[idx];
        let action = FaultAction {
            delay_ms: fault.delay_ms,
            status: fault.status,
            errors: fault.errors.clone(),
            drop: fault.drop,
            body: fault.body.clone(),
            after: fault.after,
        };
        if fault.count > 0 {
            fault.count -= 1;
            if fault.count == 0 {
                list.remove(idx);
            }
        }
        Some(action)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Fault>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub time: String,
    pub method: String,
    pub path: String,
    /// 0 when the connection was dropped by a fault.
    pub status: u16,
    pub accessor: String,
    /// The `X-Vault-Namespace` header, recorded only ("" when absent).
    pub namespace: String,
}

#[derive(Default)]
pub struct RequestLog {
    entries: Mutex<Vec<LogEntry>>,
}

impl RequestLog {
    pub fn record(&self, method: &str, path: &str, namespace: &str, status: u16, accessor: &str) {
        let entry = LogEntry {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            method: method.to_string(),
            path: path.to_string(),
            status,
            accessor: accessor.to_string(),
            namespace: namespace.to_string(),
        };
        self.lock().push(entry);
    }

    pub fn entries(&self) -> Vec<LogEntry> {
        self.lock().clone()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<LogEntry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}
