//! The common consul-template forms of vault-k8s `agent-inject-template-*`
//! annotations, translated to minijinja for the agent's `template:`.
//!
//! What is translated: text; `{{ with secret "PATH" }}…{{ end }}` (one
//! path per template, repeated as often as wanted: consul-template
//! de-duplicates it to one read, so do we); inside it `.Data…`,
//! `.LeaseID`, `.LeaseDuration`; `{{ range $k, $v := X }}…{{ end }}` over a
//! map (sorted keys, as Go does); `{{ if X }}`/`{{ else }}`; pipes to (or
//! calls of) `toJSON`, `toJSONPretty`, `toUnescapedJSON(Pretty)`,
//! `base64Decode`, `base64Encode`, `base64URLDecode`, `base64URLEncode`,
//! `toUpper`, `toLower`, `trimSpace`; `{{-`/`-}}` trims.
//! Anything else is an error naming the action: a pod is refused rather
//! than given a file that means something else.

use std::fmt::Write as _;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    #[error("unclosed action (no `}}}}` after `{{{{`)")]
    Unclosed,
    #[error("`{0}` is not supported (docs/injector.md lists what is)")]
    Unsupported(String),
    #[error("reads two secrets ({0:?} and {1:?}); leasehold renders one secret per file")]
    TwoPaths(String, String),
    #[error("`{{{{ end }}}}` without an open block")]
    StrayEnd,
    #[error("a block is not closed with `{{{{ end }}}}`")]
    OpenBlock,
    #[error("`{0}` is used outside `{{{{ with secret \"…\" }}}}`")]
    OutsideSecret(String),
}

/// A translated template and the secret path it reads (`None`: it reads
/// none, e.g. plain text).
#[derive(Debug, PartialEq, Eq)]
pub struct Translated {
    pub template: String,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Block {
    With,
    Range,
    If,
}

struct State {
    out: String,
    path: Option<String>,
    blocks: Vec<Block>,
    /// `range` variables in scope (`$k` → `k`).
    vars: Vec<String>,
}

pub fn translate(src: &str) -> Result<Translated, TranslateError> {
    let mut st = State { out: String::new(), path: None, blocks: Vec::new(), vars: Vec::new() };
    let mut rest = src;
    let mut trim_next = false;
    loop {
        let Some(open) = rest.find("{{") else {
            text(&mut st.out, if trim_next { rest.trim_start() } else { rest });
            break;
        };
        let mut before = &rest[..open];
        if trim_next {
            before = before.trim_start();
        }
        let after_open = &rest[open + 2..];
        // Go's trim markers need white space beside them: `{{- ` and ` -}}`.
        let (trim_before, body_start) = match after_open.strip_prefix('-') {
            Some(b) if b.starts_with(|c: char| c.is_ascii_whitespace()) => (true, b),
            _ => (false, after_open),
        };
        if trim_before {
            before = before.trim_end();
        }
        text(&mut st.out, before);
        let close = body_start.find("}}").ok_or(TranslateError::Unclosed)?;
        let mut body = &body_start[..close];
        trim_next = false;
        if let Some(b) = body.strip_suffix('-')
            && b.ends_with(|c: char| c.is_ascii_whitespace())
        {
            body = b;
            trim_next = true;
        }
        action(&mut st, body.trim())?;
        rest = &body_start[close + 2..];
    }
    if !st.blocks.is_empty() {
        return Err(TranslateError::OpenBlock);
    }
    // minijinja drops a template's final newline; Go keeps it.
    if st.out.ends_with('\n') {
        st.out.push_str("{{ \"\" }}");
    }
    Ok(Translated { template: st.out, path: st.path })
}

/// Literal text; minijinja's own openers in it are emitted as strings.
fn text(out: &mut String, t: &str) {
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '{' && matches!(chars.peek(), Some('%' | '#' | '{')) {
            out.push_str("{{ \"{\" }}");
        } else {
            out.push(c);
        }
    }
}

