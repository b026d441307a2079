//! Rendering credentials into files: minijinja templates in a sandbox
//! (strict undefined, fuel limit, no loader), the built-in `json` and `env`
//! formats, and atomic replacement so a reader sees the old file or the new
//! one, never a partial one.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use crate::config::{Config, ConfigError, FileConfig, Format};
use crate::secret::{LeaseId, SecretData};

/// Instructions a single render may execute; stops runaway templates.
const FUEL: u64 = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{file}: template failed: {reason}")]
    Template { file: PathBuf, reason: String },
    #[error("{file}: cannot write: {reason}")]
    Write { file: PathBuf, reason: String },
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
    pub proxy: Option<(&'a str, Option<&'a str>)>,
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
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
                "listen": self.proxy.map_or("", |p| p.0),
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
pub struct FilePlan {
    pub path: PathBuf,
    kind: Kind,
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

/// Compiled templates and file plans for every secret of a config.
pub struct Renderer {
    env: Environment<'static>,
    plans: Vec<Vec<FilePlan>>,
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
    env
}

impl Renderer {
    /// Compiles every template (inline or `template_file`). Errors name the
    /// config key of the template.
    pub fn compile(config: &Config, config_path: &Path) -> Result<Renderer, ConfigError> {
        Self::compile_with(config, config_path, UndefinedBehavior::Strict)
    }

