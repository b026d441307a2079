//! Minting ServiceAccount JWTs like a Kubernetes API server would, for tests
//! and the demo: a generated key pair whose public half goes into
//! `auth/kubernetes/config` `pem_keys`.

use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};

pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("generating a signing key failed: {0}")]
    KeyGen(String),
    #[error("signing a token failed: {0}")]
    Sign(String),
    #[error("token rejected: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy)]
pub enum SigningAlg {
    Es256,
    Rs256,
}

pub struct ServiceAccountIssuer {
    alg: Algorithm,
    key: EncodingKey,
    verify_key: DecodingKey,
    public_pem: String,
    certificate_pem: String,
}

impl ServiceAccountIssuer {
    pub fn generate(alg: SigningAlg) -> Result<Self, JwtError> {
        let (rc_alg, jwt_alg) = match alg {
            SigningAlg::Es256 => (&rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256),
            SigningAlg::Rs256 => (&rcgen::PKCS_RSA_SHA256, Algorithm::RS256),
        };
        let pair = rcgen::KeyPair::generate_for(rc_alg).map_err(|e| JwtError::KeyGen(e.to_string()))?;
        let private_pem = pair.serialize_pem();
        let key = match alg {
            SigningAlg::Es256 => EncodingKey::from_ec_pem(private_pem.as_bytes()),
            SigningAlg::Rs256 => EncodingKey::from_rsa_pem(private_pem.as_bytes()),
        }
        .map_err(|e| JwtError::KeyGen(e.to_string()))?;
        let public_pem = pair.public_key_pem();
        let verify_key = match alg {
            SigningAlg::Es256 => DecodingKey::from_ec_pem(public_pem.as_bytes()),
            SigningAlg::Rs256 => DecodingKey::from_rsa_pem(public_pem.as_bytes()),
        }
        .map_err(|e| JwtError::KeyGen(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec!["kubernetes.default.svc".to_string()])
            .map_err(|e| JwtError::KeyGen(e.to_string()))?;
        let cert = params.self_signed(&pair).map_err(|e| JwtError::KeyGen(e.to_string()))?;
        Ok(ServiceAccountIssuer { alg: jwt_alg, key, verify_key, public_pem, certificate_pem: cert.pem() })
    }

    /// The PEM public key for `pem_keys`.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// A self-signed certificate of the same key (some clients, e.g. hvac,
    /// only accept certificates in `pem_keys`).
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The claims of a projected ServiceAccount token, valid for `ttl_secs`.
    pub fn claims(namespace: &str, name: &str, ttl_secs: i64) -> Value {
        let now = Utc::now().timestamp();
        json!({
            "aud": ["https://kubernetes.default.svc.cluster.local"],
            "exp": now + ttl_secs,
            "iat": now,
            "nbf": now,
            "iss": DEFAULT_ISSUER,
            "sub": format!("system:serviceaccount:{namespace}:{name}"),
            "kubernetes.io": {
                "namespace": namespace,
                "pod": { "name": format!("{name}-pod"), "uid": uuid::Uuid::new_v4().to_string() },
                "serviceaccount": { "name": name, "uid": crate::token::entity_id(&format!("{namespace}/{name}")) },
            },
        })
    }

    pub fn mint(&self, namespace: &str, name: &str, ttl_secs: i64) -> Result<String, JwtError> {
        self.sign(&Self::claims(namespace, name, ttl_secs))
    }

    pub fn sign(&self, claims: &Value) -> Result<String, JwtError> {
        let header = Header::new(self.alg);
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| JwtError::Sign(e.to_string()))
    }

    /// The claims of `jwt` if this issuer signed it and it has not expired,
    /// as the API server's ServiceAccount authenticator checks (the
    /// audience is the caller's concern).
    pub fn verify(&self, jwt: &str) -> Result<Value, JwtError> {
        let mut validation = Validation::new(self.alg);
        validation.validate_aud = false;
        validation.leeway = 0;
        validation.set_issuer(&[DEFAULT_ISSUER]);
        jsonwebtoken::decode::<Value>(jwt, &self.verify_key, &validation)
            .map(|d| d.claims)
            .map_err(|e| JwtError::Invalid(e.to_string()))
    }
}
