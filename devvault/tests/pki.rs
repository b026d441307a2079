//! The PKI engine: certificates issued by POST with a body, Vault's name
//! and TTL rules, and leased certificates (not renewable, revoked with their
//! lease or at expiry).

mod common;

use common::{eventually, vault};
use devvault::testing::setup_pki;
use serde_json::json;

#[tokio::test]
async fn issue_returns_a_certificate_signed_by_the_root_with_vaults_fields() {
    let (_v, api) = vault().await;
    setup_pki(&api, "web", "1h", "10m", false).await;
    let body =
        json!({"common_name": "app.example.com", "alt_names": "api.example.com", "ip_sans": "127.0.0.1", "ttl": "5m"});
    let r = api.ok("POST", "pki/issue/web", Some(body)).await;
    assert_eq!(r["lease_id"], "", "no lease without generate_lease");
    assert!(r.get("mount_type").is_none(), "OpenBao sends no mount_type");
    let d = &r["data"];
    assert!(d["certificate"].as_str().unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(d["private_key"].as_str().unwrap().contains("PRIVATE KEY-----"));
    assert_eq!(d["private_key_type"], "ec");
    assert_eq!(d["ca_chain"][0], d["issuing_ca"]);
    let serial = d["serial_number"].as_str().unwrap();
    assert_eq!(serial.split(':').count(), 20, "{serial}");
    let expires = d["expiration"].as_i64().unwrap() - chrono::Utc::now().timestamp();
    assert!((295..=300).contains(&expires), "{expires}");
    // The certificate is stored and served without a token.
    let anon = devvault::testing::Api::new(&api.base, None);
    let cert = anon.ok("GET", &format!("pki/cert/{serial}"), None).await;
    assert_eq!(cert["data"]["certificate"], d["certificate"]);
    assert_eq!(cert["data"]["revocation_time"], 0);
}

#[tokio::test]
async fn names_and_ttls_follow_the_role() {
    let (_v, api) = vault().await;
    setup_pki(&api, "web", "1h", "10m", false).await;
    let (s, b) = api.call("POST", "pki/issue/web", Some(json!({"common_name": "evil.org"}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["common name evil.org not allowed by this role"]})));
    let (s, b) =
        api.call("POST", "pki/issue/web", Some(json!({"common_name": "a.example.com", "alt_names": "x.org"}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["subject alternate name x.org not allowed by this role"]})));
    let (s, b) = api.call("POST", "pki/issue/nope", Some(json!({"common_name": "a.example.com"}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["unknown role: nope"]})));
    let (s, _) = api.call("POST", "pki/issue/web", Some(json!({}))).await;
    assert_eq!(s, 400);
    // Asking past the role's max_ttl is capped with Vault's warning.
    let r = api.ok("POST", "pki/issue/web", Some(json!({"common_name": "a.example.com", "ttl": "2h"}))).await;
    assert_eq!(
        r["warnings"],
        json!(["TTL \"2h0m0s\" is longer than permitted maxTTL \"10m0s\", so maxTTL is being used"])
    );
    let left = r["data"]["expiration"].as_i64().unwrap() - chrono::Utc::now().timestamp();
    assert!((595..=600).contains(&left), "{left}");
    // Beyond the CA's own end is refused.
    api.ok("POST", "pki/roles/long", Some(json!({"allow_any_name": true, "key_type": "ec", "max_ttl": "48h"}))).await;
    let (s, b) = api.call("POST", "pki/issue/long", Some(json!({"common_name": "x", "ttl": "24h"}))).await;
    assert_eq!(s, 400);
    assert!(b["errors"][0].as_str().unwrap().contains("beyond the expiration of the CA certificate"), "{b}");
}

#[tokio::test]
async fn a_leased_certificate_is_not_renewable_and_revoked_with_its_lease_or_at_expiry() {
    let (_v, api) = vault().await;
    setup_pki(&api, "web", "1h", "10m", true).await;
    let r = api.ok("POST", "pki/issue/web", Some(json!({"common_name": "app.example.com", "ttl": "60s"}))).await;
    let lease = r["lease_id"].as_str().unwrap();
    assert!(lease.starts_with("pki/issue/web/"), "{lease}");
    assert_eq!(r["renewable"], false);
    assert!((58..=60).contains(&r["lease_duration"].as_i64().unwrap()), "{r}");
    let (s, b) = api.call("PUT", "sys/leases/renew", Some(json!({"lease_id": lease}))).await;
    assert_eq!((s, b), (400, json!({"errors": ["lease is not renewable"]})));
    let serial = r["data"]["serial_number"].as_str().unwrap();
    let (s, _) = api.call("PUT", "sys/leases/revoke", Some(json!({"lease_id": lease}))).await;
    assert_eq!(s, 204);
    let cert = api.ok("GET", &format!("pki/cert/{serial}"), None).await;
    assert!(cert["data"]["revocation_time"].as_i64().unwrap() > 0, "revoked with its lease");

    // At expiry the lease goes, but a certificate within 2 s of its end is
    // not marked revoked (Vault's wiggle room, as OpenBao does).
    let r = api.ok("POST", "pki/issue/web", Some(json!({"common_name": "app.example.com", "ttl": "2s"}))).await;
    let serial = r["data"]["serial_number"].as_str().unwrap().to_string();
    let lease = r["lease_id"].as_str().unwrap().to_string();
    let gone =
        eventually(8, async || api.call("PUT", "sys/leases/lookup", Some(json!({"lease_id": lease}))).await.0 == 400)
            .await;
    assert!(gone, "the lease expired");
    let cert = api.ok("GET", &format!("pki/cert/{serial}"), None).await;
    assert_eq!(cert["data"]["revocation_time"], 0, "a certificate at its end is left unrevoked");
}
