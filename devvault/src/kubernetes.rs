//! The Kubernetes auth method: `config`, `role/<name>` and `login`, with the
//! plugin's checks in its order and its error table (vault-api.md §2).
//! There is no Kubernetes API here, so the JWT's signature is verified
//! locally against `pem_keys` in place of a TokenReview.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use crate::api::{Envelope, Failure, Outcome, Reply};
use crate::core::{Core, Op, Request, State, TokenLimits, TokenSource};
use crate::token::{NewToken, auth_json, entity_id, issue, sorted_policies};
use crate::ttl::TtlInput;

/// cap/jwt's clock-skew leeway for `exp`, `nbf` and `iat`.
const LEEWAY_SECS: i64 = 60;

#[derive(Clone)]
enum KeyKind {
    Rsa,
    Ec,
}

#[derive(Clone)]
pub struct KubeConfig {
    pub kubernetes_host: String,
    pub kubernetes_ca_cert: String,
    pub pem_keys: Vec<String>,
    keys: Vec<(KeyKind, DecodingKey)>,
    pub issuer: String,
    pub disable_iss_validation: bool,
    pub disable_local_ca_jwt: bool,
}

#[derive(Clone, Default)]
pub struct KubeRole {
    pub bound_names: Vec<String>,
    pub bound_namespaces: Vec<String>,
    pub audience: String,
    pub alias_name_source: String,
    pub token_ttl: i64,
    pub token_max_ttl: i64,
    pub token_period: i64,
    pub token_explicit_max_ttl: i64,
    pub token_policies: Vec<String>,
    pub token_no_default_policy: bool,
}

#[derive(Default)]
pub struct KubeMount {
    pub config: Option<KubeConfig>,
    pub roles: BTreeMap<String, KubeRole>,
}

pub async fn handle(core: &Arc<Core>, req: &Request, mount: &str, sub: &str) -> Outcome {
    match (sub, req.op) {
        ("login", Op::Update) => login(core, req, mount),
        ("config", Op::Update) => write_config(core, req, mount),
        ("config", Op::Read) => read_config(core, mount),
        ("role" | "role/", Op::List) => {
            let keys: Vec<String> = core
                .state()
                .mounts
                .get::<KubeMount>(mount)
                .map(|m| m.roles.keys().cloned().collect())
                .unwrap_or_default();
            if keys.is_empty() {
                return Err(Failure::not_found());
            }
            Ok(Reply::Envelope(Envelope::data(json!({ "keys": keys }))))
        }
        (s, op) if s.starts_with("role/") && s.len() > 5 => {
            let name = s["role/".len()..].trim_end_matches('/');
            match op {
                Op::Update => write_role(core, req, mount, name),
                Op::Read => read_role(core, mount, name),
                Op::Delete => {
                    if let Some(m) = core.state().mounts.get_mut::<KubeMount>(mount) {
                        m.roles.remove(name);
                    }
                    Ok(Reply::Empty)
                }
                _ => Err(Failure::unsupported_operation()),
            }
        }
        ("login" | "config", _) => Err(Failure::unsupported_operation()),
        _ => Err(Failure::unsupported_path()),
    }
}

const CONFIG_FIELDS: &[&str] = &[
    "kubernetes_host",
    "kubernetes_ca_cert",
    "token_reviewer_jwt",
    "pem_keys",
    "issuer",
    "disable_iss_validation",
    "disable_local_ca_jwt",
    "use_annotations_as_alias_metadata",
];

