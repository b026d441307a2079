//! ACL policies in Vault's HCL form (`path "…" { capabilities = [...] }`)
//! and Vault's rule-priority matching with `*` (prefix) and `+` (one segment).

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Capability {
    Create,
    Read,
    Update,
    Delete,
    List,
    Sudo,
    Deny,
    Patch,
}

impl Capability {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "create" => Capability::Create,
            "read" => Capability::Read,
            "update" => Capability::Update,
            "delete" => Capability::Delete,
            "list" => Capability::List,
            "sudo" => Capability::Sudo,
            "deny" => Capability::Deny,
            "patch" => Capability::Patch,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub path: String,
    pub caps: BTreeSet<Capability>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub text: String,
    pub rules: Vec<Rule>,
    /// Bumped by every write, as Vault's policy store does.
    pub version: u64,
    /// RFC 3339 time of the last write.
    pub modified: String,
}

/// Vault's built-in `default` policy, reduced to what this server serves
/// (vault-api.md §5.8).
pub const DEFAULT_POLICY: &str = r#"
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/revoke-self" { capabilities = ["update"] }
path "sys/capabilities-self" { capabilities = ["update"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
"#;

impl Policy {
    pub fn parse(name: &str, text: &str) -> Result<Policy, String> {
        let rules = parse_hcl(text)?;
        let modified = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        Ok(Policy { name: name.to_string(), text: text.to_string(), rules, version: 1, modified })
    }
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    Eq,
    Comma,
}

fn tokenize(text: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1
                }
            }
            '/' if chars.get(i + 1) == Some(&'/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1
                }
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                    i += 1
                }
                i += 2;
            }
            '{' => (toks.push(Tok::LBrace), i += 1).1,
            '}' => (toks.push(Tok::RBrace), i += 1).1,
            '[' => (toks.push(Tok::LBracket), i += 1).1,
            ']' => (toks.push(Tok::RBracket), i += 1).1,
            '=' => (toks.push(Tok::Eq), i += 1).1,
            ',' => (toks.push(Tok::Comma), i += 1).1,
            '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string".into()),
                        Some('"') => break,
                        Some('\\') => {
                            if let Some(n) = chars.get(i + 1) {
                                s.push(*n);
                            }
                            i += 2;
                        }
                        Some(c) => {
                            s.push(*c);
                            i += 1
                        }
                    }
                }
                i += 1;
                toks.push(Tok::Str(s));
            }
            c if c.is_alphanumeric() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '-') {
                    i += 1
                }
                toks.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            other => return Err(format!("illegal char {other:?}")),
        }
    }
    Ok(toks)
}

fn parse_hcl(text: &str) -> Result<Vec<Rule>, String> {
    let toks = tokenize(text)?;
    let mut rules = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match (&toks[i], toks.get(i + 1), toks.get(i + 2)) {
            (Tok::Ident(kw), Some(Tok::Str(path)), Some(Tok::LBrace)) if kw == "path" => {
                i += 3;
                let mut caps = BTreeSet::new();
                while i < toks.len() && toks[i] != Tok::RBrace {
                    let Tok::Ident(key) = &toks[i] else {
                        return Err(format!("unexpected token in path {path:?}"));
                    };
                    if toks.get(i + 1) != Some(&Tok::Eq) {
                        return Err(format!("expected '=' after {key}"));
                    }
                    i += 2;
                    if toks.get(i) == Some(&Tok::LBracket) {
                        i += 1;
                        while i < toks.len() && toks[i] != Tok::RBracket {
                            match &toks[i] {
                                Tok::Str(s) if key == "capabilities" => {
                                    let cap =
                                        Capability::parse(s).ok_or_else(|| format!("invalid capability {s:?}"))?;
                                    caps.insert(cap);
                                }
                                Tok::Str(_) | Tok::Comma => {}
                                _ => return Err("malformed list".into()),
                            }
                            i += 1;
                        }
                        i += 1;
                    } else {
                        // Scalar options (e.g. `min_wrapping_ttl`): accepted, not enforced.
                        i += 1;
                    }
                }
                if i >= toks.len() {
                    return Err("unterminated path block".into());
                }
                i += 1;
                rules.push(Rule { path: path.clone(), caps });
            }
            (Tok::Ident(kw), _, _) if kw == "name" => i += 3,
            _ => return Err("expected path \"...\" { ... }".into()),
        }
    }
    Ok(rules)
}