fn action(st: &mut State, body: &str) -> Result<(), TranslateError> {
    let unsupported = || TranslateError::Unsupported(format!("{{{{ {body} }}}}"));
    if body.starts_with("/*") && body.ends_with("*/") {
        return Ok(());
    }
    if body == "end" {
        match st.blocks.pop().ok_or(TranslateError::StrayEnd)? {
            Block::With => {}
            Block::Range => {
                st.vars.truncate(st.vars.len().saturating_sub(2));
                st.out.push_str("{% endfor %}");
            }
            Block::If => st.out.push_str("{% endif %}"),
        }
        return Ok(());
    }
    if body == "else" {
        if st.blocks.last() != Some(&Block::If) {
            return Err(unsupported());
        }
        st.out.push_str("{% else %}");
        return Ok(());
    }
    if let Some(arg) = body.strip_prefix("with secret ") {
        let path = quoted(arg.trim()).ok_or_else(unsupported)?;
        if let Some(known) = &st.path
            && *known != path
        {
            return Err(TranslateError::TwoPaths(known.clone(), path));
        }
        if st.blocks.contains(&Block::With) {
            return Err(unsupported());
        }
        st.path = Some(path);
        st.blocks.push(Block::With);
        return Ok(());
    }
    if let Some(rest) = body.strip_prefix("range ") {
        let (vars, over) = rest.split_once(":=").ok_or_else(unsupported)?;
        let names: Vec<&str> = vars.split(',').map(str::trim).collect();
        let [k, v] = names.as_slice() else { return Err(unsupported()) };
        let (k, v) = (var_name(k).ok_or_else(unsupported)?, var_name(v).ok_or_else(unsupported)?);
        let over = expr(st, over.trim(), body)?;
        let _ = write!(st.out, "{{% for {k}, {v} in {over}|dictsort %}}");
        st.vars.push(k);
        st.vars.push(v);
        st.blocks.push(Block::Range);
        return Ok(());
    }
    if let Some(cond) = body.strip_prefix("if ") {
        let cond = pipeline(st, cond.trim(), body)?;
        let _ = write!(st.out, "{{% if {cond} %}}");
        st.blocks.push(Block::If);
        return Ok(());
    }
    let e = pipeline(st, body, body)?;
    let _ = write!(st.out, "{{{{ {e} }}}}");
    Ok(())
}

/// The consul-template functions of one argument that vault-k8s users
/// use, as the agent's filters.
fn filter(f: &str) -> Option<&'static str> {
    Some(match f {
        "toJSON" | "toUnescapedJSON" => "tojson",
        "toJSONPretty" | "toUnescapedJSONPretty" => "tojson(indent=2)",
        "base64Decode" => "b64decode",
        "base64Encode" => "b64encode",
        "base64URLDecode" => "b64decode(url=true)",
        "base64URLEncode" => "b64encode(url=true)",
        "toUpper" => "upper",
        "toLower" => "lower",
        "trimSpace" => "trim",
        _ => return None,
    })
}

/// `X`, `X | toJSON`, `base64Decode X`, …
fn pipeline(st: &State, p: &str, whole: &str) -> Result<String, TranslateError> {
    let mut parts = p.split('|').map(str::trim);
    let first = parts.next().unwrap_or_default();
    // Go's call form, `fn X`: the same as `X | fn`.
    let (first, call) = match first.split_once(char::is_whitespace) {
        Some((f, arg)) if filter(f).is_some() => (arg.trim(), Some(f)),
        _ => (first, None),
    };
    let mut e = expr(st, first, whole)?;
    for f in call.into_iter().chain(parts) {
        let Some(name) = filter(f) else {
            return Err(TranslateError::Unsupported(format!("{{{{ {whole} }}}} (the function `{f}`)")));
        };
        e = format!("{e}|{name}");
    }
    Ok(e)
}

/// `.Data.a.b`, `.LeaseID`, `.LeaseDuration`, `$k`.
fn expr(st: &State, e: &str, whole: &str) -> Result<String, TranslateError> {
    if let Some(name) = var_name(e) {
        if st.vars.contains(&name) {
            return Ok(name);
        }
        return Err(TranslateError::Unsupported(format!("{{{{ {whole} }}}} (the variable `{e}`)")));
    }
    let Some(field) = e.strip_prefix('.') else {
        return Err(TranslateError::Unsupported(format!("{{{{ {whole} }}}}")));
    };
    if !st.blocks.contains(&Block::With) {
        return Err(TranslateError::OutsideSecret(e.to_string()));
    }
    let mut segs = field.split('.');
    let head = match segs.next().unwrap_or_default() {
        "Data" => "data",
        "LeaseID" => "lease_id",
        "LeaseDuration" => "lease_duration",
        _ => return Err(TranslateError::Unsupported(format!("{{{{ {whole} }}}} (the field `{e}`)"))),
    };
    let mut out = head.to_string();
    for s in segs {
        if head != "data" || s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(TranslateError::Unsupported(format!("{{{{ {whole} }}}} (the field `{e}`)")));
        }
        // Subscript form: any key, even one minijinja reserves.
        let _ = write!(out, "[\"{s}\"]");
    }
    Ok(out)
}

fn var_name(v: &str) -> Option<String> {
    let n = v.strip_prefix('$')?;
    (!n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then(|| format!("v_{n}"))
}

/// A Go string literal without escapes (paths have none).
fn quoted(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains(['"', '\\']) && !inner.is_empty()).then(|| inner.to_string())
}

/// vault-k8s's default template (`map`): one `key: value` line per key of
/// the secret's data, sorted.
pub const DEFAULT_MAP_TEMPLATE: &str = "{% for k, v in data|dictsort %}{{ k }}: {{ v }}\n{% endfor %}";