fn write_config(core: &Arc<Core>, req: &Request, mount: &str) -> Outcome {
    let f = req.fields();
    let host = f.str("kubernetes_host")?;
    if host.is_empty() {
        return Err(Failure::resp(400, "no host provided"));
    }
    let ca = f.str("kubernetes_ca_cert")?;
    if !ca.is_empty() && !ca.contains("-----BEGIN CERTIFICATE-----") {
        return Err(Failure::resp(400, "The provided CA PEM data contains no valid certificates"));
    }
    let pem_keys = match f.raw("pem_keys") {
        Some(Value::String(s)) => split_pems(s),
        _ => f.list("pem_keys")?.unwrap_or_default(),
    };
    let mut keys = Vec::new();
    for pem in &pem_keys {
        let invalid = || Failure::resp(400, "data does not contain any valid RSA or ECDSA public keys");
        let pem = crate::pem::public_key_pem(pem).ok_or_else(invalid)?;
        let key = DecodingKey::from_ec_pem(pem.as_bytes())
            .map(|k| (KeyKind::Ec, k))
            .or_else(|_| DecodingKey::from_rsa_pem(pem.as_bytes()).map(|k| (KeyKind::Rsa, k)))
            .map_err(|_| invalid())?;
        keys.push(key);
    }
    let disable_local_ca_jwt = f.bool_or("disable_local_ca_jwt", false)?;
    // Outside a pod there is no local CA file to fall back on.
    if ca.is_empty() {
        let msg = if disable_local_ca_jwt {
            "kubernetes_ca_cert must be given when disable_local_ca_jwt is true"
        } else {
            "open /var/run/secrets/kubernetes.io/serviceaccount/ca.crt: no such file or directory"
        };
        return Err(Failure::resp(400, msg));
    }
    let config = KubeConfig {
        kubernetes_host: host,
        kubernetes_ca_cert: ca,
        pem_keys,
        keys,
        issuer: f.str("issuer")?,
        disable_iss_validation: f.bool_or("disable_iss_validation", true)?,
        disable_local_ca_jwt,
    };
    if let Some(m) = core.state().mounts.get_mut::<KubeMount>(mount) {
        m.config = Some(config);
    }
    Ok(Core::with_ignored(Reply::Empty, &f, CONFIG_FIELDS))
}

/// A comma-separated string of PEM blocks, as the CLI sends `pem_keys`.
fn split_pems(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect()
}

fn read_config(core: &Arc<Core>, mount: &str) -> Outcome {
    let state = core.state();
    let Some(c) = state.mounts.get::<KubeMount>(mount).and_then(|m| m.config.clone()) else {
        return Err(Failure::not_found());
    };
    Ok(Reply::Envelope(Envelope::data(json!({
        "kubernetes_host": c.kubernetes_host,
        "kubernetes_ca_cert": c.kubernetes_ca_cert,
        "pem_keys": c.pem_keys,
        "issuer": c.issuer,
        "disable_iss_validation": c.disable_iss_validation,
        "disable_local_ca_jwt": c.disable_local_ca_jwt,
        "token_reviewer_jwt_set": false,
    }))))
}

const ROLE_FIELDS: &[&str] = &[
    "bound_service_account_names",
    "bound_service_account_namespaces",
    "bound_service_account_namespace_selector",
    "audience",
    "alias_name_source",
    "token_ttl",
    "token_max_ttl",
    "token_period",
    "token_policies",
    "token_type",
    "token_no_default_policy",
    "token_num_uses",
    "token_bound_cidrs",
    "token_explicit_max_ttl",
    "policies",
    "ttl",
    "max_ttl",
    "period",
];

fn write_role(core: &Arc<Core>, req: &Request, mount: &str, name: &str) -> Outcome {
    let f = req.fields();
    let mut role =
        core.state().mounts.get::<KubeMount>(mount).and_then(|m| m.roles.get(name).cloned()).unwrap_or_default();
    if let Some(names) = f.list("bound_service_account_names")? {
        role.bound_names = names;
    }
    if role.bound_names.is_empty() {
        return Err(Failure::resp(400, "\"bound_service_account_names\" can not be empty"));
    }
    if role.bound_names.len() > 1 && role.bound_names.iter().any(|n| n == "*") {
        return Err(Failure::resp(400, "can not mix \"*\" with values"));
    }
    if let Some(ns) = f.list("bound_service_account_namespaces")? {
        role.bound_namespaces = ns;
    }
    if role.bound_namespaces.is_empty() && !f.has("bound_service_account_namespace_selector") {
        return Err(Failure::resp(
            400,
            "\"bound_service_account_namespaces\" can not be empty if \"bound_service_account_namespace_selector\" is not set",
        ));
    }
    if role.bound_namespaces.len() > 1 && role.bound_namespaces.iter().any(|n| n == "*") {
        return Err(Failure::resp(400, "can not mix \"*\" with values"));
    }
    if f.has("audience") {
        role.audience = f.str("audience")?;
    }
    if f.has("alias_name_source") {
        role.alias_name_source = f.str("alias_name_source")?;
    }
    // Deprecated aliases first, so the token_* names win when both are set.
    let durations = [
        ("ttl", "token_ttl"),
        ("max_ttl", "token_max_ttl"),
        ("period", "token_period"),
        ("", "token_explicit_max_ttl"),
    ];
    for (old, new) in durations {
        let value = match f.duration_opt(new)? {
            Some(v) => Some(v),
            None if !old.is_empty() => f.duration_opt(old)?,
            None => None,
        };
        if let Some(v) = value {
            match new {
                "token_ttl" => role.token_ttl = v,
                "token_max_ttl" => role.token_max_ttl = v,
                "token_period" => role.token_period = v,
                _ => role.token_explicit_max_ttl = v,
            }
        }
    }
    if let Some(p) = f.list("token_policies")?.or(f.list("policies")?) {
        role.token_policies = p;
    }
    role.token_no_default_policy = f.bool_or("token_no_default_policy", role.token_no_default_policy)?;
    if role.token_max_ttl > 0 && role.token_ttl > role.token_max_ttl {
        return Err(Failure::resp(400, "token ttl should not be greater than token max ttl"));
    }
    let mut warnings = Vec::new();
    if role.audience.is_empty() {
        warnings.push(format!(
            "Role {name} does not have an audience configured. While audiences are not required, consider specifying one if your use case would benefit from additional JWT claim verification."
        ));
    }
    if let Some(m) = core.state().mounts.get_mut::<KubeMount>(mount) {
        m.roles.insert(name.to_string(), role);
    }
    Ok(Core::with_ignored(Reply::warnings(warnings), &f, ROLE_FIELDS))
}

