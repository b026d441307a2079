//! The proxy's side toward the database: TCP, TLS as `upstream_tls` says
//! (`disable`; `require`: encrypted, the certificate not checked, as libpq's
//! `sslmode=require`; `verify-full`: checked against `ca_cert`, and the
//! host name), and the login with the secret's credentials, answering
//! only what `auth::answer` allows.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::{self, Answer, Gs2, Policy, Progress, Request};
use super::binding::{BindingError, server_end_point};
use super::scram::{Binding, Scram};
use super::wire::{self, read_message};
use super::{HandedOut, Io, Keys, ProxyError};
use config::{ProxyConfig, UpstreamTls};
use vault::secret::SecretData;

/// rustls for the upstream, or `None` for `disable`.
pub fn tls_config(cfg: &ProxyConfig) -> Result<Option<Arc<rustls::ClientConfig>>, ProxyError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Tls(e.to_string()))?;
    let config = match cfg.upstream_tls {
        UpstreamTls::Disable => return Ok(None),
        UpstreamTls::Require => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider))).with_no_client_auth()
        }
        UpstreamTls::VerifyFull => {
            let mut roots = rustls::RootCertStore::empty();
            // Database CAs are private (config validation requires ca_cert).
            let path =
                cfg.ca_cert.as_deref().ok_or_else(|| ProxyError::Tls("verify-full needs proxy.ca_cert".into()))?;
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ProxyError::Tls(format!("proxy.ca_cert {}: {e}", path.display())))?;
            roots.add_parsable_certificates(certs);
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(config)))
}

/// A connection to the upstream, and the channel binding data of its TLS
/// session (`None` without TLS; the error when the certificate cannot be
/// bound to).
struct Upstream {
    io: Box<dyn Io>,
    binding: Option<Result<Vec<u8>, BindingError>>,
}

async fn connect(cfg: &ProxyConfig, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Upstream, ProxyError> {
    let addr = &cfg.upstream;
    let connect_failed = |e: std::io::Error| ProxyError::Connect { addr: addr.clone(), error: e.to_string() };
    let timeout = std::time::Duration::from_secs(10);
    let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(r) => r.map_err(connect_failed)?,
        Err(_) => return Err(connect_failed(std::io::Error::other("timed out after 10s"))),
    };
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else { return Ok(Upstream { io: Box::new(tcp), binding: None }) };
    let mut tcp = tcp;
    tcp.write_all(&wire::ssl_request()).await?;
    match tcp.read_u8().await? {
        b'S' => {}
        b'N' => return Err(ProxyError::NoTls(addr.clone())),
        other => return Err(ProxyError::Protocol(format!("answer {:?} to SSLRequest", other as char))),
    }
    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h).trim_matches(['[', ']']);
    let name = ServerName::try_from(host.to_string()).map_err(|e| ProxyError::Tls(format!("{host}: {e}")))?;
    let stream =
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| ProxyError::Tls(e.to_string()))?;
    let binding = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|leaf| server_end_point(leaf.as_ref()))
        .unwrap_or(Err(BindingError::Malformed));
    Ok(Upstream { io: Box::new(stream), binding: Some(binding) })
}

