//! Random identifiers in Vault's alphabets.

use rand::Rng;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub fn base62(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n).map(|_| BASE62[rng.random_range(0..BASE62.len())] as char).collect()
}

/// Vault's default password generator: 20 characters of `[A-Za-z0-9-]` with
/// at least one lowercase, uppercase, digit and dash.
pub fn password() -> String {
    const CHARSET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-";
    let mut rng = rand::rng();
    loop {
        let p: String = (0..20).map(|_| CHARSET[rng.random_range(0..CHARSET.len())] as char).collect();
        if p.chars().any(|c| c.is_ascii_lowercase())
            && p.chars().any(|c| c.is_ascii_uppercase())
            && p.chars().any(|c| c.is_ascii_digit())
            && p.contains('-')
        {
            return p;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn password_rules() {
        for _ in 0..50 {
            let p = super::password();
            assert_eq!(p.len(), 20);
            assert!(p.contains('-'));
        }
        assert_eq!(super::base62(24).len(), 24);
    }
}