fn read_role(core: &Arc<Core>, mount: &str, name: &str) -> Outcome {
    let Some(r) = core.state().mounts.get::<KubeMount>(mount).and_then(|m| m.roles.get(name).cloned()) else {
        return Err(Failure::not_found());
    };
    Ok(Reply::Envelope(Envelope::data(json!({
        "bound_service_account_names": r.bound_names,
        "bound_service_account_namespaces": r.bound_namespaces,
        "audience": r.audience,
        "alias_name_source": if r.alias_name_source.is_empty() { "serviceaccount_uid" } else { &r.alias_name_source },
        "token_ttl": r.token_ttl,
        "token_max_ttl": r.token_max_ttl,
        "token_period": r.token_period,
        "token_explicit_max_ttl": r.token_explicit_max_ttl,
        "token_policies": r.token_policies,
        "token_no_default_policy": r.token_no_default_policy,
        "token_type": "default-service",
        "token_bound_cidrs": [],
        "token_num_uses": 0,
        "token_strictly_bind_ip": false,
        "bound_service_account_namespace_selector": "",
    }))))
}

/// The service account a JWT speaks for.
struct Subject {
    namespace: String,
    name: String,
    uid: String,
    secret_name: String,
}

fn login(core: &Arc<Core>, req: &Request, mount: &str) -> Outcome {
    let f = req.fields();
    let role_name = f.str("role")?;
    if role_name.is_empty() {
        return Err(Failure::resp(400, "missing role"));
    }
    let jwt = f.str("jwt")?;
    if jwt.is_empty() {
        return Err(Failure::resp(400, "missing jwt"));
    }
    let (role, config) = {
        let state = core.state();
        let m = state.mounts.get::<KubeMount>(mount);
        let Some(role) = m.and_then(|m| m.roles.get(&role_name).cloned()) else {
            return Err(Failure::resp(400, format!("invalid role name \"{role_name}\"")));
        };
        let Some(config) = m.and_then(|m| m.config.clone()) else {
            return Err(Failure::resp(500, "could not load backend configuration"));
        };
        (role, config)
    };
    let claims = verify(&jwt, &config, &role)?;
    let subject = subject(&claims)?;
    if !(role.bound_names.iter().any(|n| n == "*") || crate::glob::matches_any(&role.bound_names, &subject.name)) {
        return Err(Failure::resp(403, "service account name not authorized"));
    }
    if !(role.bound_namespaces.iter().any(|n| n == "*")
        || crate::glob::matches_any(&role.bound_namespaces, &subject.namespace))
    {
        return Err(Failure::resp(403, "namespace not authorized"));
    }
    let meta = BTreeMap::from([
        ("role".to_string(), role_name.clone()),
        ("service_account_name".to_string(), subject.name.clone()),
        ("service_account_namespace".to_string(), subject.namespace.clone()),
        ("service_account_secret_name".to_string(), subject.secret_name.clone()),
        ("service_account_uid".to_string(), subject.uid.clone()),
    ]);
    let (token, warnings) = issue(
        core,
        NewToken {
            policies: sorted_policies(role.token_policies.clone(), !role.token_no_default_policy),
            path: format!("auth/{mount}/login"),
            display_name: format!("{}-{}-{}", mount.replace('/', "-"), subject.namespace, subject.name),
            meta,
            ttl: TtlInput {
                backend_ttl: role.token_ttl,
                backend_max: role.token_max_ttl,
                period: role.token_period,
                explicit_max: role.token_explicit_max_ttl,
                ..Default::default()
            },
            renewable: true,
            orphan: true,
            parent: None,
            source: TokenSource::Kubernetes { mount: mount.to_string(), role: role_name, limits: role_limits },
            entity_id: entity_id(&format!("{mount}/{}", subject.uid)),
            no_expiry: false,
        },
    )?;
    Ok(Reply::Envelope(Envelope { auth: Some(auth_json(&token, token.creation_ttl)), warnings, ..Default::default() }))
}

