//! Rendering credentials into files: minijinja templates in a sandbox
//! (strict undefined, fuel limit, no loader), the built-in `json` and `env`
//! formats, and atomic replacement so a reader sees the old file or the new
//! one, never a partial one.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use config::{Config, ConfigError, FileConfig, Format, Listen};
use vault::secret::{LeaseId, SecretData};

use crate::clock::rfc3339;
use crate::files::Target;

/// Instructions a single render may execute; stops runaway templates.
const FUEL: u64 = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{file}: template failed: {reason}")]
    Template { file: PathBuf, reason: String },
}

/// What a template sees.
pub struct Context<'a> {
    pub name: &'a str,
    pub data: &'a SecretData,
    pub lease_id: &'a LeaseId,
    pub lease_duration: Duration,
    pub issued_at: SystemTime,
    pub expires_at: Option<SystemTime>,
    /// The credentials being replaced, until their lease is revoked.
    pub previous: Option<&'a SecretData>,
    /// The secret's proxy: its address, and the local password if any.
    pub proxy: Option<(&'a Listen, Option<&'a str>)>,
    /// How long replaced credentials keep working after new files are
    /// written (`schedule::rotation_window`); none without a lease.
    pub rotation_window: Option<Duration>,
}

impl Context<'_> {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "username": self.data.str("username"),
            "password": self.data.str("password"),
            "data": Value::Object(self.data.expose().clone()),
            "lease_id": self.lease_id.expose(),
            "lease_duration": self.lease_duration.as_secs(),
            "issued_at": rfc3339(self.issued_at),
            "expires_at": self.expires_at.map(rfc3339),
            "rotation_window_secs": self.rotation_window.map(|w| w.as_secs()),
            // Always there, empty without one: `{{ previous.username }}`
            // renders "" instead of failing the strict template.
            "previous": match self.previous {
                Some(p) => json!({
                    "username": p.str("username").unwrap_or_default(),
                    "password": p.str("password").unwrap_or_default(),
                    "data": Value::Object(p.expose().clone()),
                }),
                None => json!({ "username": "", "password": "", "data": {} }),
            },
            "proxy": {
                "listen": self.proxy.map(|p| p.0.to_string()).unwrap_or_default(),
                "password": self.proxy.and_then(|p| p.1).unwrap_or_default(),
            },
        })
    }
}

#[derive(Debug, Clone)]
enum Kind {
    Json,
    Env,
    Template(String),
}

#[derive(Debug, Clone)]
struct FilePlan {
    target: Target,
    kind: Kind,
}

/// One secret's files: how each is made and the templates compiled for
/// them. Travels in the secret's `SecretSpec`, so a supervisor renders
/// with what its own config compiled, whatever a reload does to the others.
pub struct Templates {
    /// Shared by every secret of one compile (one sandbox, its filters).
    env: Arc<Environment<'static>>,
    plans: Vec<FilePlan>,
}

/// Every secret's `Templates`, by secret name.
pub struct Renderer {
    secrets: HashMap<String, Arc<Templates>>,
}

fn sandbox(undefined: UndefinedBehavior) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(undefined);
    env.set_fuel(Some(FUEL));
    // Credentials files are not HTML: never escape.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.add_filter("urlencode", urlencode);
    env.add_filter("shell_quote", |s: String| shell_quote(&s));
    env.add_filter("pgpass_escape", |s: String| pgpass_escape(&s));
    // consul-template's base64Decode and friends (the injector translates
    // vault-k8s templates to these).
    env.add_filter("b64decode", b64decode);
    env.add_filter("b64encode", b64encode);
    env
}

fn b64_engine(kwargs: &minijinja::value::Kwargs) -> Result<base64::engine::GeneralPurpose, minijinja::Error> {
    let url: Option<bool> = kwargs.get("url")?;
    kwargs.assert_all_used()?;
    Ok(if url == Some(true) {
        base64::engine::general_purpose::URL_SAFE
    } else {
        base64::engine::general_purpose::STANDARD
    })
}

/// Base64 (or with `url=true`, base64url) to text; an error names neither
/// the input nor the output (either may be a secret).
fn b64decode(s: String, kwargs: minijinja::value::Kwargs) -> Result<String, minijinja::Error> {
    use base64::Engine as _;
    let bad = |what: &str| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("b64decode: {what}"));
    let bytes = b64_engine(&kwargs)?.decode(s.trim()).map_err(|_| bad("the value is not base64"))?;
    String::from_utf8(bytes).map_err(|_| bad("the decoded value is not UTF-8 text"))
}