    /// `leasehold check` renders secrets whose data shape it cannot know
    /// (e.g. KV) with lenient undefined values.
    pub fn compile_with(
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
                secret_plans.push(FilePlan {
                    path: file.path.clone(),
                    kind,
                    mode: file.mode,
                    owner: file.owner,
                    group: file.group,
                });
            }
            plans.push(secret_plans);
        }
        Ok(Renderer { env, plans })
    }

    pub fn plans(&self, secret_index: usize) -> &[FilePlan] {
        self.plans.get(secret_index).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Renders the files of one secret in memory.
    pub fn render(
        &self,
        secret_index: usize,
        ctx: &Context,
    ) -> Result<Vec<(FilePlan, Zeroizing<String>)>, RenderError> {
        let value = ctx.to_json();
        let mut out = Vec::new();
        for plan in self.plans(secret_index) {
            let fail = |reason: String| RenderError::Template { file: plan.path.clone(), reason };
            let text = match &plan.kind {
                Kind::Json => json_format(ctx),
                Kind::Env => env_format(ctx.data),
                Kind::Template(name) => {
                    let tmpl = self.env.get_template(name).map_err(|e| fail(e.to_string()))?;
                    tmpl.render(minijinja::Value::from(Serde(&value))).map_err(|e| fail(describe(&e)))?
                }
            };
            out.push((plan.clone(), Zeroizing::new(text)));
        }
        Ok(out)
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

/// Writes `content` to `plan.path` atomically; see `write_file`.
#[cfg(test)]
pub fn write_atomic(plan: &FilePlan, content: &[u8]) -> Result<bool, RenderError> {
    write_file(&plan.path, content, plan.mode, plan.owner, plan.group)
}

/// Writes `content` to `path` atomically: a temp file in the same directory
/// (created 0600), mode and owner set, fsync, rename over the target, fsync
/// the directory. Returns false when the file already had exactly this
/// content and mode (nothing is written then).
pub fn write_file(
    path: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> Result<bool, RenderError> {
    match stage(path, content, mode, owner, group)? {
        Some(staged) => staged.commit().map(|()| true),
        None => Ok(false),
    }
}

/// Why a secret's files were not all written.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct WriteAllError {
    pub error: RenderError,
    /// Some files were already replaced: they name the new credentials.
    pub partial: bool,
}

/// Writes a secret's files as one change, as far as a file system allows:
/// every temporary file is written, chmod-ed, chown-ed and fsync-ed first;
/// only then are they renamed, one after the other. A failure before the
/// first rename changes nothing (the temp files are removed). Returns each
/// path and whether it changed.
pub fn write_all(files: &[(FilePlan, Zeroizing<String>)]) -> Result<Vec<(PathBuf, bool)>, WriteAllError> {
    let mut staged = Vec::new();
    for (plan, text) in files {
        let s = stage(&plan.path, text.as_bytes(), plan.mode, plan.owner, plan.group)
            .map_err(|error| WriteAllError { error, partial: false })?;
        staged.push((plan.path.clone(), s));
    }
    let mut written = Vec::new();
    for (path, s) in staged {
        let changed = s.is_some();
        if let Some(s) = s {
            let partial = written.iter().any(|(_, c)| *c);
            s.commit().map_err(|error| WriteAllError { error, partial })?;
        }
        written.push((path, changed));
    }
    Ok(written)
}

/// A complete temporary file beside its target, waiting to be renamed.
pub struct Staged {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl Staged {
    /// Renames the temp file over the target and fsyncs the directory.
    pub fn commit(self) -> Result<(), RenderError> {
        let fail = |reason: String| RenderError::Write { file: self.path.clone(), reason };
        let dir = self.path.parent().ok_or_else(|| fail("no parent directory".into()))?.to_path_buf();
        self.tmp.persist(&self.path).map_err(|e| fail(format!("rename: {}", e.error)))?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| fail(format!("fsync of {}: {e}", dir.display())))
    }
}

/// The temp file for `path` (created 0600, then mode and owner set,
/// fsync-ed); `None` when the file already has exactly this content and mode.
fn stage(
    path: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> Result<Option<Staged>, RenderError> {
    let fail = |reason: String| RenderError::Write { file: path.to_path_buf(), reason };
    // A symlink planted at the destination is never followed: only a
    // regular file counts as "unchanged", and the rename replaces the link.
    if let Ok(meta) = fs::symlink_metadata(path)
        && meta.file_type().is_file()
        && meta.permissions().mode() & 0o7777 == mode
        && let Ok(existing) = fs::read(path)
    {
        let same = existing == content;
        let mut existing = existing;
        zeroize::Zeroize::zeroize(&mut existing);
        if same {
            return Ok(None);
        }
    }
    let dir = path.parent().ok_or_else(|| fail("no parent directory".into()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".leasehold-")
        .tempfile_in(dir)
        .map_err(|e| fail(format!("creating a temp file in {}: {e}", dir.display())))?;
    tmp.write_all(content).map_err(|e| fail(e.to_string()))?;
    let file: &File = tmp.as_file();
    file.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| fail(format!("chmod: {e}")))?;
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::fchown(file, owner, group).map_err(|e| fail(format!("chown: {e}")))?;
    }
    file.sync_all().map_err(|e| fail(format!("fsync: {e}")))?;
    Ok(Some(Staged { tmp, path: path.to_path_buf() }))
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

    #[test]
    fn a_symlink_at_the_destination_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        fs::write(&target, "same").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("db.json");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        // Even with the very content and mode the link points at.
        assert!(write_file(&path, b"same", 0o600, None, None).unwrap());
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file(), "the link itself was replaced");
        write_file(&path, b"new", 0o600, None, None).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "same", "nothing written through the link");
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
    }

    #[test]
    fn temp_files_are_never_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.json");
        let staged = stage(&path, b"secret", 0o640, None, None).unwrap().unwrap();
        // Before the rename the temp file already has its final mode, never more.
        let mode = staged.tmp.as_file().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(mode & 0o007, 0, "nothing for others");
        staged.commit().unwrap();
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
        };
        for template in ["{% include '/etc/passwd' %}", "{{ env.HOME }}", "{{ range(10000000) | list | length }}"] {
            let r = Renderer::compile(&cfg(template), Path::new("t.yaml"));
            let rendered = r.ok().and_then(|r| r.render(0, &ctx).ok());
            assert!(rendered.is_none(), "{template} rendered: {:?}", rendered.map(|f| f[0].1.to_string()));
        }
    }

    #[test]
    fn a_file_that_cannot_be_written_leaves_the_others_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("a.txt");
        fs::write(&ok, "old").unwrap();
        let plan = |path: PathBuf| FilePlan { path, mode: 0o600, owner: None, group: None, kind: Kind::Env };
        // The second file's directory is gone: nothing may change.
        let files = vec![
            (plan(ok.clone()), Zeroizing::new("new".to_string())),
            (plan(dir.path().join("gone/b.txt")), Zeroizing::new("new".to_string())),
        ];
        let err = write_all(&files).unwrap_err();
        assert!(!err.partial && err.to_string().contains("gone/b.txt"), "{err}");
        assert_eq!(fs::read_to_string(&ok).unwrap(), "old", "the first file was not replaced");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["a.txt"], "no temp file left behind");
        // All directories there: every file is replaced.
        fs::create_dir(dir.path().join("gone")).unwrap();
        let written = write_all(&files).unwrap();
        assert!(written.iter().all(|(_, changed)| *changed));
        assert_eq!(fs::read_to_string(&ok).unwrap(), "new");
    }

    #[test]
    fn atomic_write_sets_mode_and_skips_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let plan =
            FilePlan { path: dir.path().join("db.json"), kind: Kind::Json, mode: 0o440, owner: None, group: None };
        assert!(write_atomic(&plan, b"one").unwrap());
        assert_eq!(fs::metadata(&plan.path).unwrap().permissions().mode() & 0o7777, 0o440);
        assert!(!write_atomic(&plan, b"one").unwrap());
        assert!(write_atomic(&plan, b"two").unwrap());
        assert_eq!(fs::read(&plan.path).unwrap(), b"two");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".leasehold-"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