/// A logged-in upstream connection for a client that sent `params`: the
/// secret's user, the client's database (libpq's default: the user name it
/// gave) and other parameters. Returns after the server's
/// `AuthenticationOk`, before what follows it (parameters, key, ready).
pub async fn open(
    cfg: &ProxyConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    client: &BTreeMap<String, String>,
    creds: &SecretData,
) -> Result<Box<dyn Io>, ProxyError> {
    let (Some(user), Some(password)) = (creds.str("username"), creds.str("password")) else {
        return Err(ProxyError::Refused("the secret has no username and password".into()));
    };
    let mut params = client.clone();
    let database = params.remove("database").or_else(|| params.get("user").cloned()).unwrap_or_default();
    params.insert("user".into(), user.to_string());
    if !database.is_empty() {
        params.insert("database".into(), database);
    }
    let policy = Policy {
        tls: cfg.upstream_tls,
        binding: cfg.channel_binding(),
        allow_plain_password: cfg.allow_plain_password,
    };
    let Upstream { io: mut s, binding } = connect(cfg, tls).await?;
    s.write_all(&wire::startup_message(&params)).await?;
    let mut scram: Option<Scram> = None;
    let mut progress = Progress::None;
    loop {
        let (kind, body) = read_message(&mut s).await?;
        match kind {
            // Passed to the client as the server sent it (53300, 57P03,
            // 28P01…): pools retry on some of these.
            b'E' => return Err(ProxyError::Server(body)),
            b'R' if body.len() >= 4 => {
                let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                let rest = &body[4..];
                let request = match code {
                    0 => Request::Ok,
                    3 => Request::Cleartext,
                    5 => Request::Md5,
                    10 => {
                        let offers = |m: &[u8]| rest.split(|c| *c == 0).any(|o| o == m);
                        Request::Sasl { scram: offers(b"SCRAM-SHA-256"), plus: offers(b"SCRAM-SHA-256-PLUS") }
                    }
                    11 => {
                        let mut sc = scram.take().ok_or_else(|| ProxyError::Protocol("SASL continue first".into()))?;
                        let server_first = rest.to_vec();
                        // PBKDF2 is the one CPU-heavy step of the agent: on a
                        // blocking thread, so probes, renewals and signals
                        // are served meanwhile.
                        let (sc, reply) = tokio::task::spawn_blocking(move || {
                            let reply = sc.respond(&server_first);
                            (sc, reply)
                        })
                        .await
                        .map_err(|_| ProxyError::Protocol("SCRAM: key derivation stopped".into()))?;
                        let reply = reply.map_err(|e| ProxyError::Refused(format!("SCRAM: {e}")))?;
                        send(&mut s, b'p', &reply).await?;
                        scram = Some(sc);
                        continue;
                    }
                    12 => {
                        let sc = scram.take().ok_or_else(|| ProxyError::Protocol("SASL final first".into()))?;
                        sc.finish(rest).map_err(|e| ProxyError::Refused(format!("SCRAM: the server's proof: {e}")))?;
                        progress = Progress::Proved { bound: sc.is_bound() };
                        continue;
                    }
                    other => return Err(ProxyError::Protocol(format!("authentication method {other}"))),
                };
                match auth::answer(policy, progress, request) {
                    Answer::Accept => return Ok(s),
                    Answer::Refuse(why) => return Err(ProxyError::Refused(why)),
                    Answer::SendCleartext => send(&mut s, b'p', &cstr(password)).await?,
                    Answer::SendMd5 => {
                        let [a, b, c, d] = rest else {
                            return Err(ProxyError::Protocol("an md5 request without its 4-byte salt".into()));
                        };
                        send(&mut s, b'p', &cstr(&md5_password(user, password, [*a, *b, *c, *d]))).await?;
                    }
                    Answer::Scram(gs2) => {
                        let binding = match (gs2, &binding) {
                            (Gs2::Bound, Some(Ok(data))) => Binding::ServerEndPoint(data.clone()),
                            (Gs2::Bound, Some(Err(e))) => return Err(ProxyError::Refused(e.to_string())),
                            (Gs2::Bound, None) => {
                                return Err(ProxyError::Protocol("channel binding without TLS".into()));
                            }
                            (Gs2::ServerDoesNot, _) => Binding::ServerDoesNot,
                            (Gs2::No, _) => Binding::No,
                        };
                        let sc = Scram::new(password, binding);
                        let first = sc.first();
                        let mut msg = cstr(sc.mechanism());
                        msg.extend_from_slice(&(first.len() as i32).to_be_bytes());
                        msg.extend_from_slice(&first);
                        send(&mut s, b'p', &msg).await?;
                        scram = Some(sc);
                        progress = Progress::Started;
                    }
                }
            }
            other => return Err(ProxyError::Protocol(format!("message {:?} before the login", other as char))),
        }
    }
}

/// Passes what the server sends after `AuthenticationOk` (parameters,
/// notices) to the client, up to the login's `ReadyForQuery`. The server's
/// cancel key (`BackendKeyData`) stays with the proxy: the client gets one
/// `keys` hands out for it, which follows the session to whichever server
/// connection serves it. An error the server sends instead (the database
/// does not exist, too many connections) reaches the client as it is.
pub async fn until_ready<'k>(
    server: &mut Box<dyn Io>,
    client: &mut Box<dyn Io>,
    keys: &'k Keys,
) -> Result<Option<HandedOut<'k>>, ProxyError> {
    let mut key = None;
    loop {
        let (kind, body) = read_message(server).await?;
        match kind {
            b'K' => {
                let handed = keys.hand_out(body);
                send(client, b'K', handed.key()).await?;
                key = Some(handed);
                continue;
            }
            b'E' => {
                send(client, kind, &body).await?;
                return Err(ProxyError::Server(body));
            }
            _ => send(client, kind, &body).await?,
        }
        if kind == b'Z' {
            return Ok(key);
        }
    }
}

/// Sends a `CancelRequest` for a server connection's key (`BackendKeyData`'s
/// body), and returns once the server has taken it (it closes the
/// connection then): the client's own cancel connection is closed only
/// after, as a direct one would be, so a late cancel never hits its next
/// statement.
pub async fn cancel(
    cfg: &ProxyConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    backend_key: &[u8],
) -> Result<(), ProxyError> {
    let mut s = connect(cfg, tls).await?.io;
    s.write_all(&wire::cancel_request(backend_key)).await?;
    let mut sink = [0u8; 64];
    let taken = async { while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), taken).await;
    Ok(())
}

/// PostgreSQL's md5 password: `md5` + md5(md5(password + user) + salt), in hex.
fn md5_password(user: &str, password: &str, salt: [u8; 4]) -> String {
    use md5::{Digest, Md5};
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let inner = hex(&Md5::new().chain_update(password).chain_update(user).finalize());
    format!("md5{}", hex(&Md5::new().chain_update(inner).chain_update(salt).finalize()))
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

async fn send(s: &mut Box<dyn Io>, kind: u8, body: &[u8]) -> Result<(), ProxyError> {
    let mut m = vec![kind];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    s.write_all(&m).await?;
    Ok(())
}

/// `upstream_tls: require`: encrypted, the certificate not checked (libpq's
/// `sslmode=require`). Signatures are still verified, so the session is a
/// real TLS session with whoever answered.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    /// As libpq computes it (`pg_md5_encrypt` twice): user "postgres",
    /// password "secret", salt 01 02 03 04 (the figure from Python's hashlib).
    #[test]
    fn md5_passwords_are_libpqs() {
        assert_eq!(super::md5_password("postgres", "secret", [1, 2, 3, 4]), "md5bb41a296aab6baccb36ff243a562abff");
    }
}
