//! `leasehold injector lint FILE...`: reads manifests and prints what the
//! webhook would do with each workload annotated for injection
//! (`injector::lint`), before a cluster's injector is swapped.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::Value;

pub fn main(files: &[PathBuf], legacy_sidecar: bool) -> ExitCode {
    let mut docs: Vec<Value> = Vec::new();
    for f in files {
        let text = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map(|_| s)
        } else {
            std::fs::read_to_string(f)
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                eprintln!("leasehold injector lint: {}: {e}", f.display());
                return ExitCode::from(crate::EXIT_CONFIG);
            }
        };
        match serde_saphyr::from_multiple::<Value>(&text) {
            Ok(d) => docs.extend(d),
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                eprintln!("leasehold injector lint: {}: not YAML: {first}", f.display());
                return ExitCode::from(crate::EXIT_CONFIG);
            }
        }
    }
    // The webhook's own defaults: what it adds is the same for any address.
    let defaults = injector::plan::Defaults {
        vault_address: "https://vault:8200".into(),
        vault_ca_pem: None,
        vault_namespace: String::new(),
        auth_mount: "kubernetes".into(),
        image: concat!("ghcr.io/leasehold/leasehold:", env!("CARGO_PKG_VERSION")).into(),
        legacy: legacy_sidecar,
        token_audience: None,
        telemetry_port: 9102,
    };
    let findings = injector::lint::lint(&docs, &defaults);
    print!("{}", injector::lint::report(&findings));
    if findings.iter().any(|f| matches!(f.verdict, injector::lint::Verdict::Denied(_))) {
        ExitCode::from(crate::EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}
