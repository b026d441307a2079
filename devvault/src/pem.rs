//! PEM handling for `pem_keys`: Vault accepts public keys and certificates;
//! for a certificate we take its SubjectPublicKeyInfo.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The public key of `pem` as a `PUBLIC KEY` PEM block: unchanged for a key,
/// extracted for a `CERTIFICATE`. `None` when it is neither.
pub fn public_key_pem(pem: &str) -> Option<String> {
    let pem = pem.trim();
    if !pem.starts_with("-----BEGIN CERTIFICATE-----") {
        return Some(pem.to_string());
    }
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(body.trim()).ok()?;
    let spki = certificate_spki(&der)?;
    let encoded = STANDARD.encode(spki);
    let lines: Vec<&str> = encoded.as_bytes().chunks(64).filter_map(|c| std::str::from_utf8(c).ok()).collect();
    Some(format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", lines.join("\n")))
}

/// One DER element at the start of `der`: (tag, header + content length,
/// content range).
fn element(der: &[u8]) -> Option<(u8, usize, std::ops::Range<usize>)> {
    let tag = *der.first()?;
    let first = *der.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *der.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    (end <= der.len()).then_some((tag, end, header..end))
}

/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
/// serial, signature, issuer, validity, subject, subjectPublicKeyInfo, … } … }
fn certificate_spki(der: &[u8]) -> Option<&[u8]> {
    let (_, _, cert) = element(der)?;
    let cert = &der[cert];
    let (_, _, tbs) = element(cert)?;
    let mut rest = &cert[tbs];
    let (tag, len, _) = element(rest)?;
    if tag == 0xa0 {
        rest = &rest[len..];
    }
    for _ in 0..5 {
        let (_, len, _) = element(rest)?;
        rest = &rest[len..];
    }
    let (_, len, _) = element(rest)?;
    Some(&rest[..len])
}
