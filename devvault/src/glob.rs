//! Vault's `strutil.StrListContainsGlob`: `*` anywhere in an entry matches
//! any run of characters.

pub fn matches_any(list: &[String], s: &str) -> bool {
    list.iter().any(|pattern| matches(pattern, s))
}

pub fn matches(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let mut rest = s;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(idx) => rest = &rest[idx + part.len()..],
                None => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn globs() {
        let list = vec!["app-*".to_string(), "exact".to_string()];
        assert!(super::matches_any(&list, "app-role"));
        assert!(super::matches_any(&list, "exact"));
        assert!(!super::matches_any(&list, "other"));
        assert!(super::matches("*", "anything"));
        assert!(super::matches("a*c*e", "abcde"));
        assert!(!super::matches("a*c*e", "abcdf"));
    }
}
