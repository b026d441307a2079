//! The PostgreSQL plugin against a real PostgreSQL: roles created, renewed,
//! capped, expired and revoked as Vault's plugin does.

mod common;

use common::{eventually, issuer, login, vault, with_kubernetes};
use devvault::testing::{setup_postgres, shared_cluster};
use serde_json::json;

/// Role `app` (1h/24h) on the shared cluster and a token of SA `default/app`.
async fn app_on_postgres(api: &devvault::testing::Api, pg: &devvault::testing::PgCluster) -> devvault::testing::Api {
    setup_postgres(api, pg, "app", "1h", "24h").await;
    let iss = issuer();
    with_kubernetes(api, &iss, "1h", "2h").await;
    login(api, &iss).await.0
}

#[tokio::test]
async fn creds_create_a_role_that_can_log_in() {
    let pg = shared_cluster();
    let (_v, api) = vault().await;
    let me = app_on_postgres(&api, pg).await;
    let creds = me.ok("GET", "database/creds/app", None).await;
    let user = creds["data"]["username"].as_str().unwrap();
    let password = creds["data"]["password"].as_str().unwrap();
    assert!(user.starts_with("v-kubernet-app-"), "{user}");
    let client = pg.connect(user, password).await.expect("issued credentials log in");
    let row = client.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), user);
    // VALID UNTIL = now + ttl + 5 s.
    let until = pg.valid_until(user).await.expect("VALID UNTIL set");
    let expect = chrono::Utc::now().timestamp() + 3600 + 5;
    assert!((until - expect).abs() <= 2, "valid until {until}, expected ~{expect}");
    assert!(pg.connect(user, "wrong-password").await.is_err());
}

#[tokio::test]
async fn renew_moves_valid_until_and_caps_at_max_ttl() {
    let pg = shared_cluster();
    let (_v, api) = vault().await;
    setup_postgres(&api, pg, "short", "10s", "40s").await;
    let creds = api.ok("GET", "database/creds/short", None).await;
    let user = creds["data"]["username"].as_str().unwrap().to_string();
    let before = pg.valid_until(&user).await.unwrap();
    let r = api.ok("PUT", "sys/leases/renew", Some(json!({"lease_id": creds["lease_id"], "increment": 30}))).await;
    assert_eq!(r["lease_duration"], 30);
    assert_eq!(r["warnings"], serde_json::Value::Null);
    let after = pg.valid_until(&user).await.unwrap();
    assert!(after - before >= 19, "VALID UNTIL moved from {before} to {after}");
    let r = api.ok("PUT", "sys/leases/renew", Some(json!({"lease_id": creds["lease_id"], "increment": 3600}))).await;
    let ttl = r["lease_duration"].as_i64().unwrap();
    assert!((38..=40).contains(&ttl), "{ttl}");
    let w = r["warnings"][0].as_str().unwrap();
    assert_eq!(
        w,
        format!("TTL of \"1h\" exceeded the effective max_ttl of \"{ttl}s\"; TTL value is capped accordingly")
    );
    assert!(w.ends_with("s\"; TTL value is capped accordingly"), "{w}");
}

#[tokio::test]
async fn lease_expiry_drops_the_role() {
    let pg = shared_cluster();
    let (_v, api) = vault().await;
    setup_postgres(&api, pg, "tiny", "2s", "10s").await;
    let creds = api.ok("GET", "database/creds/tiny", None).await;
    let user = creds["data"]["username"].as_str().unwrap().to_string();
    assert!(pg.role_exists(&user).await);
    assert!(eventually(8, async || !pg.role_exists(&user).await).await, "role dropped after the 2 s lease expired");
    let (s, b) = api.call("PUT", "sys/leases/renew", Some(json!({"lease_id": creds["lease_id"]}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["lease not found"]})));
}