fn b64encode(s: String, kwargs: minijinja::value::Kwargs) -> Result<String, minijinja::Error> {
    use base64::Engine as _;
    Ok(b64_engine(&kwargs)?.encode(s.as_bytes()))
}

impl Renderer {
    /// Compiles every template (inline or `template_file`). Errors name the
    /// config key of the template.
    pub fn compile(config: &Config, config_path: &Path) -> Result<Renderer, ConfigError> {
        Self::compile_with(config, config_path, UndefinedBehavior::Strict)
    }

    /// `leasehold check` renders secrets whose data shape it cannot know
    /// (e.g. KV) with lenient undefined values.
    pub fn compile_lenient(config: &Config, config_path: &Path) -> Result<Renderer, ConfigError> {
        Self::compile_with(config, config_path, UndefinedBehavior::Chainable)
    }

    fn compile_with(
        config: &Config,
        config_path: &Path,
        undefined: UndefinedBehavior,
    ) -> Result<Renderer, ConfigError> {
        let mut env = sandbox(undefined);
        let mut plans = Vec::new();
        for (i, secret) in config.secrets.iter().enumerate() {
            let mut secret_plans = Vec::new();
            for (j, file) in secret.files.iter().enumerate() {
                let kind = template_kind(&mut env, file, i, j, config_path)?;
                let target = Target { path: file.path.clone(), mode: file.mode, owner: file.owner, group: file.group };
                secret_plans.push(FilePlan { target, kind });
            }
            plans.push((secret.name.clone(), secret_plans));
        }
        let env = Arc::new(env);
        let secrets =
            plans.into_iter().map(|(name, plans)| (name, Arc::new(Templates { env: env.clone(), plans }))).collect();
        Ok(Renderer { secrets })
    }

    /// The templates of secret `name` (none for a secret not in the config).
    pub fn templates(&self, name: &str) -> Arc<Templates> {
        self.secrets.get(name).cloned().unwrap_or_else(|| Arc::new(Templates::none()))
    }
}

impl Templates {
    /// No files (a proxy-only secret, or one the config does not name).
    pub fn none() -> Templates {
        Templates { env: Arc::new(Environment::empty()), plans: Vec::new() }
    }

    /// Renders the secret's files in memory.
    pub fn render(&self, ctx: &Context) -> Result<Vec<(Target, Zeroizing<String>)>, RenderError> {
        let value = ctx.to_json();
        let mut out = Vec::new();
        for plan in &self.plans {
            let fail = |reason: String| RenderError::Template { file: plan.target.path.clone(), reason };
            let text = match &plan.kind {
                Kind::Json => json_format(ctx),
                Kind::Env => env_format(ctx.data),
                Kind::Template(name) => {
                    let tmpl = self.env.get_template(name).map_err(|e| fail(e.to_string()))?;
                    tmpl.render(minijinja::Value::from(Serde(&value))).map_err(|e| {
                        let missing = if e.kind() == minijinja::ErrorKind::UndefinedError {
                            undefined_names(&tmpl, &value)
                        } else {
                            String::new()
                        };
                        fail(format!("{}{missing}", describe(&e)))
                    })?
                }
            };
            out.push((plan.target.clone(), Zeroizing::new(text)));
        }
        Ok(out)
    }
}

impl Templates {
    /// `leasehold check` for a secret whose shape is unknown (KV, PKI):
    /// renders with permissive sample data as `data` (any key is there,
    /// iterates as empty, `.items()` and other methods answer, prints as
    /// `sample`), so a template the agent would render passes; errors that
    /// only the real values decide (types, arithmetic, a missing key) are
    /// not counted, while unknown filters, functions and tests, and syntax,
    /// are.
    pub fn check_permissive(&self, ctx: &Context) -> Result<(), RenderError> {
        let value = ctx.to_json();
        let mut root = top_level(&value);
        root.insert("data".into(), minijinja::Value::from_object(Sample));
        if let Some(prev) = value.get("previous") {
            let mut p = top_level(prev);
            p.insert("data".into(), minijinja::Value::from_object(Sample));
            root.insert("previous".into(), minijinja::Value::from(p));
        }
        for plan in &self.plans {
            let Kind::Template(name) = &plan.kind else { continue };
            let fail = |reason: String| RenderError::Template { file: plan.target.path.clone(), reason };
            let tmpl = self.env.get_template(name).map_err(|e| fail(e.to_string()))?;
            if let Err(e) = tmpl.render(minijinja::Value::from(root.clone())) {
                use minijinja::ErrorKind::*;
                let data_decides =
                    matches!(e.kind(), InvalidOperation | UndefinedError | NonKey | NonPrimitive | CannotUnpack);
                if !data_decides {
                    return Err(fail(describe(&e)));
                }
            }
        }
        Ok(())
    }
}

