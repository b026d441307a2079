//! The webhook's certificate, re-read when its files change (cert-manager
//! and Secret volumes replace them): every handshake compares the files'
//! identity (inode, size, mtime) with the loaded pair's, so the next
//! connection after a rotation gets the new certificate. A pair that does
//! not load keeps the previous one serving, with a warning.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

type Stamp = Option<(u64, u64, SystemTime)>;

fn stamp(p: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<((Stamp, Stamp), Arc<CertifiedKey>)>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert").field("cert", &self.cert).field("key", &self.key).finish_non_exhaustive()
    }
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, CertError> {
    let fail = |p: &Path, message: String| CertError::File { path: p.display().to_string(), message };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(cert, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(fail(cert, "holds no certificate".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| fail(key, format!("not a PEM private key: {e}")))?;
    let signing = provider.key_provider.load_private_key(der).map_err(|e| fail(key, format!("unusable key: {e}")))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| fail(key, format!("does not match the certificate: {e}")))?;
    Ok(ck)
}

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<ReloadingCert, CertError> {
        let stamps = (stamp(cert), stamp(key));
        let loaded = load(cert, key, &provider)?;
        Ok(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            current: Mutex::new((stamps, Arc::new(loaded))),
        })
    }

    fn refresh(&self) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().ok()?;
        let stamps = (stamp(&self.cert), stamp(&self.key));
        if stamps != cur.0 {
            match load(&self.cert, &self.key, &self.provider) {
                Ok(ck) => {
                    *cur = (stamps, Arc::new(ck));
                    tracing::info!(event = "certificate_reloaded", cert = %self.cert.display(), "serving the new certificate");
                }
                // A half-written pair (cert renewed, key not yet): keep
                // the old one and try again at the next handshake.
                Err(e) => {
                    tracing::warn!(event = "certificate_reload_failed", error = %e, "keeping the previous certificate")
                }
            }
        }
        Some(cur.1.clone())
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh()
    }
}

pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, CertError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ReloadingCert::new(cert, key, provider.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::File { path: cert.display().to_string(), message: e.to_string() })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
