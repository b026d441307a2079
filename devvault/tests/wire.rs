//! Vault's wire conventions: envelopes, headers, status codes and error
//! texts for good and bad input. No database needed (memory plugin).

mod common;

use common::{APP_POLICY, vault};
use serde_json::json;

async fn memory_db(api: &devvault::testing::Api) {
    devvault::testing::setup_memory(api, "app", "1h", "2h").await;
}

#[tokio::test]
async fn health_and_headers() {
    let (v, api) = vault().await;
    let resp = reqwest::get(format!("{}/v1/sys/health", v.url())).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["initialized"], true);
    assert_eq!(body["sealed"], false);
    let (status, body) = api.call("HEAD", "sys/health", None).await;
    assert_eq!((status, body), (200, serde_json::Value::Null));
    let (status, _) = api.call("GET", "sys/health?activecode=299", None).await;
    assert_eq!(status, 299);
}

#[tokio::test]
async fn envelope_shape_of_creds() {
    let (_v, api) = vault().await;
    memory_db(&api).await;
    let body = api.ok("GET", "database/creds/app", None).await;
    for key in ["request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info", "warnings", "auth"] {
        assert!(body.get(key).is_some(), "missing {key}: {body}");
    }
    assert!(body.get("mount_type").is_none(), "OpenBao sends no mount_type");
    let lease = body["lease_id"].as_str().unwrap();
    let tail = lease.strip_prefix("database/creds/app/").expect("lease id prefix");
    assert_eq!(tail.len(), 24);
    assert!(tail.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(body["lease_duration"], 3600);
    assert_eq!(body["renewable"], true);
    assert_eq!(body["warnings"], serde_json::Value::Null);
    let user = body["data"]["username"].as_str().unwrap();
    assert!(user.starts_with("v-root-app-"), "{user}");
    let password = body["data"]["password"].as_str().unwrap();
    assert_eq!(password.len(), 20);
}

#[tokio::test]
async fn bad_input_gets_vault_errors() {
    let (_v, api) = vault().await;
    memory_db(&api).await;

    let (s, b) = api.raw("PUT", "sys/leases/renew", Some("{not json".into())).await;
    assert_eq!(s, 400);
    assert!(b["errors"][0].as_str().unwrap().starts_with("failed to decode JSON input: "), "{b}");

    let (s, b) = api.raw("PUT", "sys/leases/renew", Some("[1,2]".into())).await;
    let go = "failed to decode JSON input: json: cannot unmarshal array into Go value of type map[string]interface {}";
    assert_eq!((s, b), (400, json!({"errors": [go]})));

    let (s, b) = api.call("PUT", "sys/leases/renew", Some(json!({"lease_id": "x", "increment": "soon"}))).await;
    assert_eq!(s, 400);
    let text = b["errors"][0].as_str().unwrap();
    assert_eq!(
        text,
        "Field validation failed: error converting input for field \"increment\": time: invalid duration \"soon\""
    );

    let (s, b) = api.call("GET", "database/creds/nope", None).await;
    assert_eq!((s, b), (400, json!({"errors": ["unknown role: nope"]})));

    api.ok("POST", "database/roles/orphan", Some(json!({"db_name": "missing", "creation_statements": "x"}))).await;
    let (s, b) = api.call("GET", "database/creds/orphan", None).await;
    assert_eq!(s, 500);
    assert_eq!(b["errors"][0], "1 error occurred:\n\t* could not find connection with name \"missing\"\n\n");

    api.ok("POST", "database/roles/other", Some(json!({"db_name": "mem", "creation_statements": "x"}))).await;
    let (s, b) = api.call("GET", "database/creds/other", None).await;
    assert_eq!((s, b), (500, json!({"errors": ["1 error occurred:\n\t* \"other\" is not an allowed role\n\n"]})));

    let (s, b) = api.call("POST", "database/roles/nodb", Some(json!({"creation_statements": "x"}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["database name is required"]})));

    let (s, b) = api.call("POST", "database/creds/app", None).await;
    assert_eq!((s, b), (405, json!({"errors": ["1 error occurred:\n\t* unsupported operation\n\n"]})));

    let (s, b) = api.call("GET", "database/bogus/x", None).await;
    assert_eq!((s, b), (404, json!({"errors": ["1 error occurred:\n\t* unsupported path\n\n"]})));

    let (s, b) = api.call("GET", "nomount/x", None).await;
    assert_eq!((s, b), (404, json!({"errors": ["no handler for route \"nomount/x\". route entry not found."]})));

    let (s, b) = api.call("GET", "database/roles/absent", None).await;
    assert_eq!((s, b), (404, json!({"errors": []})));

    let (s, b) = api.call("TRACE", "sys/health", None).await;
    assert_eq!((s, b), (405, json!({"errors": []})));

    let (s, b) = api.call("POST", "database/roles/", Some(json!({}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["cannot write to a path ending in '/'"]})));
}

