//! The injector's whole path from an AdmissionReview (any JSON: the pod,
//! its annotations, vault-k8s templates) to a decision and the agent config
//! it patches in: an error or a denial, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let defaults = injector::plan::Defaults {
        vault_address: "https://vault.vault.svc:8200".into(),
        vault_ca_pem: None,
        vault_namespace: String::new(),
        auth_mount: "kubernetes".into(),
        image: "leasehold:fuzz".into(),
        legacy: false,
        token_audience: None,
        telemetry_port: 9102,
    };
    for vault_k8s_compat in [false, true] {
        let settings = injector::admit::Settings { defaults: defaults.clone(), vault_k8s_compat };
        let _ = injector::admit::review(&body, &settings);
    }
});
