//! The PKI secrets engine, the subset a sidecar uses: a root CA
//! (`root/generate/{internal,exported}`), roles, `issue/<role>` (POST with a
//! body; leased when the role sets `generate_lease`, the lease not renewable
//! and ending with the certificate), revocation by lease, and `cert/<serial>`
//! to see it (vault-api.md §6; OpenBao `builtin/logical/pki`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber, SignatureAlgorithm,
};
use serde_json::json;

use crate::api::{Envelope, Failure, Outcome, Reply};
use crate::core::{Core, LeaseEntry, LeaseKind, Op, Request, TokenEntry};
use crate::fields::Fields;
use crate::ttl::SYSTEM_TTL;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    not_after: DateTime<Utc>,
}

#[derive(Clone)]
struct Role {
    allowed_domains: Vec<String>,
    allow_bare_domains: bool,
    allow_subdomains: bool,
    allow_glob_domains: bool,
    allow_any_name: bool,
    allow_localhost: bool,
    allow_ip_sans: bool,
    key_type: String,
    key_bits: i64,
    ttl: i64,
    max_ttl: i64,
    generate_lease: bool,
    no_store: bool,
}

struct Issued {
    pem: String,
    revoked: Option<DateTime<Utc>>,
    not_after: DateTime<Utc>,
}

#[derive(Default)]
pub struct PkiMount {
    ca: Option<Ca>,
    roles: BTreeMap<String, Role>,
    certs: BTreeMap<String, Issued>,
}

impl PkiMount {
    pub fn has_role(&self, name: &str) -> bool {
        self.roles.contains_key(name)
    }
}

/// Revocation of a leased certificate (at expiry, by lease, with its
/// token). A certificate no longer known counts as revoked, as in Vault;
/// one that ends within 2 s is left as it is (Vault's "wiggle room" for
/// second-granular leases: the lease goes, the certificate stays unrevoked).
pub fn revoke(core: &Core, mount: &str, serial: &str) {
    let mut state = core.state();
    if let Some(cert) = state.mounts.get_mut::<PkiMount>(mount).and_then(|m| m.certs.get_mut(serial))
        && cert.not_after >= Utc::now() + Duration::seconds(2)
    {
        cert.revoked.get_or_insert_with(Utc::now);
    }
}

pub fn handle(core: &Arc<Core>, req: &Request, mount: &str, sub: &str, token: Option<TokenEntry>) -> Outcome {
    let (head, name) = match sub.split_once('/') {
        Some((h, n)) => (h, n.trim_end_matches('/')),
        None => (sub, ""),
    };
    match (head, name, req.op) {
        ("root", "generate/internal" | "generate/exported", Op::Update) => {
            generate_root(core, req, mount, name == "generate/exported")
        }
        ("roles", "", Op::List) => {
            let state = core.state();
            let m = state.mounts.get::<PkiMount>(mount).ok_or_else(Failure::unsupported_path)?;
            crate::core::list_children(m.roles.keys().map(String::as_str), "")
        }
        ("roles", n, Op::Update) if !n.is_empty() => write_role(core, req, mount, n),
        ("roles", n, Op::Read) if !n.is_empty() => read_role(core, mount, n),
        ("roles", n, Op::Delete) if !n.is_empty() => {
            if let Some(m) = core.state().mounts.get_mut::<PkiMount>(mount) {
                m.roles.remove(n);
            }
            Ok(Reply::Empty)
        }
        ("issue", n, Op::Update) if !n.is_empty() => issue(core, req, mount, n, token),
        ("cert", serial, Op::Read) if !serial.is_empty() => read_cert(core, mount, serial),
        ("root" | "roles" | "issue" | "cert", _, _) => Err(Failure::unsupported_operation()),
        _ => Err(Failure::unsupported_path()),
    }
}

fn bad(msg: impl Into<String>) -> Failure {
    Failure::resp(400, msg)
}

fn no_issuer() -> Failure {
    bad("no default issuer currently configured")
}

fn rcgen_failed(e: rcgen::Error) -> Failure {
    Failure::backend(500, format!("error generating certificate: {e}"))
}

