//! Statement handling shared by the database plugins: Vault's `{{key}}`
//! substitution, `;` splitting and the `{{expiration}}` layout.

use chrono::{DateTime, Utc};

/// Plain `{{key}}` replacement, no escaping (as Vault's `dbutil.QueryHelper`).
pub fn substitute(query: &str, vars: &[(&str, &str)]) -> String {
    let mut out = query.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    out
}

/// Each element is split on `;` unless it holds a multi-line block (a word
/// `END` outside quotes, as in `DO $$ … END $$`), which runs as-is.
pub fn split_statements(statements: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for stmt in statements {
        if contains_block(stmt) {
            if !stmt.trim().is_empty() {
                out.push(stmt.trim().to_string());
            }
            continue;
        }
        out.extend(stmt.split(';').map(str::trim).filter(|q| !q.is_empty()).map(str::to_string));
    }
    out
}

fn contains_block(stmt: &str) -> bool {
    let mut unquoted = String::new();
    let mut in_quote = false;
    for c in stmt.chars() {
        if c == '\'' {
            in_quote = !in_quote;
            unquoted.push(' ');
        } else if !in_quote {
            unquoted.push(c);
        }
    }
    unquoted.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').any(|w| w.eq_ignore_ascii_case("END"))
}

/// Vault's `2006-01-02 15:04:05-0700` layout (UTC here).
pub fn expiration_text(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%z").to_string()
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_keeps_blocks() {
        let stmts = vec![
            "CREATE ROLE \"{{name}}\"; GRANT x TO \"{{name}}\";".to_string(),
            "DO $$ BEGIN PERFORM 1; END $$;".to_string(),
        ];
        let out = split_statements(&stmts);
        assert_eq!(out.len(), 3);
        assert_eq!(out[2], "DO $$ BEGIN PERFORM 1; END $$;");
        assert_eq!(substitute("A {{name}} {{name}}", &[("name", "u")]), "A u u");
    }

    #[test]
    fn expiration_layout() {
        let t = DateTime::from_timestamp(1716803605, 0).unwrap();
        assert_eq!(expiration_text(t), "2024-05-27 09:53:25+0000");
    }
}
