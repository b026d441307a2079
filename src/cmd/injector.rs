//! `leasehold injector`: the mutating admission webhook, served over HTTPS
//! until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::InjectorArgs;

pub fn main(a: InjectorArgs) -> ExitCode {
    agent::telemetry::init_logging(&config::LogConfig { level: a.log_level.clone(), format: a.log_format });
    let usage = |m: String| {
        eprintln!("leasehold injector: {m}");
        ExitCode::from(crate::EXIT_CONFIG)
    };
    let addr = match injector::listen_addr(&a.listen) {
        Ok(a) => a,
        Err(m) => return usage(m),
    };
    let env = config::process_env;
    let Some(vault_address) = a.vault_address.or_else(|| env("VAULT_ADDR")) else {
        return usage("--vault-address (or VAULT_ADDR) is required".into());
    };
    if let Some(problem) = config::http_url_problem(&vault_address) {
        return usage(format!("--vault-address {problem}"));
    }
    let vault_ca_cert = a.vault_ca_cert.or_else(|| env("VAULT_CACERT").map(PathBuf::from));
    let vault_ca_pem = match &vault_ca_cert {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => Some(pem),
            Ok(_) => return usage(format!("--vault-ca-cert {}: not a PEM certificate", p.display())),
            Err(e) => return usage(format!("--vault-ca-cert {}: {e}", p.display())),
        },
        None => None,
    };
    let auth_mount = match injector::plan::auth_mount("--auth-path", &a.auth_path) {
        Ok(m) => m,
        Err(e) => return usage(e.to_string()),
    };
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        return usage("--tls-cert and --tls-key are required".into());
    };
    let tls = match injector::tls::server_config(cert, key) {
        Ok(t) => t,
        Err(e) => return usage(format!("TLS: {e}")),
    };
    let settings = injector::admit::Settings {
        defaults: injector::plan::Defaults {
            vault_address,
            vault_ca_pem,
            vault_namespace: a.vault_namespace.or_else(|| env("VAULT_NAMESPACE")).unwrap_or_default(),
            auth_mount,
            image: a.image,
            legacy: a.legacy_sidecar,
            token_audience: a.token_audience,
            telemetry_port: a.agent_telemetry_port,
        },
        vault_k8s_compat: a.vault_k8s_compat,
    };
    let result: anyhow::Result<()> = crate::runtime().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            let signals = agent::signals::install()?;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("--listen {addr}: {e}"))?;
            tracing::info!(event = "injector_listening", addr = %listener.local_addr()?, compat = settings.vault_k8s_compat, "serving /mutate, /healthz, /readyz and /metrics over HTTPS");
            injector::serve(listener, tls, injector::router(settings), signals.shutdown.clone()).await;
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leasehold injector: {e:#}");
            ExitCode::from(crate::EXIT_FAILURE)
        }
    }
}
