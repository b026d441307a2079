//! Kubernetes login: success, and each failure with Vault's status and text.

mod common;

use common::{issuer, vault, with_kubernetes};
use devvault::{ServiceAccountIssuer, SigningAlg};
use serde_json::{Value, json};

async fn login_with(api: &devvault::testing::Api, role: &str, jwt: &str) -> (u16, Value) {
    api.call("POST", "auth/kubernetes/login", Some(json!({"role": role, "jwt": jwt}))).await
}

fn claims() -> Value {
    ServiceAccountIssuer::claims("default", "app", 600)
}

#[tokio::test]
async fn login_succeeds_with_vault_auth_block() {
    let (_v, api) = vault().await;
    let iss = issuer();
    with_kubernetes(&api, &iss, "1h", "2h").await;
    let anon = api.with_token("");
    let (s, body) = login_with(&anon, "app", &iss.mint("default", "app", 600).unwrap()).await;
    assert_eq!(s, 200, "{body}");
    let auth = &body["auth"];
    assert!(auth["client_token"].as_str().unwrap().starts_with("hvs."));
    assert_eq!(auth["accessor"].as_str().unwrap().len(), 24);
    assert_eq!(auth["policies"], json!(["app", "default"]));
    assert_eq!(auth["token_policies"], json!(["app", "default"]));
    assert_eq!(auth["lease_duration"], 3600);
    assert_eq!(auth["renewable"], true);
    assert_eq!(auth["orphan"], true);
    assert_eq!(auth["token_type"], "service");
    assert_eq!(auth["metadata"]["service_account_name"], "app");
    assert_eq!(auth["metadata"]["service_account_namespace"], "default");
    assert_eq!(auth["metadata"]["service_account_secret_name"], "");
    assert_eq!(auth["metadata"]["role"], "app");
    let me = api.with_token(auth["client_token"].as_str().unwrap());
    let look = me.ok("GET", "auth/token/lookup-self", None).await;
    assert_eq!(look["data"]["display_name"], "kubernetes-default-app");
    assert_eq!(look["data"]["path"], "auth/kubernetes/login");
    assert_eq!(look["data"]["meta"]["role"], "app");
}

#[tokio::test]
async fn rs256_keys_verify_too() {
    let (_v, api) = vault().await;
    let rsa = ServiceAccountIssuer::generate(SigningAlg::Rs256).unwrap();
    with_kubernetes(&api, &rsa, "1h", "2h").await;
    let (s, _) = login_with(&api, "app", &rsa.mint("default", "app", 600).unwrap()).await;
    assert_eq!(s, 200);
    // Certificates are accepted in pem_keys as well.
    let cfg = json!({"kubernetes_host": "h", "kubernetes_ca_cert": rsa.certificate_pem(), "pem_keys": [rsa.certificate_pem()]});
    api.ok("POST", "auth/kubernetes/config", Some(cfg)).await;
    let (s, _) = login_with(&api, "app", &rsa.mint("default", "app", 600).unwrap()).await;
    assert_eq!(s, 200);
    // A token signed by another key is rejected.
    let (s, b) = login_with(&api, "app", &issuer().mint("default", "app", 600).unwrap()).await;
    assert_eq!((s, b), (403, json!({"errors": ["permission denied"]})));
}

#[tokio::test]
async fn each_login_failure_has_vaults_status_and_text() {
    let (_v, api) = vault().await;
    let iss = issuer();
    with_kubernetes(&api, &iss, "1h", "2h").await;
    let now = chrono::Utc::now().timestamp();
    let sign = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        iss.sign(&c).unwrap()
    };
    let good = iss.mint("default", "app", 600).unwrap();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("", good.clone(), 400, "missing role"),
        ("app", String::new(), 400, "missing jwt"),
        ("nope", good.clone(), 400, "invalid role name \"nope\""),
        ("app", "not.a.jwt".into(), 403, "permission denied"),
        ("app", format!("{}x", &good[..good.len() - 2]), 403, "permission denied"),
        ("app", sign(&|c| c["exp"] = json!(now - 120)), 403, "invalid expiration time (exp) claim: token is expired"),
        ("app", sign(&|c| c["nbf"] = json!(now + 600)), 403, "invalid not before (nbf) claim: token not yet valid"),
        (
            "app",
            sign(&|c| c["iat"] = json!(now + 600)),
            403,
            "invalid issued at (iat) claim: token issued in the future",
        ),
        (
            "app",
            sign(&|c| c["aud"] = json!(["other"])),
            403,
            "invalid audience (aud) claim: audience claim does not match any expected audience",
        ),
        (
            "app",
            sign(&|c| c["kubernetes.io"]["serviceaccount"]["name"] = json!("intruder")),
            403,
            "service account name not authorized",
        ),
        ("app", sign(&|c| c["kubernetes.io"]["namespace"] = json!("kube-system")), 403, "namespace not authorized"),
        (
            "app",
            sign(&|c| c["kubernetes.io"]["serviceaccount"]["uid"] = Value::Null),
            500,
            "could not parse UID from claims",
        ),
    ];
    for (role, jwt, status, text) in cases {
        let (s, b) = login_with(&api, role, &jwt).await;
        assert_eq!((s, b), (status, json!({"errors": [text]})), "role={role:?} expected {text:?}");
    }
    // Issuer checked only when configured and validation enabled.
    api.ok(
        "POST",
        "auth/kubernetes/config",
        Some(json!({"kubernetes_host": "https://k", "kubernetes_ca_cert": iss.certificate_pem(), "pem_keys": [iss.public_pem()], "issuer": "https://other", "disable_iss_validation": false})),
    )
    .await;
    let (s, b) = login_with(&api, "app", &good).await;
    assert_eq!((s, b), (403, json!({"errors": ["invalid issuer (iss) claim"]})));
}