/// vault-k8s's `json` default template: the secret's data as JSON.
pub const DEFAULT_JSON_TEMPLATE: &str = "{{ data|tojson }}";

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(src: &str) -> Translated {
        translate(src).unwrap_or_else(|e| panic!("{src:?}: {e}"))
    }

    #[test]
    fn the_docs_database_form() {
        let t = ok(r#"{{- with secret "database/creds/app" -}}
postgres://{{ .Data.username }}:{{ .Data.password }}@db:5432/app
{{- end }}
"#);
        assert_eq!(t.path.as_deref(), Some("database/creds/app"));
        assert_eq!(t.template, "postgres://{{ data[\"username\"] }}:{{ data[\"password\"] }}@db:5432/app\n{{ \"\" }}");
    }

    #[test]
    fn env_file_with_exports() {
        let t = ok(
            "{{ with secret \"database/creds/app\" }}\nexport DB_USER=\"{{ .Data.username }}\"\nexport DB_PASS=\"{{ .Data.password }}\"\n{{ end }}",
        );
        assert_eq!(
            t.template,
            "\nexport DB_USER=\"{{ data[\"username\"] }}\"\nexport DB_PASS=\"{{ data[\"password\"] }}\"\n{{ \"\" }}"
        );
    }

    #[test]
    fn kv_v2_range_and_json() {
        let t = ok(r#"{{ with secret "secret/data/app" }}{{ range $k, $v := .Data.data }}{{ $k }}={{ $v }}
{{ end }}{{ .Data.data | toJSON }}{{ end }}"#);
        assert_eq!(
            t.template,
            "{% for v_k, v_v in data[\"data\"]|dictsort %}{{ v_k }}={{ v_v }}\n{% endfor %}{{ data[\"data\"]|tojson }}"
        );
    }

    #[test]
    fn the_same_path_twice_is_one_secret() {
        let t = ok(
            r#"U={{ with secret "database/creds/p" }}{{ .Data.username }}{{ end }} P={{ with secret "database/creds/p" }}{{ .Data.password }}{{ end }}"#,
        );
        assert_eq!(t.path.as_deref(), Some("database/creds/p"));
        assert_eq!(t.template, "U={{ data[\"username\"] }} P={{ data[\"password\"] }}");
    }

    #[test]
    fn if_else_and_lease_fields() {
        let t = ok(
            r#"{{ with secret "a/b" }}{{ if .Data.password }}{{ .LeaseID }} {{ .LeaseDuration }}{{ else }}none{{ end }}{{ end }}"#,
        );
        assert_eq!(
            t.template,
            "{% if data[\"password\"] %}{{ lease_id }} {{ lease_duration }}{% else %}none{% endif %}"
        );
    }

    #[test]
    fn minijinja_syntax_in_text_stays_text() {
        let t = ok("{% not a tag %} {# nor a comment #}");
        assert_eq!(t.template, "{{ \"{\" }}% not a tag %} {{ \"{\" }}# nor a comment #}");
        assert_eq!(t.path, None);
    }

    /// consul-template's functions of one value, piped or called.
    #[test]
    fn the_functions_vault_k8s_users_use() {
        let t = ok(
            r#"{{ with secret "a" }}{{ .Data.x | base64Decode }}{{ base64Decode .Data.y }}{{ .Data.z | toUpper | trimSpace }}{{ base64URLEncode .Data.w }}{{ end }}"#,
        );
        assert_eq!(
            t.template,
            r#"{{ data["x"]|b64decode }}{{ data["y"]|b64decode }}{{ data["z"]|upper|trim }}{{ data["w"]|b64encode(url=true) }}"#
        );
    }

    #[test]
    fn what_cannot_be_translated_is_named() {
        let cases = [
            (r#"{{ with secret "a" }}{{ .Data.x | sha256Hex }}{{ end }}"#, "sha256Hex"),
            (r#"{{ with pkiCert "pki/issue/r" "common_name=x" }}{{ .Cert }}{{ end }}"#, "pkiCert"),
            (r#"{{ with secret "a" }}{{ printf "%s" .Data.x }}{{ end }}"#, "printf"),
            (r#"{{ with secret "pki/issue/r" "common_name=x" }}{{ end }}"#, "common_name"),
            (r#"{{ with secret "a" }}{{ .Renewable }}{{ end }}"#, ".Renewable"),
            (r#"{{ env "HOME" }}"#, "env"),
        ];
        for (src, named) in cases {
            let e = translate(src).expect_err(src).to_string();
            assert!(e.contains(named), "{src}: {e}");
        }
        assert_eq!(
            translate(r#"{{ with secret "a" }}{{ end }}{{ with secret "b" }}{{ end }}"#),
            Err(TranslateError::TwoPaths("a".into(), "b".into()))
        );
        assert_eq!(translate("{{ .Data.x }}"), Err(TranslateError::OutsideSecret(".Data.x".into())));
        assert_eq!(translate("{{ end }}"), Err(TranslateError::StrayEnd));
        assert_eq!(translate(r#"{{ with secret "a" }}"#), Err(TranslateError::OpenBlock));
        assert_eq!(translate("{{ .Data"), Err(TranslateError::Unclosed));
    }
}