/// Vault prints serials as colon-separated lowercase hex bytes.
fn serial_text(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn new_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 20] = rand::random();
    // Positive (X.509) and without a leading zero byte, so the text is the
    // same as Vault's, which prints the integer's minimal bytes.
    bytes[0] = (bytes[0] & 0x7f).max(1);
    (SerialNumber::from_slice(&bytes), serial_text(&bytes))
}

fn key_pair(key_type: &str) -> Result<(KeyPair, &'static str), Failure> {
    let (alg, name): (&'static SignatureAlgorithm, &str) = match key_type {
        "ec" => (&rcgen::PKCS_ECDSA_P256_SHA256, "ec"),
        "rsa" => (&rcgen::PKCS_RSA_SHA256, "rsa"),
        other => return Err(bad(format!("unknown key_type value: {other}"))),
    };
    KeyPair::generate_for(alg).map(|k| (k, name)).map_err(rcgen_failed)
}

fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

fn validity(params: &mut CertificateParams, now: DateTime<Utc>, not_after: DateTime<Utc>) -> Result<(), Failure> {
    let at = |t: DateTime<Utc>| {
        time::OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(|e| bad(format!("invalid time: {e}")))
    };
    // Vault back-dates notBefore by 30 s for clock skew.
    params.not_before = at(now - Duration::seconds(30))?;
    params.not_after = at(not_after)?;
    Ok(())
}

/// Go's `time.Duration` `%q` form, untrimmed (`2h0m0s`), as the PKI
/// warnings print it.
fn go_duration(secs: i64) -> String {
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn generate_root(core: &Arc<Core>, req: &Request, mount: &str, exported: bool) -> Outcome {
    let f = req.fields();
    let cn = f.str("common_name")?;
    if cn.is_empty() {
        return Err(bad("the common_name field is required"));
    }
    let key_type = match f.str("key_type")?.as_str() {
        "" => "rsa".to_string(),
        k => k.to_string(),
    };
    let ttl = match f.duration("ttl")? {
        0 => SYSTEM_TTL,
        t => t,
    };
    let now = Utc::now();
    let not_after = now + Duration::seconds(ttl);
    let (key, key_name) = key_pair(&key_type)?;
    let private_key = key.serialize_pem();
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_failed)?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let (serial, serial_number) = new_serial();
    params.serial_number = Some(serial);
    validity(&mut params, now, not_after)?;
    let issuer = CertifiedIssuer::self_signed(params, key).map_err(rcgen_failed)?;
    let pem = issuer.pem();
    {
        let mut state = core.state();
        let m = state.mounts.get_mut::<PkiMount>(mount).ok_or_else(Failure::unsupported_path)?;
        m.certs.insert(serial_number.clone(), Issued { pem: pem.clone(), revoked: None, not_after });
        m.ca = Some(Ca { issuer, not_after });
    }
    let mut data = json!({
        "certificate": pem,
        "issuing_ca": pem,
        "expiration": not_after.timestamp(),
        "serial_number": serial_number,
        "issuer_id": uuid::Uuid::new_v4().to_string(),
        "issuer_name": "",
        "key_id": uuid::Uuid::new_v4().to_string(),
        "key_name": "",
    });
    if exported {
        data["private_key"] = json!(private_key);
        data["private_key_type"] = json!(key_name);
    }
    // OpenBao's warning for a CA without AIA URLs (devvault has no config/urls).
    let aia = "This mount hasn't configured any authority information access (AIA) fields; this may make it harder \
               for systems to find missing certificates in the chain or to validate revocation status of \
               certificates. Consider updating /config/urls or the newly generated issuer with this information.";
    Ok(Reply::Envelope(Envelope { data: Some(data), warnings: vec![aia.to_string()], ..Default::default() }))
}

const ROLE_FIELDS: &[&str] = &[
    "allowed_domains",
    "allow_bare_domains",
    "allow_subdomains",
    "allow_glob_domains",
    "allow_any_name",
    "allow_localhost",
    "allow_ip_sans",
    "key_type",
    "key_bits",
    "ttl",
    "max_ttl",
    "generate_lease",
    "no_store",
];

