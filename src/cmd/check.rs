//! `leasehold check`: validate the config and render every template against
//! sample data, without contacting Vault or needing runtime files (token,
//! CA), so CI pipelines and chart tests can run it; `--local` also checks
//! those files and the destination directories on this machine.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use agent::render::{Context, RenderError, Renderer};
use config::{Config, ConfigError};
use vault::secret::{LeaseId, SecretData};

pub fn main(path: &Path, local: bool) -> ExitCode {
    let config = match Config::load(path, &config::process_env) {
        Ok(c) => c,
        Err(e) => return crate::config_failed(&e),
    };
    for w in agent::files::chown_warnings(&config) {
        eprintln!("leasehold: warning: {}: {w}", path.display());
    }
    let checked = check(&config, path).map(|mut p| {
        if local {
            p.extend(local_problems(&config).into_iter().map(|l| format!("{}: {l}", path.display())));
        }
        p
    });
    match checked {
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

/// `--local`: what the agent would find missing on this machine before it
/// asks Vault for anything (`files::probe`), and the files it reads.
fn local_problems(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (i, s) in config.secrets.iter().enumerate() {
        if let Err(e) = agent::files::probe(s.files.iter().map(|f| f.path.as_path())) {
            out.push(format!("secrets[{i}] ({}): {e}", s.name));
        }
        if let Some(ca) = s.proxy.as_ref().and_then(|p| p.ca_cert.as_ref())
            && let Err(e) = std::fs::File::open(ca)
        {
            out.push(format!("secrets[{i}].proxy.ca_cert: {}: {e}", ca.display()));
        }
    }
    let token = config.auth.login().token_path;
    if let Err(e) = std::fs::File::open(&token) {
        out.push(format!("auth token_path: {}: {e}", token.display()));
    }
    if let Some(ca) = &config.vault.ca_cert
        && let Err(e) = std::fs::File::open(ca)
    {
        out.push(format!("vault.ca_cert: {}: {e}", ca.display()));
    }
    out
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
