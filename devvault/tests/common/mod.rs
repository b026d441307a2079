#![allow(dead_code)]

use devvault::testing::{Api, Setup};
use devvault::{DevVault, ServiceAccountIssuer, SigningAlg};

pub const APP_POLICY: &str = r#"
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"#;

pub async fn vault() -> (DevVault, Api) {
    let v = DevVault::start("127.0.0.1:0".parse().unwrap(), "root").await.expect("devvault starts");
    let api = Api::new(&v.url(), Some("root"));
    (v, api)
}

pub fn issuer() -> ServiceAccountIssuer {
    ServiceAccountIssuer::generate(SigningAlg::Es256).expect("key generation")
}

/// Kubernetes auth configured for SA `default/app`, role `app`.
pub async fn with_kubernetes(api: &Api, issuer: &ServiceAccountIssuer, ttl: &str, max_ttl: &str) {
    Setup { api, k8s_role: "app", policy: APP_POLICY.into(), token_ttl: ttl, token_max_ttl: max_ttl }
        .kubernetes(issuer)
        .await;
}

/// Logs in as `default/app`; returns an Api with the token and the auth block.
pub async fn login(api: &Api, issuer: &ServiceAccountIssuer) -> (Api, serde_json::Value) {
    let jwt = issuer.mint("default", "app", 600).unwrap();
    let body = api.ok("POST", "auth/kubernetes/login", Some(serde_json::json!({"role": "app", "jwt": jwt}))).await;
    let token = body["auth"]["client_token"].as_str().unwrap().to_string();
    (api.with_token(&token), body["auth"].clone())
}

/// Polls `cond` every 50 ms for up to `secs`; the condition is the assertion,
/// the deadline only bounds the wait.
pub async fn eventually<F: AsyncFnMut() -> bool>(secs: u64, mut cond: F) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
