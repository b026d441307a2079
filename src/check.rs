//! `leasehold check`: validate the config and render every template against
//! sample data, without contacting Vault or needing runtime files (token,
//! CA), so CI pipelines and chart tests can run it.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::config::{Config, ConfigError};
use crate::render::{Context, RenderError, Renderer};
use crate::secret::{LeaseId, SecretData};

/// Sample credentials shaped like `database/creds/<role>`. Only templates
/// of database secrets are held to that shape; for other paths (KV, PKI)
/// undefined values render empty, and syntax and filter errors still count.
fn sample_data() -> SecretData {
    let sample =
        json!({ "username": "v-kubernet-sample-AbCdEfGhIjKlMnOpQrSt-1700000000", "password": "Sample-Passw0rd-xyzw" });
    SecretData::new(sample.as_object().cloned().unwrap_or_default())
}

/// Problems found, as printable lines (empty when the config is good).
pub fn check(config: &Config, config_path: &Path) -> Result<Vec<String>, ConfigError> {
    let strict = Renderer::compile(config, config_path)?;
    let lenient = Renderer::compile_with(config, config_path, minijinja::UndefinedBehavior::Chainable)?;
    let data = sample_data();
    let lease = LeaseId::new("database/creds/sample/AbCdEfGhIjKlMnOpQrStUvWx".into());
    let mut problems = Vec::new();
    for (i, secret) in config.secrets.iter().enumerate() {
        let ctx = Context {
            name: &secret.name,
            data: &data,
            lease_id: &lease,
            lease_duration: Duration::from_secs(3600),
            issued_at: crate::clock::wall(),
            expires_at: Some(crate::clock::wall() + Duration::from_secs(3600)),
            previous: Some(&data),
            proxy: secret.proxy.as_ref().map(|p| (p.listen.as_str(), p.local_password.then_some("sample"))),
        };
        let known_shape = secret.path.trim_start_matches('/').contains("/creds/");
        let renderer = if known_shape { &strict } else { &lenient };
        if let Err(RenderError::Template { file, reason } | RenderError::Write { file, reason }) =
            renderer.render(i, &ctx)
        {
            problems.push(format!(
                "{}: secrets[{i}] ({}): {}: {reason}",
                config_path.display(),
                secret.name,
                file.display()
            ));
        }
    }
    Ok(problems)
}

/// Files with `owner`/`group` when this process cannot chown (no
/// CAP_CHOWN, as in the chart, which drops every capability): each write
/// of that secret would fail, so say so before the first one.
pub fn chown_warnings(config: &Config) -> Vec<String> {
    if can_chown() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, s) in config.secrets.iter().enumerate() {
        for (j, f) in s.files.iter().enumerate().filter(|(_, f)| f.owner.is_some() || f.group.is_some()) {
            out.push(format!(
                "secrets[{i}].files[{j}] ({}): owner/group is set but this process cannot change a file's owner \
                 (no CAP_CHOWN): writing it will fail; drop owner/group and use fsGroup, or grant CAP_CHOWN",
                f.path.display()
            ));
        }
    }
    out
}

/// CAP_CHOWN (bit 0) in the effective set, from /proc/self/status.
fn can_chown() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim);
    eff.and_then(|hex| u64::from_str_radix(hex, 16).ok()).is_some_and(|caps| caps & 1 == 1)
}
