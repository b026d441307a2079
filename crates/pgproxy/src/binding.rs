//! `tls-server-end-point` channel binding data (RFC 5929 §4.1): the hash
//! of the server's certificate, with the hash of its signature algorithm
//! (SHA-256 for MD5 and SHA-1). A man in the middle terminating TLS with
//! its own certificate yields another hash than the database computes, so
//! SCRAM-SHA-256-PLUS fails through it even when the certificate is not
//! verified. Only the signature algorithm is read from the DER: no X.509
//! library for one field.

use ring::digest;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindingError {
    #[error("the server's certificate is not DER the proxy can read")]
    Malformed,
    #[error(
        "the server's certificate is signed with {0}, which tls-server-end-point cannot bind to (as PostgreSQL: RSA or ECDSA with SHA-1/256/384/512 only)"
    )]
    Unsupported(String),
}

/// The binding data for the certificate `der`.
pub fn server_end_point(der: &[u8]) -> Result<Vec<u8>, BindingError> {
    let algorithm =
        match signature_oid(der)? {
            // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1, ecdsa-with-SHA256
            [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04 | 0x05 | 0x0b]
            | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]
            | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02] => &digest::SHA256,
            [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c]
            | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] => &digest::SHA384,
            [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]
            | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04] => &digest::SHA512,
            other => return Err(BindingError::Unsupported(oid_text(other))),
        };
    Ok(digest::digest(algorithm, der).as_ref().to_vec())
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm
/// AlgorithmIdentifier ::= SEQUENCE { OID, parameters }, signature }: the OID.
fn signature_oid(der: &[u8]) -> Result<&[u8], BindingError> {
    let (certificate, _) = tlv(der, 0x30)?;
    let (_tbs, rest) = tlv(certificate, 0x30)?;
    let (algorithm, _) = tlv(rest, 0x30)?;
    let (oid, _) = tlv(algorithm, 0x06)?;
    Ok(oid)
}

/// One DER element of type `tag` at the start of `b`: its contents, and
/// what follows it.
fn tlv(b: &[u8], tag: u8) -> Result<(&[u8], &[u8]), BindingError> {
    let (&t, b) = b.split_first().ok_or(BindingError::Malformed)?;
    let (&first, mut b) = b.split_first().ok_or(BindingError::Malformed)?;
    if t != tag {
        return Err(BindingError::Malformed);
    }
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        // The long form: this many length bytes follow (a certificate's
        // lengths fit in 4).
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return Err(BindingError::Malformed);
        }
        let len = b[..n].iter().fold(0usize, |l, byte| (l << 8) | usize::from(*byte));
        b = &b[n..];
        len
    };
    if b.len() < len {
        return Err(BindingError::Malformed);
    }
    Ok(b.split_at(len))
}

/// An OID in dotted form, for the error (a name is no secret).
fn oid_text(oid: &[u8]) -> String {
    let Some((&first, rest)) = oid.split_first() else { return "an empty OID".into() };
    let mut parts = vec![u64::from(first / 40), u64::from(first % 40)];
    let mut value = 0u64;
    for b in rest {
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            parts.push(value);
            value = 0;
        }
    }
    parts.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate's outer shape with this signature algorithm OID.
    fn cert(oid: &[u8]) -> Vec<u8> {
        let tbs = [0x30, 0x03, 0x02, 0x01, 0x01];
        let mut alg = vec![0x30, (oid.len() + 2) as u8, 0x06, oid.len() as u8];
        alg.extend_from_slice(oid);
        let sig = [0x03, 0x02, 0x00, 0xff];
        let body: Vec<u8> = [&tbs[..], &alg, &sig].concat();
        // A long-form length, as real certificates have.
        [&[0x30, 0x81, body.len() as u8][..], &body].concat()
    }

    #[test]
    fn the_hash_follows_the_signature_algorithm() {
        let ecdsa_sha256 = cert(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]);
        assert_eq!(server_end_point(&ecdsa_sha256).unwrap(), digest::digest(&digest::SHA256, &ecdsa_sha256).as_ref());
        let rsa_sha1 = cert(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05]);
        assert_eq!(server_end_point(&rsa_sha1).unwrap().len(), 32, "SHA-1 is bound with SHA-256");
        let rsa_sha384 = cert(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c]);
        assert_eq!(server_end_point(&rsa_sha384).unwrap().len(), 48);
        let ecdsa_sha512 = cert(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04]);
        assert_eq!(server_end_point(&ecdsa_sha512).unwrap().len(), 64);
    }

    #[test]
    fn what_cannot_be_bound_is_named() {
        let ed25519 = cert(&[0x2b, 0x65, 0x70]);
        assert_eq!(server_end_point(&ed25519), Err(BindingError::Unsupported("1.3.101.112".into())));
        let pss = cert(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a]);
        assert_eq!(server_end_point(&pss), Err(BindingError::Unsupported("1.2.840.113549.1.1.10".into())));
        for junk in [&[][..], &[0x30], &[0x30, 0x85, 1, 2, 3, 4, 5], &[0x31, 0x00], &cert(&[0x2b])[..10]] {
            assert_eq!(server_end_point(junk), Err(BindingError::Malformed), "{junk:?}");
        }
    }
}