/// A JSON object's values as template values, by key.
fn top_level(v: &Value) -> std::collections::BTreeMap<String, minijinja::Value> {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), minijinja::Value::from(Serde(v)))).collect())
        .unwrap_or_default()
}

/// Sample data of unknown shape (`check_permissive`).
#[derive(Debug)]
struct Sample;

impl minijinja::value::Object for Sample {
    fn repr(self: &Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, _key: &minijinja::Value) -> Option<minijinja::Value> {
        Some(minijinja::Value::from_object(Sample))
    }

    fn enumerate(self: &Arc<Self>) -> minijinja::value::Enumerator {
        minijinja::value::Enumerator::Empty
    }

    fn call_method(
        self: &Arc<Self>,
        _state: &mut minijinja::State<'_, '_>,
        method: &str,
        _args: &[minijinja::Value],
    ) -> Result<minijinja::Value, minijinja::Error> {
        Ok(match method {
            "items" | "keys" | "values" => minijinja::Value::from(Vec::<minijinja::Value>::new()),
            _ => minijinja::Value::from_object(Sample),
        })
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sample")
    }
}

fn template_kind(
    env: &mut Environment<'static>,
    file: &FileConfig,
    i: usize,
    j: usize,
    config_path: &Path,
) -> Result<Kind, ConfigError> {
    let err = |key: &str, message: String| ConfigError {
        file: config_path.display().to_string(),
        key: format!("secrets[{i}].files[{j}].{key}"),
        message,
    };
    let name = format!("secrets[{i}].files[{j}]");
    let (key, source) = match (&file.template, &file.template_file) {
        (Some(t), _) => ("template", t.clone()),
        (None, Some(p)) => (
            "template_file",
            fs::read_to_string(p).map_err(|e| err("template_file", format!("cannot read {}: {e}", p.display())))?,
        ),
        (None, None) => {
            return Ok(match file.format {
                Some(Format::Env) => Kind::Env,
                _ => Kind::Json,
            });
        }
    };
    env.add_template_owned(name.clone(), source).map_err(|e| err(key, describe(&e)))?;
    Ok(Kind::Template(name))
}

/// For an undefined value: which of the template's names the context lacks,
/// and the keys that are there instead. Names, never values: a key is no
/// secret, its value may be.
fn undefined_names(tmpl: &minijinja::Template<'_, '_>, ctx: &Value) -> String {
    let mut names: Vec<String> = tmpl.undeclared_variables(true).into_iter().collect();
    names.sort();
    for name in names {
        let mut at = ctx;
        let mut path = Vec::new();
        for part in name.split('.') {
            match at.get(part) {
                Some(next) => {
                    at = next;
                    path.push(part);
                }
                None => {
                    let here = if path.is_empty() { "the context".to_string() } else { path.join(".") };
                    let keys: Vec<&str> =
                        at.as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
                    return format!(": `{name}` is not defined ({here} has: {})", keys.join(", "));
                }
            }
        }
    }
    String::new()
}

/// minijinja's message plus the line, without the template source.
fn describe(e: &minijinja::Error) -> String {
    match (e.detail(), e.line()) {
        (Some(d), Some(l)) => format!("{} (line {l}): {d}", e.kind()),
        (Some(d), None) => format!("{}: {d}", e.kind()),
        (None, Some(l)) => format!("{} (line {l})", e.kind()),
        (None, None) => e.kind().to_string(),
    }
}

/// `format: json`: the keys of `data` plus `lease_id`, `lease_duration`,
/// `expires_at`, one flat object.
fn json_format(ctx: &Context) -> String {
    let mut m: Map<String, Value> = ctx.data.expose().clone();
    m.insert("lease_id".into(), json!(ctx.lease_id.expose()));
    m.insert("lease_duration".into(), json!(ctx.lease_duration.as_secs()));
    m.insert("expires_at".into(), json!(ctx.expires_at.map(rfc3339)));
    let mut text = serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default();
    text.push('\n');
    text
}