#[tokio::test]
async fn config_and_role_validation() {
    let (_v, api) = vault().await;
    api.ok("POST", "sys/auth/kubernetes", Some(json!({"type": "kubernetes"}))).await;
    let (s, b) = login_with(&api, "app", "x").await;
    assert_eq!((s, b), (400, json!({"errors": ["invalid role name \"app\""]})));
    api.ok(
        "POST",
        "auth/kubernetes/role/app",
        Some(json!({"bound_service_account_names": "*", "bound_service_account_namespaces": "*"})),
    )
    .await;
    let (s, b) = login_with(&api, "app", "x").await;
    assert_eq!((s, b), (500, json!({"errors": ["could not load backend configuration"]})));
    let (s, b) = api.call("POST", "auth/kubernetes/config", Some(json!({}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["no host provided"]})));
    // Outside a pod there is no local CA to fall back on, as on OpenBao.
    let (s, b) = api.call("POST", "auth/kubernetes/config", Some(json!({"kubernetes_host": "h"}))).await;
    let no_ca = "open /var/run/secrets/kubernetes.io/serviceaccount/ca.crt: no such file or directory";
    assert_eq!((s, b), (400, json!({"errors": [no_ca]})));
    let (s, b) = api
        .call("POST", "auth/kubernetes/config", Some(json!({"kubernetes_host": "h", "disable_local_ca_jwt": true})))
        .await;
    assert_eq!(
        (s, b),
        (400, json!({"errors": ["kubernetes_ca_cert must be given when disable_local_ca_jwt is true"]}))
    );
    let ca = ServiceAccountIssuer::generate(SigningAlg::Es256).unwrap().certificate_pem().to_string();
    let (s, b) = api
        .call(
            "POST",
            "auth/kubernetes/config",
            Some(json!({"kubernetes_host": "h", "kubernetes_ca_cert": ca, "pem_keys": ["garbage"]})),
        )
        .await;
    assert_eq!((s, b), (400, json!({"errors": ["data does not contain any valid RSA or ECDSA public keys"]})));
    let (s, b) =
        api.call("POST", "auth/kubernetes/role/x", Some(json!({"bound_service_account_namespaces": "a"}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["\"bound_service_account_names\" can not be empty"]})));
    let (s, b) = api
        .call(
            "POST",
            "auth/kubernetes/role/x",
            Some(json!({"bound_service_account_names": "a", "bound_service_account_namespaces": "b", "token_ttl": "2h", "token_max_ttl": "1h"})),
        )
        .await;
    assert_eq!((s, b), (400, json!({"errors": ["token ttl should not be greater than token max ttl"]})));
    let role = api.ok("GET", "auth/kubernetes/role/app", None).await;
    assert_eq!(role["data"]["bound_service_account_names"], json!(["*"]));
}

#[tokio::test]
async fn token_max_ttl_caps_renewal_and_expiry_revokes_token() {
    let (_v, api) = vault().await;
    let iss = issuer();
    with_kubernetes(&api, &iss, "2s", "3s").await;
    let (me, auth) = common::login(&api, &iss).await;
    assert_eq!(auth["lease_duration"], 2);
    let r = me.ok("PUT", "auth/token/renew-self", Some(json!({"increment": 60}))).await;
    let ttl = r["auth"]["lease_duration"].as_i64().unwrap();
    assert!(ttl <= 3, "{ttl}");
    assert!(r["warnings"][0].as_str().unwrap().starts_with("TTL of \"1m\" exceeded the effective max_ttl of"));
    let expired = common::eventually(6, async || me.call("GET", "auth/token/lookup-self", None).await.0 == 403).await;
    assert!(expired, "token revoked at its max TTL");
}