/// The merged rules of a token's policies.
pub struct Acl {
    rules: BTreeMap<String, BTreeSet<Capability>>,
}

impl Acl {
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Acl {
        let mut rules: BTreeMap<String, BTreeSet<Capability>> = BTreeMap::new();
        for policy in policies {
            for rule in &policy.rules {
                rules.entry(rule.path.clone()).or_default().extend(rule.caps.iter().copied());
            }
        }
        Acl { rules }
    }

    /// Capabilities granted on `path` by the highest-priority matching rule.
    pub fn capabilities(&self, path: &str) -> BTreeSet<Capability> {
        if let Some(caps) = self.rules.get(path) {
            return effective(caps);
        }
        let best =
            self.rules.iter().filter(|(pattern, _)| glob_match(pattern, path)).max_by(|a, b| priority_cmp(a.0, b.0));
        best.map(|(_, caps)| effective(caps)).unwrap_or_default()
    }

    #[cfg(test)]
    pub fn allows(&self, path: &str, cap: Capability) -> bool {
        self.capabilities(path).contains(&cap)
    }
}

fn effective(caps: &BTreeSet<Capability>) -> BTreeSet<Capability> {
    if caps.contains(&Capability::Deny) { BTreeSet::new() } else { caps.clone() }
}

fn glob_match(pattern: &str, path: &str) -> bool {
    let (pattern, prefix) = match pattern.strip_suffix('*') {
        Some(p) => (p, true),
        None => (pattern, false),
    };
    let pat_segs: Vec<&str> = pattern.split('/').collect();
    let path_segs: Vec<&str> = path.split('/').collect();
    for (idx, pseg) in pat_segs.iter().enumerate() {
        let last = idx == pat_segs.len() - 1;
        let Some(seg) = path_segs.get(idx) else {
            return false;
        };
        if *pseg == "+" {
            if last && !prefix && path_segs.len() != pat_segs.len() {
                return false;
            }
            continue;
        }
        if last {
            if prefix {
                return seg.starts_with(pseg);
            }
            return seg == pseg && path_segs.len() == pat_segs.len();
        }
        if seg != pseg {
            return false;
        }
    }
    prefix
}

/// Vault's ordering: a later first wildcard, no trailing `*`, fewer `+`
/// segments, longer, then lexicographically larger wins.
fn priority_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let first_wild = |p: &str| p.find(['*', '+']).unwrap_or(p.len());
    let plus = |p: &str| p.split('/').filter(|s| *s == "+").count();
    first_wild(a)
        .cmp(&first_wild(b))
        .then_with(|| b.ends_with('*').cmp(&a.ends_with('*')))
        .then_with(|| plus(b).cmp(&plus(a)))
        .then_with(|| a.len().cmp(&b.len()))
        .then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(text: &str) -> Acl {
        let p = Policy::parse("p", text).unwrap();
        Acl::new([&p])
    }

    #[test]
    fn parses_and_matches_globs() {
        let a = acl(r#"
            # comment
            path "database/creds/app" { capabilities = ["read"] }
            path "secret/*" { capabilities = ["read", "list"] }
            path "secret/deny/*" { capabilities = ["deny"] }
            path "auth/+/login" { capabilities = ["update"] }
            "#);
        assert!(a.allows("database/creds/app", Capability::Read));
        assert!(!a.allows("database/creds/other", Capability::Read));
        assert!(a.allows("secret/a/b", Capability::List));
        assert!(!a.allows("secret/deny/x", Capability::Read));
        assert!(a.allows("auth/kubernetes/login", Capability::Update));
        assert!(!a.allows("auth/kubernetes/login/x", Capability::Update));
    }

    #[test]
    fn rejects_bad_capability() {
        assert!(Policy::parse("p", r#"path "a" { capabilities = ["fly"] }"#).is_err());
        assert!(Policy::parse("p", r#"path "a" { capabilities = ["read"] "#).is_err());
    }
}