fn write_role(core: &Arc<Core>, req: &Request, mount: &str, name: &str) -> Outcome {
    let f = req.fields();
    let key_type = match f.str("key_type")?.as_str() {
        "" => "rsa".to_string(),
        k @ ("rsa" | "ec") => k.to_string(),
        other => return Err(bad(format!("unknown key_type value: {other}"))),
    };
    let key_bits = match (f.str("key_bits")?.parse::<i64>().unwrap_or(0), key_type.as_str()) {
        (0, "rsa") => 2048,
        (0, _) => 256,
        (b, _) => b,
    };
    let role = Role {
        allowed_domains: f.list("allowed_domains")?.unwrap_or_default(),
        allow_bare_domains: f.bool_or("allow_bare_domains", false)?,
        allow_subdomains: f.bool_or("allow_subdomains", false)?,
        allow_glob_domains: f.bool_or("allow_glob_domains", false)?,
        allow_any_name: f.bool_or("allow_any_name", false)?,
        allow_localhost: f.bool_or("allow_localhost", true)?,
        allow_ip_sans: f.bool_or("allow_ip_sans", true)?,
        key_type,
        key_bits,
        ttl: f.duration("ttl")?,
        max_ttl: f.duration("max_ttl")?,
        generate_lease: f.bool_or("generate_lease", false)?,
        no_store: f.bool_or("no_store", false)?,
    };
    if role.max_ttl > 0 && role.ttl > role.max_ttl {
        return Err(bad("\"ttl\" value must be less than \"max_ttl\" value"));
    }
    if role.generate_lease && role.no_store {
        return Err(bad("\"generate_lease\" cannot be set to true if \"no_store\" is set to true"));
    }
    let mut state = core.state();
    let m = state.mounts.get_mut::<PkiMount>(mount).ok_or_else(Failure::unsupported_path)?;
    let generate_lease = role.generate_lease;
    m.roles.insert(name.to_string(), role);
    drop(state);
    // OpenBao answers a role write with the role, as a read would.
    let mut reply = read_role(core, mount, name)?;
    if generate_lease && let Reply::Envelope(env) = &mut reply {
        env.warnings.push(
            "it is encouraged to disable generate_lease and rely on PKI's native capabilities when possible; this \
             option can cause instance-wide issues with large numbers of issued certificates"
                .to_string(),
        );
    }
    Ok(Core::with_ignored(reply, &f, ROLE_FIELDS))
}

fn read_role(core: &Arc<Core>, mount: &str, name: &str) -> Outcome {
    let state = core.state();
    let m = state.mounts.get::<PkiMount>(mount).ok_or_else(Failure::unsupported_path)?;
    let r = m.roles.get(name).ok_or_else(Failure::not_found)?;
    Ok(Reply::Envelope(Envelope::data(json!({
        "allowed_domains": r.allowed_domains,
        "allow_bare_domains": r.allow_bare_domains,
        "allow_subdomains": r.allow_subdomains,
        "allow_glob_domains": r.allow_glob_domains,
        "allow_any_name": r.allow_any_name,
        "allow_localhost": r.allow_localhost,
        "allow_ip_sans": r.allow_ip_sans,
        "key_type": r.key_type,
        "key_bits": r.key_bits,
        "ttl": r.ttl,
        "max_ttl": r.max_ttl,
        "generate_lease": r.generate_lease,
        "no_store": r.no_store,
    }))))
}

/// The role's name rules (`allowed_domains` with bare, subdomain and glob
/// matching, `allow_localhost`, `allow_any_name`).
fn name_allowed(role: &Role, name: &str) -> bool {
    if role.allow_any_name || (role.allow_localhost && name == "localhost") {
        return true;
    }
    role.allowed_domains.iter().any(|d| {
        (role.allow_bare_domains && name == d)
            || (role.allow_subdomains && name.strip_suffix(d.as_str()).is_some_and(|p| p.len() > 1 && p.ends_with('.')))
            || (role.allow_glob_domains && crate::glob::matches(d, name))
    })
}

