//! The PostgreSQL protocol messages the proxy itself reads and writes (the
//! rest it relays untouched): the client's startup, `SSLRequest` and
//! `CancelRequest`, `ErrorResponse`, `AuthenticationOk`, and the framing
//! of the server's messages during login.

use std::collections::BTreeMap;

use config::Listen;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Io, ProxyError};

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
const PROTOCOL_3: i32 = 196_608;
/// Startup packets are small; a larger length is not PostgreSQL.
const MAX_STARTUP: usize = 10_000;

pub const AUTHENTICATION_OK: [u8; 9] = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];
const AUTHENTICATION_CLEARTEXT: [u8; 9] = [b'R', 0, 0, 0, 8, 0, 0, 0, 3];
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Asks the client for the local password (cleartext: the hop is the
/// loopback or a socket inside the pod) and checks it in constant time.
pub async fn check_password<S: AsyncRead + AsyncWrite + Unpin>(c: &mut S, want: &str) -> Result<(), ProxyError> {
    c.write_all(&AUTHENTICATION_CLEARTEXT).await?;
    let (kind, body) = read_message(c).await?;
    if kind != b'p' {
        return Err(ProxyError::NotPostgres(format!("message {:?} instead of a password", kind as char)));
    }
    let given = body.strip_suffix(&[0]).unwrap_or(&body);
    // Constant time in the content (the length is no secret: always 32).
    let same = given.len() == want.len() && given.iter().zip(want.as_bytes()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0;
    if same { Ok(()) } else { Err(ProxyError::LocalPassword) }
}

pub enum Startup {
    Session(Session),
    /// A `CancelRequest`'s whole packet: 16 bytes for a protocol 3.0 key,
    /// up to 268 for 3.2's longer ones.
    Cancel(Vec<u8>),
    /// The client closed before sending anything (a TCP health check).
    Gone,
}

/// A client's startup message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// `user`, `database`, `application_name`, …: `_pq_.` options apart.
    pub params: BTreeMap<String, String>,
    /// The protocol's minor version the client asked for (3.`minor`).
    pub minor: u16,
    /// The `_pq_.` protocol options it asked for, none of which the proxy
    /// knows.
    pub options: Vec<String>,
}

impl Session {
    /// What PostgreSQL answers before authentication when a client asks
    /// for a newer minor version or for protocol options: the
    /// `NegotiateProtocolVersion` of a server speaking 3.0 (as 15 to 17 do)
    /// and knowing no `_pq_.` option. The proxy speaks 3.0 to both sides.
    pub fn negotiation(&self) -> Option<Vec<u8>> {
        if self.minor == 0 && self.options.is_empty() {
            return None;
        }
        // The whole version, 3.0 (the protocol's text says "minor"; the
        // server sends major and minor, and the suite holds us to it).
        let mut body = PROTOCOL_3.to_be_bytes().to_vec();
        body.extend_from_slice(&(self.options.len() as i32).to_be_bytes());
        for o in &self.options {
            body.extend_from_slice(o.as_bytes());
            body.push(0);
        }
        Some(message(b'v', &body))
    }
}

/// Protocol 3.2's cancel keys are up to 256 bytes.
const MAX_CANCEL: usize = 12 + 256;

/// Reads the client's startup; `SSLRequest` and `GSSENCRequest` are
/// answered `N` (the local hop has no TLS: loopback or a pod's socket).
pub async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(c: &mut S) -> Result<Startup, ProxyError> {
    let mut first = true;
    loop {
        let mut len = [0u8; 4];
        let got =
            c.read(&mut len[..1]).await.map_err(|e| ProxyError::NotPostgres(format!("no startup packet: {e}")))?;
        if got == 0 && first {
            return Ok(Startup::Gone);
        }
        first = false;
        if got == 0 {
            return Err(ProxyError::NotPostgres("no startup packet after SSLRequest".into()));
        }
        c.read_exact(&mut len[1..]).await.map_err(|e| ProxyError::NotPostgres(format!("no startup packet: {e}")))?;
        let len = i32::from_be_bytes(len);
        let len = usize::try_from(len).ok().filter(|l| (8..=MAX_STARTUP).contains(l));
        let Some(len) = len else { return Err(ProxyError::NotPostgres("bad startup packet length".into())) };
        let mut body = vec![0u8; len - 4];
        c.read_exact(&mut body).await?;
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        match code {
            SSL_REQUEST | GSSENC_REQUEST => c.write_all(b"N").await?,
            CANCEL_REQUEST if (16..=MAX_CANCEL).contains(&len) => {
                let mut packet = (len as i32).to_be_bytes().to_vec();
                packet.extend_from_slice(&body);
                return Ok(Startup::Cancel(packet));
            }
            _ if code >> 16 == 3 => return session(&body[4..], (code & 0xffff) as u16).map(Startup::Session),
            other => {
                // PostgreSQL's own words (ProcessStartupPacket).
                return Err(ProxyError::Unsupported(format!(
                    "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
                    other >> 16,
                    other & 0xffff
                )));
            }
        }
    }
}

fn session(b: &[u8], minor: u16) -> Result<Session, ProxyError> {
    let mut params = parse_params(b)?;
    let options: Vec<String> = params.keys().filter(|k| k.starts_with("_pq_.")).cloned().collect();
    params.retain(|k, _| !k.starts_with("_pq_."));
    Ok(Session { params, minor, options })
}

fn parse_params(b: &[u8]) -> Result<BTreeMap<String, String>, ProxyError> {
    let bad = || ProxyError::NotPostgres("malformed startup parameters".into());
    let mut parts = b.split(|c| *c == 0);
    let mut out = BTreeMap::new();
    loop {
        let key = parts.next().ok_or_else(bad)?;
        if key.is_empty() {
            return Ok(out);
        }
        let value = parts.next().ok_or_else(bad)?;
        let s = |v: &[u8]| String::from_utf8(v.to_vec()).map_err(|_| bad());
        out.insert(s(key)?, s(value)?);
    }
}

/// A startup message for the server.
pub fn startup_message(params: &BTreeMap<String, String>) -> Vec<u8> {
    let mut body = PROTOCOL_3.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// A `CancelRequest` for a server connection's key.
pub fn cancel_request(key: &[u8]) -> Vec<u8> {
    let mut b = ((key.len() + 8) as i32).to_be_bytes().to_vec();
    b.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
    b.extend_from_slice(key);
    b
}

pub fn ssl_request() -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&8i32.to_be_bytes());
    b[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    b
}

/// A FATAL `ErrorResponse` with `code` (SQLSTATE) and `message`.
pub fn error_response(code: &str, text: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', text)] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    message(b'E', &body)
}

/// A protocol message: its type, its length, its body.
pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 5);
    m.push(kind);
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// The SQLSTATE (`C` field) of an `ErrorResponse` body.
pub fn error_code(body: &[u8]) -> String {
    let mut fields = body.split(|c| *c == 0);
    fields.find_map(|f| f.strip_prefix(b"C")).map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default()
}