#[tokio::test]
async fn missing_or_unknown_token_is_denied() {
    let (v, api) = vault().await;
    memory_db(&api).await;
    let anon = devvault::testing::Api::new(&v.url(), None);
    let (s, b) = anon.call("GET", "database/creds/app", None).await;
    assert_eq!((s, b), (403, json!({"errors": ["permission denied"]})));
    let (s, b) = api.with_token("hvs.unknown").call("GET", "auth/token/lookup-self", None).await;
    assert_eq!((s, b), (403, json!({"errors": ["permission denied"]})));
    // Test extensions are for the root token only.
    let (s, _) = anon.call("GET", "sys/devvault/requests", None).await;
    assert_eq!(s, 403);
}

#[tokio::test]
async fn acl_denies_what_policies_do_not_grant() {
    let (_v, api) = vault().await;
    memory_db(&api).await;
    api.ok("POST", "database/roles/other", Some(json!({"db_name": "mem", "creation_statements": "x"}))).await;
    api.ok("POST", "database/config/mem", Some(json!({"allowed_roles": "*"}))).await;
    api.ok("PUT", "sys/policies/acl/app", Some(json!({"policy": APP_POLICY}))).await;
    let created = api.ok("POST", "auth/token/create", Some(json!({"policies": ["app"], "ttl": "1h"}))).await;
    assert_eq!(created["auth"]["policies"], json!(["app", "default"]));
    let app = api.with_token(created["auth"]["client_token"].as_str().unwrap());
    let creds = app.ok("GET", "database/creds/app", None).await;
    let (s, b) = app.call("GET", "database/creds/other", None).await;
    assert_eq!((s, b), (403, json!({"errors": ["1 error occurred:\n\t* permission denied\n\n"]})));
    // The default policy: lookup-self and renew allowed; listing leases not.
    app.ok("GET", "auth/token/lookup-self", None).await;
    app.ok("PUT", "sys/leases/renew", Some(json!({"lease_id": creds["lease_id"]}))).await;
    let (s, _) = app.call("LIST", "sys/leases/lookup/database/creds/app", None).await;
    assert_eq!(s, 403);
    let (s, _) = app.call("PUT", "sys/policies/acl/evil", Some(json!({"policy": ""}))).await;
    assert_eq!(s, 403);
    let (s, b) = api
        .call("PUT", "sys/policies/acl/bad", Some(json!({"policy": "path \"x\" { capabilities = [\"fly\"] }"})))
        .await;
    assert_eq!(s, 400);
    assert!(b["errors"][0].as_str().unwrap().starts_with("failed to parse policy"));
}

#[tokio::test]
async fn renew_caps_with_vault_warning_and_lookup_shape() {
    let (_v, api) = vault().await;
    memory_db(&api).await;
    let creds = api.ok("GET", "database/creds/app", None).await;
    let lease = creds["lease_id"].clone();
    let r = api.ok("PUT", "sys/leases/renew", Some(json!({"lease_id": lease, "increment": "3h"}))).await;
    let ttl = r["lease_duration"].as_i64().unwrap();
    assert!((7198..=7200).contains(&ttl), "{ttl}");
    let warning = r["warnings"][0].as_str().unwrap();
    // Right after issue the whole max TTL is left, printed as OpenBao does.
    assert_eq!(warning, "TTL of \"3h\" exceeded the effective max_ttl of \"2h\"; TTL value is capped accordingly");
    // Path-suffix form and an ignored parameter.
    let path = format!("sys/leases/renew/{}", lease.as_str().unwrap());
    let r = api.ok("POST", &path, Some(json!({"bogus": 1}))).await;
    assert_eq!(r["lease_duration"], 3600);
    let l = api.ok("PUT", "sys/leases/lookup", Some(json!({"lease_id": lease}))).await;
    for key in ["id", "issue_time", "expire_time", "last_renewal", "renewable", "ttl"] {
        assert!(l["data"].get(key).is_some(), "lookup lacks {key}");
    }
    assert!(l["data"]["last_renewal"].is_string());
    let (s, b) = api.call("PUT", "sys/leases/lookup", Some(json!({"lease_id": "database/creds/app/nope"}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["invalid lease"]})));
    // Revoke: known → 204 and gone; unknown → 204 as in Vault.
    let (s, _) = api.call("PUT", "sys/leases/revoke", Some(json!({"lease_id": lease}))).await;
    assert_eq!(s, 204);
    let (s, _) = api.call("PUT", "sys/leases/revoke", Some(json!({"lease_id": "database/creds/app/unknown"}))).await;
    assert_eq!(s, 204);
    let (s, b) = api.call("PUT", "sys/leases/renew", Some(json!({"lease_id": lease}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["lease not found"]})));
    let (s, b) = api.call("PUT", "sys/leases/renew", Some(json!({}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["lease_id must be specified"]})));
}