#[tokio::test]
async fn revoke_self_drops_the_roles_of_the_tokens_leases() {
    let pg = shared_cluster();
    let (_v, api) = vault().await;
    let me = app_on_postgres(&api, pg).await;
    let mut users = Vec::new();
    for _ in 0..2 {
        let creds = me.ok("GET", "database/creds/app", None).await;
        users.push(creds["data"]["username"].as_str().unwrap().to_string());
    }
    let (s, _) = me.call("PUT", "auth/token/revoke-self", None).await;
    assert_eq!(s, 204);
    for user in &users {
        assert!(eventually(5, async || !pg.role_exists(user).await).await, "{user} dropped with its token");
    }
}

#[tokio::test]
async fn sync_revoke_drops_before_answering_and_default_revocation_works() {
    let pg = shared_cluster();
    let (_v, api) = vault().await;
    setup_postgres(&api, pg, "app", "1h", "24h").await;
    // A role without revocation statements uses the plugin's default.
    api.ok("POST", "database/roles/app", Some(json!({"revocation_statements": []}))).await;
    let creds = api.ok("GET", "database/creds/app", None).await;
    let user = creds["data"]["username"].as_str().unwrap().to_string();
    let (s, _) = api.call("PUT", "sys/leases/revoke", Some(json!({"lease_id": creds["lease_id"]}))).await;
    assert_eq!(s, 204);
    assert!(!pg.role_exists(&user).await, "dropped before the 204");
}

#[tokio::test]
async fn rotate_root_changes_the_admin_password() {
    let pg = shared_cluster();
    let (_v, api) = vault().await;
    setup_postgres(&api, pg, "app", "1h", "24h").await;
    let cfg = api.ok("GET", "database/config/db", None).await;
    assert!(cfg["data"]["connection_details"].get("password").is_none());
    let admin = cfg["data"]["connection_details"]["username"].as_str().unwrap().to_string();
    let (s, _) = api.call("POST", "database/rotate-root/db", None).await;
    assert_eq!(s, 204);
    // The old password no longer works; devvault still issues credentials.
    let creds = api.ok("GET", "database/creds/app", None).await;
    assert!(pg.role_exists(creds["data"]["username"].as_str().unwrap()).await);
    assert!(pg.roles_like(&admin).await.contains(&admin));
}

#[tokio::test]
async fn bad_connection_is_reported_without_the_password() {
    let pg = shared_cluster();
    let (_v, api) = vault().await;
    api.ok("POST", "sys/mounts/database", Some(json!({"type": "database"}))).await;
    let (s, b) = api
        .call(
            "POST",
            "database/config/db",
            Some(json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": pg.templated_url("postgres"),
                "username": "postgres",
                "password": "Secret-Wrong-Pass",
            })),
        )
        .await;
    assert_eq!(s, 400);
    let text = b["errors"][0].as_str().unwrap();
    assert!(text.starts_with("error creating database object: error verifying connection:"), "{text}");
    assert!(!text.contains("Secret-Wrong-Pass"));
    let (s, b) =
        api.call("POST", "database/config/x", Some(json!({"plugin_name": "postgresql-database-plugin"}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["error creating database object: connection_url cannot be empty"]})));
}

#[tokio::test]
async fn concurrent_revocations_of_one_lease_all_succeed() {
    // Vault serialises work on a lease: whoever comes second finds it gone
    // and succeeds, rather than revoking an already dropped user.
    let pg = shared_cluster();
    let (_v, api) = vault().await;
    let me = app_on_postgres(&api, pg).await;
    let creds = me.ok("GET", "database/creds/app", None).await;
    let user = creds["data"]["username"].as_str().unwrap().to_string();
    let body = json!({"lease_id": creds["lease_id"]});
    let mut calls = Vec::new();
    for _ in 0..6 {
        let (api, body) = (api.clone(), body.clone());
        calls.push(tokio::spawn(async move { api.call("PUT", "sys/leases/revoke", Some(body)).await }));
    }
    // And the token's end revokes it from the expiry job at the same time.
    let (s, _) = me.call("PUT", "auth/token/revoke-self", None).await;
    assert_eq!(s, 204);
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 204, "{body}");
    }
    assert!(eventually(5, async || !pg.role_exists(&user).await).await);
}