const ALLOWED_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Signature, then issuer, audience and time claims, with cap/jwt's texts.
fn verify(jwt: &str, config: &KubeConfig, role: &KubeRole) -> Result<Value, Failure> {
    let denied = || Failure::resp(403, "permission denied");
    let header = jsonwebtoken::decode_header(jwt).map_err(|_| denied())?;
    if !ALLOWED_ALGS.contains(&header.alg) {
        return Err(denied());
    }
    let is_ec = matches!(header.alg, Algorithm::ES256 | Algorithm::ES384);
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims = HashSet::new();
    // Without pem_keys Vault defers to TokenReview, which devvault cannot do.
    let claims = config
        .keys
        .iter()
        .filter(|(kind, _)| matches!(kind, KeyKind::Ec) == is_ec)
        .find_map(|(_, key)| jsonwebtoken::decode::<Value>(jwt, key, &validation).ok())
        .map(|data| data.claims)
        .ok_or_else(denied)?;
    if !config.issuer.is_empty() && !config.disable_iss_validation && claims["iss"].as_str() != Some(&config.issuer) {
        return Err(Failure::resp(403, "invalid issuer (iss) claim"));
    }
    if !role.audience.is_empty() {
        let ok = match &claims["aud"] {
            Value::String(s) => *s == role.audience,
            Value::Array(a) => a.iter().any(|v| v.as_str() == Some(&role.audience)),
            _ => false,
        };
        if !ok {
            return Err(Failure::resp(
                403,
                "invalid audience (aud) claim: audience claim does not match any expected audience",
            ));
        }
    }
    let now = Utc::now().timestamp();
    if let Some(exp) = claims["exp"].as_i64()
        && now > exp + LEEWAY_SECS
    {
        return Err(Failure::resp(403, "invalid expiration time (exp) claim: token is expired"));
    }
    if let Some(nbf) = claims["nbf"].as_i64()
        && now + LEEWAY_SECS < nbf
    {
        return Err(Failure::resp(403, "invalid not before (nbf) claim: token not yet valid"));
    }
    if let Some(iat) = claims["iat"].as_i64()
        && now + LEEWAY_SECS < iat
    {
        return Err(Failure::resp(403, "invalid issued at (iat) claim: token issued in the future"));
    }
    Ok(claims)
}

/// Projected-token claims win over the legacy secret-token ones.
fn subject(claims: &Value) -> Result<Subject, Failure> {
    let projected = &claims["kubernetes.io"];
    let pick = |projected: &Value, legacy: &str| -> String {
        projected.as_str().or_else(|| claims[legacy].as_str()).unwrap_or_default().to_string()
    };
    let uid = pick(&projected["serviceaccount"]["uid"], "kubernetes.io/serviceaccount/service-account.uid");
    if uid.is_empty() {
        return Err(Failure::resp(500, "could not parse UID from claims"));
    }
    Ok(Subject {
        namespace: pick(&projected["namespace"], "kubernetes.io/serviceaccount/namespace"),
        name: pick(&projected["serviceaccount"]["name"], "kubernetes.io/serviceaccount/service-account.name"),
        uid,
        secret_name: if projected.is_object() {
            String::new()
        } else {
            claims["kubernetes.io/serviceaccount/secret.name"].as_str().unwrap_or_default().to_string()
        },
    })
}

/// A role's token limits as they are now (`TokenSource::Kubernetes`).
fn role_limits(state: &State, mount: &str, role: &str) -> Option<TokenLimits> {
    let r = state.mounts.get::<KubeMount>(mount)?.roles.get(role)?;
    Some(TokenLimits {
        ttl: r.token_ttl,
        max_ttl: r.token_max_ttl,
        period: r.token_period,
        explicit_max_ttl: r.token_explicit_max_ttl,
    })
}