#[tokio::test]
async fn token_renew_caps_and_revoke_self_revokes_leases() {
    let (v, api) = vault().await;
    memory_db(&api).await;
    api.ok("PUT", "sys/policies/acl/app", Some(json!({"policy": APP_POLICY}))).await;
    let created = api
        .ok("POST", "auth/token/create", Some(json!({"policies": "app", "ttl": "10m", "explicit_max_ttl": "20m"})))
        .await;
    let app = api.with_token(created["auth"]["client_token"].as_str().unwrap());
    let r = app.ok("PUT", "auth/token/renew-self", Some(json!({"increment": "1h"}))).await;
    let ttl = r["auth"]["lease_duration"].as_i64().unwrap();
    assert!((1198..=1200).contains(&ttl), "{ttl}");
    let w = r["warnings"][0].as_str().unwrap();
    assert_eq!(w, "TTL of \"1h\" exceeded the effective max_ttl of \"20m\"; TTL value is capped accordingly");
    assert_eq!(r["auth"]["token_policies"], json!(["app", "default"]));
    let look = app.ok("GET", "auth/token/lookup-self", None).await;
    assert_eq!(look["data"]["display_name"], "token");
    assert!(look["data"]["last_renewal"].is_string());
    app.ok("GET", "database/creds/app", None).await;
    app.ok("GET", "database/creds/app", None).await;
    assert_eq!(v.memory_users().len(), 2);
    let (s, _) = app.call("POST", "auth/token/revoke-self", None).await;
    assert_eq!(s, 204);
    assert!(common::eventually(5, async || v.memory_users().is_empty()).await, "leases of the token revoked");
    let (s, b) = app.call("GET", "auth/token/lookup-self", None).await;
    assert_eq!((s, b), (403, json!({"errors": ["permission denied"]})));
}

#[tokio::test]
async fn ignored_parameters_warning() {
    let (_v, api) = vault().await;
    api.ok("POST", "sys/auth/kubernetes", Some(json!({"type": "kubernetes"}))).await;
    let r = api
        .ok(
            "POST",
            "auth/kubernetes/role/r",
            Some(json!({"bound_service_account_names": "a", "bound_service_account_namespaces": "b", "zzz": 1, "aaa": 2})),
        )
        .await;
    let warnings = r["warnings"].as_array().unwrap();
    assert!(warnings[0].as_str().unwrap().starts_with("Role r does not have an audience configured."));
    assert_eq!(warnings[1], "Endpoint ignored these unrecognized parameters: [aaa zzz]");
    let (s, b) = api.call("POST", "sys/auth/kubernetes", Some(json!({"type": "kubernetes"}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["path is already in use at auth/kubernetes/"]})));
}

#[tokio::test]
async fn kv_v2_versions_without_leases() {
    let (_v, api) = vault().await;
    let (s, b) = api.call("POST", "sys/mounts/kv", Some(json!({"type": "kv"}))).await;
    assert_eq!(s, 400, "{b}");
    api.ok("POST", "sys/mounts/kv", Some(json!({"type": "kv", "options": {"version": "2"}}))).await;
    let w = api.ok("POST", "kv/data/app", Some(json!({"data": {"api_key": "one"}}))).await;
    assert_eq!(w["data"]["version"], 1);
    api.ok("POST", "kv/data/app", Some(json!({"data": {"api_key": "two"}}))).await;
    let r = api.ok("GET", "kv/data/app", None).await;
    assert_eq!(r["data"]["data"]["api_key"], "two");
    assert_eq!(r["data"]["metadata"]["version"], 2);
    assert_eq!(r["lease_id"], "");
    assert_eq!(r["lease_duration"], 0);
    let old = api.ok("GET", "kv/data/app?version=1", None).await;
    assert_eq!(old["data"]["data"]["api_key"], "one");
    let (s, b) = api.call("POST", "kv/data/app", Some(json!({"api_key": "flat"}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["no data provided"]})));
    let keys = api.ok("LIST", "kv/metadata", None).await;
    assert_eq!(keys["data"]["keys"], json!(["app"]));
    api.ok("DELETE", "kv/data/app", None).await;
    let (s, b) = api.call("GET", "kv/data/app", None).await;
    assert_eq!((s, b), (404, json!({"errors": []})));
    let (s, _) = api.call("GET", "kv/data/nothing", None).await;
    assert_eq!(s, 404);
}
