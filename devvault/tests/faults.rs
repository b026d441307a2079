//! The test extensions: faults (status, delay, dropped connection) and the
//! request log.

mod common;

use common::vault;
use serde_json::json;

#[tokio::test]
async fn status_fault_answers_n_times_then_clears() {
    let (_v, api) = vault().await;
    api.ok(
        "POST",
        "sys/devvault/faults",
        Some(json!({"path_prefix": "sys/health", "method": "GET", "status": 503, "errors": ["Vault is sealed"], "count": 2})),
    )
    .await;
    let listed = api.ok("GET", "sys/devvault/faults", None).await;
    assert_eq!(listed["data"]["faults"][0]["count"], 2);
    for _ in 0..2 {
        let (s, b) = api.call("GET", "sys/health", None).await;
        assert_eq!((s, b), (503, json!({"errors": ["Vault is sealed"]})));
    }
    // Method filter: HEAD does not match the GET fault (and the fault is used up anyway).
    let (s, _) = api.call("GET", "sys/health", None).await;
    assert_eq!(s, 200);
    let listed = api.ok("GET", "sys/devvault/faults", None).await;
    assert_eq!(listed["data"]["faults"], json!([]));
}

#[tokio::test]
async fn delay_fault_holds_then_proceeds() {
    let (_v, api) = vault().await;
    api.ok("POST", "sys/devvault/faults", Some(json!({"path_prefix": "sys/health", "delay_ms": 300, "count": 1})))
        .await;
    let start = std::time::Instant::now();
    let (s, _) = api.call("GET", "sys/health", None).await;
    assert_eq!(s, 200);
    assert!(start.elapsed() >= std::time::Duration::from_millis(300), "the delay was applied");
}

#[tokio::test]
async fn drop_fault_closes_the_connection_unanswered() {
    let (v, api) = vault().await;
    api.ok("POST", "sys/devvault/faults", Some(json!({"path_prefix": "sys/health", "drop": true, "count": 1}))).await;
    let err = reqwest::get(format!("{}/v1/sys/health", v.url())).await.expect_err("connection dropped");
    assert!(!err.is_status());
    let (s, _) = api.call("GET", "sys/health", None).await;
    assert_eq!(s, 200);
    let (s, _) = api.call("DELETE", "sys/devvault/faults", None).await;
    assert_eq!(s, 204);
}

#[tokio::test]
async fn request_log_records_every_request_without_tokens() {
    let (_v, api) = vault().await;
    let created = api.ok("POST", "auth/token/create", Some(json!({"ttl": "1h", "policies": ["default"]}))).await;
    let token = created["auth"]["client_token"].as_str().unwrap().to_string();
    let accessor = created["auth"]["accessor"].as_str().unwrap().to_string();
    let user = api.with_token(&token);
    user.ok("GET", "auth/token/lookup-self", None).await;
    let (s, _) = user.call("GET", "database/creds/x", None).await;
    assert_eq!(s, 403);
    api.ok(
        "POST",
        "sys/devvault/faults",
        Some(json!({"path_prefix": "auth/token/renew-self", "status": 503, "count": 1})),
    )
    .await;
    let (s, _) = user.call("PUT", "auth/token/renew-self", None).await;
    assert_eq!(s, 503);
    let log = api.requests().await;
    let text = serde_json::to_string(&log).unwrap();
    assert!(!text.contains(&token), "no token value in the log");
    let rows: Vec<(String, String, u64, String)> = log
        .iter()
        .map(|e| {
            (
                e["method"].as_str().unwrap().into(),
                e["path"].as_str().unwrap().into(),
                e["status"].as_u64().unwrap(),
                e["accessor"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(rows.contains(&("GET".into(), "auth/token/lookup-self".into(), 200, accessor.clone())));
    assert!(rows.contains(&("GET".into(), "database/creds/x".into(), 403, accessor.clone())));
    assert!(rows.contains(&("PUT".into(), "auth/token/renew-self".into(), 503, String::new())));
    let time = log[0]["time"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok() && time.len() == 24, "{time}");
    api.ok("DELETE", "sys/devvault/requests", None).await;
    let log = api.requests().await;
    assert_eq!(log.len(), 1, "only the GET that read it: {log:?}");
}

#[tokio::test]
async fn an_after_fault_lets_the_server_act_and_replaces_its_answer() {
    let (_v, api) = vault().await;
    let fault = json!({"path_prefix": "sys/policies/acl/x", "method": "PUT", "after": true, "status": 503, "errors": ["lost"], "count": 1});
    api.ok("POST", "sys/devvault/faults", Some(fault)).await;
    let (s, b) = api
        .call("PUT", "sys/policies/acl/x", Some(json!({"policy": "path \"a\" { capabilities = [\"read\"] }"})))
        .await;
    assert_eq!((s, b), (503, json!({"errors": ["lost"]})));
    // The write happened although the client was told otherwise.
    assert_eq!(api.call("GET", "sys/policies/acl/x", None).await.0, 200);
    let log = api.requests().await;
    assert!(log.iter().any(|e| e["path"] == "sys/policies/acl/x" && e["status"] == 503));
}
