//! The client side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL
//! speaks it, on ring (already linked for TLS): postgres-protocol's brings
//! SASLprep's Unicode tables and its own SHA-2, and code the agent never
//! runs still costs it resident pages. Passwords are used as they are (no
//! SASLprep): Vault's are ASCII, where SASLprep changes nothing.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::{digest, hmac, pbkdf2};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed server message")]
    Malformed,
    #[error("the server's nonce does not extend ours")]
    Nonce,
    #[error("the server's signature does not match: not the server that knows the password")]
    Signature,
    #[error("the server asks for {0} iterations, more than the {MAX_ITERATIONS} allowed (PostgreSQL uses 4096)")]
    Iterations(u32),
}

/// The most PBKDF2 iterations a server may ask for. PostgreSQL uses 4,096
/// (`scram_iterations`); a server asking for billions would hold a core
/// for minutes per login. 100,000 costs some tens of milliseconds, on a
/// blocking thread (`upstream::open`), never the runtime's.
pub const MAX_ITERATIONS: u32 = 100_000;

/// The channel binding of one exchange (RFC 5802 §6, RFC 5929).
pub enum Binding {
    /// `n`: none.
    No,
    /// `y`: the client could bind, the server did not offer it.
    ServerDoesNot,
    /// `p=tls-server-end-point` with this data (`binding::server_end_point`).
    ServerEndPoint(Vec<u8>),
}

impl Binding {
    fn header(&self) -> &'static str {
        match self {
            Binding::No => "n,,",
            Binding::ServerDoesNot => "y,,",
            Binding::ServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }
}

pub struct Scram {
    password: Vec<u8>,
    binding: Binding,
    client_nonce: String,
    client_first_bare: String,
    server_signature: Option<[u8; 32]>,
}

impl Scram {
    pub fn new(password: &str, binding: Binding) -> Scram {
        let bytes: [u8; 18] = rand::random();
        let client_nonce = B64.encode(bytes);
        // PostgreSQL takes the user from the startup message: `n=` is empty.
        let client_first_bare = format!("n=,r={client_nonce}");
        Scram {
            password: password.as_bytes().to_vec(),
            binding,
            client_nonce,
            client_first_bare,
            server_signature: None,
        }
    }

    /// Bound to the TLS session (SCRAM-SHA-256-PLUS).
    pub fn is_bound(&self) -> bool {
        matches!(self.binding, Binding::ServerEndPoint(_))
    }

    /// SASL's mechanism name for this exchange.
    pub fn mechanism(&self) -> &'static str {
        if self.is_bound() { "SCRAM-SHA-256-PLUS" } else { "SCRAM-SHA-256" }
    }

    /// The client-first message.
    pub fn first(&self) -> Vec<u8> {
        format!("{}{}", self.binding.header(), self.client_first_bare).into_bytes()
    }

    /// The client-final message for the server-first message.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let text = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed)?;
        let field = |k: &str| text.split(',').find_map(|f| f.strip_prefix(k));
        let nonce = field("r=").ok_or(ScramError::Malformed)?;
        let salt = B64.decode(field("s=").ok_or(ScramError::Malformed)?).map_err(|_| ScramError::Malformed)?;
        let iterations: u32 = field("i=").and_then(|i| i.parse().ok()).ok_or(ScramError::Malformed)?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(ScramError::Nonce);
        }
        if iterations > MAX_ITERATIONS {
            return Err(ScramError::Iterations(iterations));
        }
        let iterations = std::num::NonZeroU32::new(iterations).ok_or(ScramError::Malformed)?;
        let mut salted = [0u8; 32];
        pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, iterations, &salt, &self.password, &mut salted);
        let salted_key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&salted_key, b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
        // c=: the GS2 header and the binding data, so the server checks
        // that both ends saw the same TLS certificate.
        let mut c = self.binding.header().as_bytes().to_vec();
        if let Binding::ServerEndPoint(data) = &self.binding {
            c.extend_from_slice(data);
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(c));
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let signature = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()), auth_message.as_bytes());
        let proof: Vec<u8> = client_key.as_ref().iter().zip(signature.as_ref()).map(|(a, b)| a ^ b).collect();
        let server_key = hmac::sign(&salted_key, b"Server Key");
        let server_signature =
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()), auth_message.as_bytes());
        let mut expected = [0u8; 32];
        expected.copy_from_slice(server_signature.as_ref());
        self.server_signature = Some(expected);
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final message: the server proves it knew the
    /// password too.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed)?;
        let v = text.split(',').find_map(|f| f.strip_prefix("v=")).ok_or(ScramError::Malformed)?;
        let got = B64.decode(v).map_err(|_| ScramError::Malformed)?;
        match self.server_signature {
            // Compared in constant time: no early exit on the first difference.
            Some(expected) if got.len() == 32 && expected.iter().zip(&got).fold(0, |d, (a, b)| d | (a ^ b)) == 0 => {
                Ok(())
            }
            _ => Err(ScramError::Signature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example (user "user", password "pencil"), with its nonce.
    #[test]
    fn the_rfc_7677_exchange() {
        let mut s = Scram::new("pencil", Binding::No);
        s.client_nonce = "rOprNGfwEbeRWgbNEkqO".into();
        s.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let last = s.respond(server_first).unwrap();
        assert_eq!(
            String::from_utf8(last).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(s.finish(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="), Ok(()));
        assert_eq!(s.finish(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="), Err(ScramError::Signature));
    }

    /// The binding data travels in `c=` after the GS2 header, and the
    /// header of the first message is the same one.
    #[test]
    fn channel_binding_goes_into_the_final_message() {
        let mut s = Scram::new("pencil", Binding::ServerEndPoint(vec![1, 2, 3]));
        assert_eq!(s.mechanism(), "SCRAM-SHA-256-PLUS");
        assert!(s.first().starts_with(b"p=tls-server-end-point,,n=,r="));
        let nonce = format!("{}srv", s.client_nonce);
        let last = String::from_utf8(s.respond(format!("r={nonce},s=QSXCR+Q6sek8bf92,i=4096").as_bytes()).unwrap());
        let want = B64.encode(b"p=tls-server-end-point,,\x01\x02\x03");
        assert!(last.unwrap().starts_with(&format!("c={want},r={nonce},p=")));
        let y = Scram::new("pencil", Binding::ServerDoesNot);
        assert_eq!((y.mechanism(), &y.first()[..5]), ("SCRAM-SHA-256", &b"y,,n="[..]));
    }

    #[test]
    fn a_nonce_that_is_not_ours_is_refused() {
        let mut s = Scram::new("pw", Binding::No);
        assert_eq!(s.respond(b"r=someone-else,s=AAAA,i=4096"), Err(ScramError::Nonce));
        assert_eq!(s.respond(b"garbage"), Err(ScramError::Malformed));
    }

    #[test]
    fn an_iteration_bomb_is_refused_before_any_work() {
        let mut sc = Scram::new("pencil", Binding::No);
        let nonce = format!("{}server", sc.client_nonce);
        for (i, refused) in [(4096u32, false), (MAX_ITERATIONS, false), (MAX_ITERATIONS + 1, true), (u32::MAX, true)] {
            let first = format!("r={nonce},s=QSXCR+Q6sek8bf92,i={i}");
            let got = sc.respond(first.as_bytes());
            assert_eq!(got.as_ref().err() == Some(&ScramError::Iterations(i)), refused, "{i}: {got:?}");
        }
    }
}