fn comma_list(f: &Fields, key: &str) -> Result<Vec<String>, Failure> {
    Ok(f.list(key)?.unwrap_or_default().into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
}

fn issue(core: &Arc<Core>, req: &Request, mount: &str, role_name: &str, token: Option<TokenEntry>) -> Outcome {
    let f = req.fields();
    let now = Utc::now();
    let (role, ca_not_after) = {
        let state = core.state();
        let m = state.mounts.get::<PkiMount>(mount).ok_or_else(Failure::unsupported_path)?;
        let role = m.roles.get(role_name).cloned().ok_or_else(|| bad(format!("unknown role: {role_name}")))?;
        let ca = m.ca.as_ref().ok_or_else(no_issuer)?;
        (role, ca.not_after)
    };
    let (cn, alt_names, ips) = requested_names(&f, &role)?;
    let (ttl, warnings) = granted_ttl(&f, &role)?;
    let not_after = now + Duration::seconds(ttl);
    if not_after > ca_not_after {
        let fmt = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        return Err(bad(format!(
            "cannot satisfy request, as TTL would result in notAfter of {} that is beyond the expiration of the CA \
             certificate at {}",
            fmt(not_after),
            fmt(ca_not_after)
        )));
    }
    // Key generation (RSA is slow) runs outside the state lock.
    let (key, key_type) = key_pair(&role.key_type)?;
    let mut sans = vec![cn.clone()];
    sans.extend(alt_names.iter().filter(|n| **n != cn).cloned());
    let mut params = CertificateParams::new(sans).map_err(rcgen_failed)?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names.extend(ips.into_iter().map(SanType::IpAddress));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let (serial, serial_number) = new_serial();
    params.serial_number = Some(serial);
    validity(&mut params, now, not_after)?;
    let mut state = core.state();
    let m = state.mounts.get_mut::<PkiMount>(mount).ok_or_else(Failure::unsupported_path)?;
    let ca = m.ca.as_ref().ok_or_else(no_issuer)?;
    let cert = params.signed_by(&key, &ca.issuer).map_err(rcgen_failed)?;
    let issuing_ca = ca.issuer.pem();
    if !role.no_store {
        m.certs.insert(
            serial_number.clone(),
            Issued { pem: cert.pem(), revoked: None, not_after: whole_seconds(not_after) },
        );
    }
    let data = json!({
        "certificate": cert.pem(),
        "issuing_ca": issuing_ca,
        "ca_chain": [issuing_ca],
        "private_key": key.serialize_pem(),
        "private_key_type": key_type,
        "serial_number": serial_number,
        "expiration": not_after.timestamp(),
        "not_before": (now - Duration::seconds(30)).timestamp(),
    });
    let mut env = Envelope { data: Some(data), warnings, ..Default::default() };
    if role.generate_lease {
        let lease_id = format!("{mount}/issue/{role_name}/{}", crate::ids::base62(24));
        let creator = token.filter(|t| !t.is_root()).map(|t| t.id);
        // The certificate's notAfter has whole seconds: so has its lease.
        let ttl = (whole_seconds(not_after) - now).num_seconds();
        state.leases.insert(
            lease_id.clone(),
            LeaseEntry {
                id: lease_id.clone(),
                mount: mount.to_string(),
                role: role_name.to_string(),
                db_name: String::new(),
                username: String::new(),
                revocation_statements: Vec::new(),
                kind: LeaseKind::Pki { serial: serial_number },
                issue_time: now,
                expire_time: not_after,
                last_renewal: None,
                renewable: false,
                token: creator,
                revoking: false,
                attempts: 0,
                next_attempt: None,
                irrevocable: None,
            },
        );
        drop(state);
        core.expiry_wake.notify_one();
        env.lease_id = lease_id;
        env.lease_duration = ttl;
    }
    Ok(Core::with_ignored(Reply::Envelope(env), &f, &["common_name", "alt_names", "ip_sans", "ttl", "format"]))
}

/// The certificate's common name, alternative names and IP SANs, as the
/// request gives them and the role allows.
fn requested_names(f: &Fields, role: &Role) -> Result<(String, Vec<String>, Vec<IpAddr>), Failure> {
    let cn = f.str("common_name")?;
    if cn.is_empty() {
        return Err(bad(
            "the common_name field is required, or must be provided in a CSR with \"use_csr_common_name\" set to \
             true, unless \"require_cn\" is set to false",
        ));
    }
    if !name_allowed(role, &cn) {
        return Err(bad(format!("common name {cn} not allowed by this role")));
    }
    let alt_names = comma_list(f, "alt_names")?;
    if let Some(bad_name) = alt_names.iter().find(|n| !name_allowed(role, n)) {
        return Err(bad(format!("subject alternate name {bad_name} not allowed by this role")));
    }
    let ip_sans = comma_list(f, "ip_sans")?;
    if !ip_sans.is_empty() && !role.allow_ip_sans {
        return Err(bad(format!(
            "IP Subject Alternative Names are not allowed in this role, but was provided {}",
            ip_sans.join(",")
        )));
    }
    let mut ips = Vec::new();
    for ip in &ip_sans {
        ips.push(ip.parse::<IpAddr>().map_err(|_| bad(format!("the value {ip:?} is not a valid IP address")))?);
    }
    Ok((cn, alt_names, ips))
}

/// The certificate's TTL and Vault's warnings about it.
fn granted_ttl(f: &Fields, role: &Role) -> Result<(i64, Vec<String>), Failure> {
    // Request ttl, else the role's, else the mount default; capped by the
    // role's max_ttl (else the mount max) with Vault's warning.
    let mut ttl = [f.duration("ttl")?, role.ttl, SYSTEM_TTL].into_iter().find(|t| *t > 0).unwrap_or(SYSTEM_TTL);
    let max_ttl = if role.max_ttl > 0 { role.max_ttl } else { SYSTEM_TTL };
    let mut warnings = Vec::new();
    if ttl > max_ttl {
        warnings.push(format!(
            "TTL \"{}\" is longer than permitted maxTTL \"{}\", so maxTTL is being used",
            go_duration(ttl),
            go_duration(max_ttl)
        ));
        ttl = max_ttl;
    }
    Ok((ttl, warnings))
}

fn read_cert(core: &Arc<Core>, mount: &str, serial: &str) -> Outcome {
    let state = core.state();
    let m = state.mounts.get::<PkiMount>(mount).ok_or_else(Failure::unsupported_path)?;
    let normalized = serial.to_lowercase().replace('-', ":");
    let cert = m.certs.get(&normalized).ok_or_else(Failure::not_found)?;
    let revoked = cert.revoked.map(|t| t.timestamp()).unwrap_or(0);
    let revoked_rfc = cert.revoked.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)).unwrap_or_default();
    Ok(Reply::Envelope(Envelope::data(
        json!({ "certificate": cert.pem, "revocation_time": revoked, "revocation_time_rfc3339": revoked_rfc }),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(domains: &[&str]) -> Role {
        Role {
            allowed_domains: domains.iter().map(|s| s.to_string()).collect(),
            allow_bare_domains: false,
            allow_subdomains: false,
            allow_glob_domains: false,
            allow_any_name: false,
            allow_localhost: true,
            allow_ip_sans: true,
            key_type: "ec".into(),
            key_bits: 256,
            ttl: 0,
            max_ttl: 0,
            generate_lease: false,
            no_store: false,
        }
    }

    #[test]
    fn names_follow_the_role_rules() {
        let mut r = role(&["example.com"]);
        assert!(!name_allowed(&r, "example.com"));
        assert!(!name_allowed(&r, "app.example.com"));
        assert!(name_allowed(&r, "localhost"));
        r.allow_subdomains = true;
        assert!(name_allowed(&r, "app.example.com"));
        assert!(!name_allowed(&r, "badexample.com"));
        assert!(!name_allowed(&r, "example.com"));
        r.allow_bare_domains = true;
        assert!(name_allowed(&r, "example.com"));
    }

    #[test]
    fn serials_and_durations_print_as_vault_does() {
        assert_eq!(serial_text(&[0x0a, 0xff, 0x10]), "0a:ff:10");
        assert_eq!(go_duration(7200), "2h0m0s");
        assert_eq!(go_duration(90), "1m30s");
        assert_eq!(go_duration(5), "5s");
    }
}