/// `format: env`: `KEY='value'` for each key of `data`, upper-cased, values
/// shell-quoted. Keys that are not valid variable names are skipped.
fn env_format(data: &SecretData) -> String {
    let mut out = String::new();
    for (k, v) in data.expose() {
        let key: String =
            k.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        if key.is_empty() || key.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let value = match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        out.push_str(&format!("{key}={}\n", shell_quote(&value)));
    }
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so the
/// result is safe in any URL part (user info, path, query).
fn urlencode(s: String) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `.pgpass` fields escape `\` and `:` with a backslash.
fn pgpass_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> SecretData {
        SecretData::new(json!({"username": "v-app", "password": "p@ss:w/rd'x"}).as_object().unwrap().clone())
    }

    #[test]
    fn filters_escape_for_their_targets() {
        assert_eq!(urlencode("p@ss:w/rd".into()), "p%40ss%3Aw%2Frd");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(pgpass_escape("a:b\\c"), "a\\:b\\\\c");
    }

    #[test]
    fn env_and_json_formats() {
        let d = data();
        let env = env_format(&d);
        assert!(env.contains("USERNAME='v-app'\n"));
        assert!(env.contains("PASSWORD='p@ss:w/rd'\\''x'\n"));
        let lease = LeaseId::new("database/creds/app/abc".into());
        let ctx = Context {
            name: "db",
            data: &d,
            lease_id: &lease,
            lease_duration: Duration::from_secs(60),
            issued_at: SystemTime::UNIX_EPOCH,
            expires_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(60)),
            previous: None,
            proxy: None,
            rotation_window: None,
        };
        let v: Value = serde_json::from_str(&json_format(&ctx)).unwrap();
        assert_eq!(v["username"], "v-app");
        assert_eq!(v["lease_duration"], 60);
        assert_eq!(v["expires_at"], "1970-01-01T00:01:00Z");
    }

    #[test]
    fn templates_are_strict_and_fuelled() {
        let mut env = sandbox(UndefinedBehavior::Strict);
        env.add_template_owned("t", "{{ username|urlencode }}:{{ password|urlencode }}").unwrap();
        let value = json!({"username": "u", "password": "a b"});
        assert_eq!(env.get_template("t").unwrap().render(minijinja::Value::from(Serde(&value))).unwrap(), "u:a%20b");
        env.add_template_owned("missing", "{{ nope }}").unwrap();
        assert!(env.get_template("missing").unwrap().render(minijinja::Value::from(Serde(&value))).is_err());
        env.add_template_owned(
            "loop",
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        )
        .unwrap();
        assert!(env.get_template("loop").unwrap().render(minijinja::Value::from(Serde(&value))).is_err());
    }

    /// #24: template errors named no variable. Now the missing name and the
    /// keys there are, never a value.
    #[test]
    fn an_undefined_name_is_named_with_the_keys_there() {
        let mut env = sandbox(UndefinedBehavior::Strict);
        env.add_template_owned("t", "{{ username }}:{{ data.pasword }}").unwrap();
        let value = json!({"username": "u", "data": {"username": "u", "password": "s3cret-value"}});
        let t = env.get_template("t").unwrap();
        t.render(minijinja::Value::from(Serde(&value))).unwrap_err();
        let said = undefined_names(&t, &value);
        assert_eq!(said, ": `data.pasword` is not defined (data has: password, username)");
        assert!(!said.contains("s3cret"));
        env.add_template_owned("top", "{{ usrname }}").unwrap();
        let said = undefined_names(&env.get_template("top").unwrap(), &value);
        assert_eq!(said, ": `usrname` is not defined (the context has: data, username)");
    }

    #[test]
    fn templates_cannot_read_files_or_the_environment() {
        let cfg = |template: &str| {
            let yaml = format!(
                "vault:\n  address: http://v:8200\nauth:\n  kubernetes:\n    role: r\nsecrets:\n  - name: db\n    path: database/creds/r\n    files:\n      - path: /tmp/x\n        template: {template:?}\n"
            );
            Config::parse(&yaml, Path::new("t.yaml"), &|_| None).unwrap()
        };
        let ctx_data = data();
        let lease = LeaseId::new("database/creds/r/x".into());
        let ctx = Context {
            name: "db",
            data: &ctx_data,
            lease_id: &lease,
            lease_duration: Duration::from_secs(60),
            issued_at: SystemTime::UNIX_EPOCH,
            expires_at: None,
            previous: None,
            proxy: None,
            rotation_window: None,
        };
        for template in ["{% include '/etc/passwd' %}", "{{ env.HOME }}", "{{ range(10000000) | list | length }}"] {
            let r = Renderer::compile(&cfg(template), Path::new("t.yaml"));
            let rendered = r.ok().and_then(|r| r.templates("db").render(&ctx).ok());
            assert!(rendered.is_none(), "{template} rendered: {:?}", rendered.map(|f| f[0].1.to_string()));
        }
    }
}