/// The `M` (message) field of an `ErrorResponse` body.
pub fn error_message(body: &[u8]) -> String {
    let mut fields = body.split(|c| *c == 0);
    fields
        .find_map(|f| f.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_else(|| "an error without a message".into())
}

/// One server message: its type and body.
pub async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> Result<(u8, Vec<u8>), ProxyError> {
    let kind = s.read_u8().await?;
    let len = s.read_i32().await?;
    let len = usize::try_from(len).ok().filter(|l| (4..=1 << 20).contains(l));
    let Some(len) = len else {
        return Err(ProxyError::Protocol(format!("message {:?} with a bad length", kind as char)));
    };
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await?;
    Ok((kind, body))
}

/// The proxy's listening socket: `HOST:PORT`, or `unix:PATH`.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    pub async fn bind(listen: &Listen) -> std::io::Result<Listener> {
        match listen {
            Listen::Unix(path) => {
                // A socket left by an earlier run would make bind fail.
                let _ = std::fs::remove_file(path);
                Ok(Listener::Unix(tokio::net::UnixListener::bind(path)?))
            }
            Listen::Tcp(addr) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?)),
        }
    }

    pub async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Box::new(s))
            }
            Listener::Unix(l) => Ok(Box::new(l.accept().await?.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn startup_after_ssl_request_and_the_refusal() {
        let mut params = BTreeMap::new();
        params.insert("user".to_string(), "app".to_string());
        params.insert("database".to_string(), "shop".to_string());
        let mut input = ssl_request().to_vec();
        input.extend(startup_message(&params));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&input).await.unwrap();
        let Startup::Session(got) = read_startup(&mut b).await.unwrap() else { panic!("a session") };
        assert_eq!(got, Session { params, minor: 0, options: vec![] });
        assert_eq!(got.negotiation(), None);
        let mut n = [0u8; 1];
        a.read_exact(&mut n).await.unwrap();
        assert_eq!(&n, b"N");
    }

    /// A libpq 18 startup (`max_protocol_version=latest`) with a protocol
    /// option: the proxy negotiates down to 3.0 and names the option, as
    /// PostgreSQL 15 does (the integration test holds it to the server).
    #[tokio::test]
    async fn protocol_3_2_and_options_are_negotiated_down() {
        let mut params = BTreeMap::new();
        params.insert("user".to_string(), "app".to_string());
        params.insert("_pq_.test_option".to_string(), "1".to_string());
        let mut packet = startup_message(&params);
        packet[4..8].copy_from_slice(&0x0003_0002i32.to_be_bytes());
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&packet).await.unwrap();
        let Startup::Session(got) = read_startup(&mut b).await.unwrap() else { panic!("a session") };
        assert_eq!((got.minor, got.options.clone()), (2, vec!["_pq_.test_option".to_string()]));
        assert!(!got.params.contains_key("_pq_.test_option"), "not sent upstream");
        let v = got.negotiation().unwrap();
        assert_eq!(v, message(b'v', b"\0\x03\0\0\0\0\0\x01_pq_.test_option\0"));
        // Protocol 4.0 is refused in PostgreSQL's words.
        let (mut a, mut b) = tokio::io::duplex(1024);
        packet[4..8].copy_from_slice(&0x0004_0000i32.to_be_bytes());
        a.write_all(&packet).await.unwrap();
        let e = read_startup(&mut b).await.err().unwrap();
        assert!(e.to_string().contains("unsupported frontend protocol 4.0"), "{e}");
        // Nothing at all: not a failure.
        let (a, mut b) = tokio::io::duplex(1024);
        drop(a);
        assert!(matches!(read_startup(&mut b).await, Ok(Startup::Gone)));
    }

    #[tokio::test]
    async fn http_is_not_postgres() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(matches!(read_startup(&mut b).await, Err(ProxyError::NotPostgres(_))));
    }

    #[tokio::test]
    async fn the_local_password_is_asked_and_checked() {
        for (given, ok) in [("s3cret", true), ("wrong", false), ("", false)] {
            let (mut a, mut b) = tokio::io::duplex(1024);
            let mut asked = [0u8; 9];
            let client = async {
                a.read_exact(&mut asked).await.unwrap();
                let mut p = vec![b'p'];
                p.extend_from_slice(&((given.len() + 5) as i32).to_be_bytes());
                p.extend_from_slice(given.as_bytes());
                p.push(0);
                a.write_all(&p).await.unwrap();
            };
            let (_, got) = tokio::join!(client, check_password(&mut b, "s3cret"));
            assert_eq!(asked, AUTHENTICATION_CLEARTEXT);
            assert_eq!(got.is_ok(), ok, "{given:?}");
        }
    }

    #[test]
    fn error_responses_carry_the_message() {
        let e = error_response("08006", "no upstream");
        assert_eq!(e[0], b'E');
        assert_eq!(error_message(&e[5..]), "no upstream");
    }
}
