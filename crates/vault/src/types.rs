//! Response shapes of the Vault API subset leasehold uses.

use serde::Deserialize;
use serde_json::{Map, Value};

/// Vault's response envelope; every field optional so that OpenBao (no
/// `mount_type`) and Vault both decode.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct Envelope {
    #[serde(default)]
    pub lease_id: Option<String>,
    #[serde(default)]
    pub renewable: Option<bool>,
    #[serde(default)]
    pub lease_duration: Option<i64>,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub warnings: Option<Vec<String>>,
    #[serde(default)]
    pub auth: Option<AuthBlock>,
}

#[derive(Deserialize)]
pub(crate) struct AuthBlock {
    pub client_token: String,
    #[serde(default)]
    pub accessor: crate::secret::Accessor,
    #[serde(default)]
    pub lease_duration: i64,
    #[serde(default)]
    pub renewable: bool,
    /// `service` or `batch`.
    #[serde(default)]
    pub token_type: String,
}

impl std::fmt::Debug for AuthBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthBlock")
            .field("accessor", &self.accessor)
            .field("lease_duration", &self.lease_duration)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub errors: Vec<String>,
}

pub(crate) fn data_object(v: Option<Value>) -> Map<String, Value> {
    match v {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}
