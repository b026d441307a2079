//! `leasehold check`: validate the config and render every template against
//! sample data, without contacting Vault or needing runtime files (token,
//! CA), so CI pipelines and chart tests can run it.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use agent::render::{Context, RenderError, Renderer};
use config::{Config, ConfigError};
use vault::secret::{LeaseId, SecretData};

pub fn main(path: &Path) -> ExitCode {
    let config = match Config::load(path, &config::process_env) {
        Ok(c) => c,
        Err(e) => return crate::config_failed(&e),
    };
    for w in agent::files::chown_warnings(&config) {
        eprintln!("leasehold: warning: {}: {w}", path.display());
    }
    match check(&config, path) {
        Ok(problems) if problems.is_empty() => {
            let files: usize = config.secrets.iter().map(|s| s.files.len()).sum();
            println!("{}: ok ({} secrets, {files} files)", path.display(), config.secrets.len());
            ExitCode::SUCCESS
        }
        Ok(problems) => {
            for p in problems {
                eprintln!("leasehold: {p}");
            }
            ExitCode::from(crate::EXIT_CONFIG)
        }
        Err(e) => crate::config_failed(&e),
    }
}

/// Sample credentials shaped like `database/creds/<role>`. Only templates
/// of database secrets are held to that shape; for other paths (KV, PKI)
/// `data` is permissive sample data (`Templates::check_permissive`): what
/// the agent would render passes, and syntax, unknown filters and
/// functions still count.
fn sample_data() -> SecretData {
    let sample =
        // The password is also base64 text (of `SamplePassword1`), so a
        // template that decodes it (consul-template's base64Decode) checks.
        json!({ "username": "v-kubernet-sample-AbCdEfGhIjKlMnOpQrSt-1700000000", "password": "U2FtcGxlUGFzc3dvcmQx" });
    SecretData::new(sample.as_object().cloned().unwrap_or_default())
}

/// Problems found, as printable lines (empty when the config is good).
fn check(config: &Config, config_path: &Path) -> Result<Vec<String>, ConfigError> {
    let strict = Renderer::compile(config, config_path)?;
    let lenient = Renderer::compile_lenient(config, config_path)?;
    let data = sample_data();
    let lease = LeaseId::new("database/creds/sample/AbCdEfGhIjKlMnOpQrStUvWx".into());
    let mut problems = Vec::new();
    for (i, secret) in config.secrets.iter().enumerate() {
        let ctx = Context {
            name: &secret.name,
            data: &data,
            lease_id: &lease,
            lease_duration: Duration::from_secs(3600),
            issued_at: agent::clock::wall(),
            expires_at: Some(agent::clock::wall() + Duration::from_secs(3600)),
            previous: Some(&data),
            proxy: secret.proxy.as_ref().map(|p| (&p.listen, p.local_password.then_some("sample"))),
            rotation_window: Some(secret.revoke_replaced_after),
        };
        let known_shape = secret.path.trim_start_matches('/').contains("/creds/");
        let checked = if known_shape {
            strict.templates(&secret.name).render(&ctx).map(|_| ())
        } else {
            lenient.templates(&secret.name).check_permissive(&ctx)
        };
        if let Err(RenderError::Template { file, reason }) = checked {
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
