//! Durable state for adoption after a restart: the Vault tokens held and,
//! per secret, the lease with what is needed to renew and re-render it.
//! Written atomically (0600, in a 0700 directory) after every login, issue,
//! renewal and revocation. A file that cannot be read, does not parse or has
//! another version is set aside with a warning; the agent then starts fresh.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::files::write_file;
use vault::secret::{Accessor, LeaseId, SecretData};

pub const VERSION: u32 = 1;
const FILE: &str = "state.json";

/// A token as recorded; `Debug` leaves the token out.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token: Zeroizing<String>,
    pub accessor: Accessor,
    pub first_ttl: f64,
    pub granted_at: f64,
    pub ttl: f64,
    pub final_expiry: bool,
    /// A batch token (no accessor of Vault's; cannot be revoked).
    #[serde(default)]
    pub batch: bool,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("accessor", &self.accessor)
            .field("ttl", &self.ttl)
            .field("final_expiry", &self.final_expiry)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub path: String,
    pub lease_id: LeaseId,
    pub token_accessor: Accessor,
    pub issued_at: f64,
    pub first_ttl: f64,
    pub granted_at: f64,
    pub ttl: f64,
    pub renewable: bool,
    pub capped: bool,
    pub data: SecretData,
}

impl LeaseRecord {
    pub fn expires_at(&self) -> SystemTime {
        time(self.granted_at) + secs(self.ttl)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SecretRecord {
    pub current: Option<LeaseRecord>,
    /// Replaced leases not yet revoked.
    #[serde(default)]
    pub retired: Vec<LeaseRecord>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub tokens: Vec<TokenRecord>,
    pub secrets: BTreeMap<String, SecretRecord>,
}

pub use crate::clock::unix;

pub fn time(unix: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH + secs(unix)
}

/// Seconds from the file, at most 1,000 years: a time or TTL past that is
/// nonsense, and adding two such never overflows a `SystemTime`.
pub fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or_default().min(Duration::from_secs(1000 * 365 * 86_400))
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state_dir {dir}: {reason}")]
    Dir { dir: PathBuf, reason: String },
    #[error("writing {file}: {reason}")]
    Write { file: PathBuf, reason: String },
}

/// The state file and the in-memory copy every writer updates.
pub struct StateStore {
    dir: PathBuf,
    state: Mutex<State>,
}

impl StateStore {
    /// Opens (creating it 0700 if needed) the state directory and loads the
    /// state. Returns the store and a warning when a bad file was set aside.
    pub fn open(dir: &Path) -> Result<(StateStore, Option<String>), StateError> {
        let fail = |reason: String| StateError::Dir { dir: dir.to_path_buf(), reason };
        fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        // The state holds tokens and passwords: only a real directory of the
        // agent's own. A symlink could lead the writes anywhere; someone
        // else's directory could be read or swapped under the agent.
        let meta = fs::symlink_metadata(dir).map_err(|e| fail(e.to_string()))?;
        if meta.file_type().is_symlink() {
            return Err(fail("is a symlink; give the directory itself".into()));
        }
        let me = nix::unistd::geteuid().as_raw();
        if std::os::unix::fs::MetadataExt::uid(&meta) != me {
            return Err(fail(format!(
                "is owned by uid {}, not by the agent (uid {me})",
                std::os::unix::fs::MetadataExt::uid(&meta)
            )));
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| fail(e.to_string()))?;
        let path = dir.join(FILE);
        let (state, warning) = match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (State::default(), None),
            Err(e) => (State::default(), Some(set_aside(&path, &format!("unreadable: {e}")))),
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                match serde_json::from_slice::<State>(&bytes) {
                    Ok(s) if s.version == VERSION => (s, None),
                    Ok(s) => {
                        (State::default(), Some(set_aside(&path, &format!("version {} is not {VERSION}", s.version))))
                    }
                    Err(e) => (State::default(), Some(set_aside(&path, &format!("corrupt: {e}")))),
                }
            }
        };
        Ok((StateStore { dir: dir.to_path_buf(), state: Mutex::new(state) }, warning))
    }

    pub fn snapshot(&self) -> State {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_tokens(&self, tokens: Vec<TokenRecord>) -> Result<(), StateError> {
        self.update(|s| s.tokens = tokens)
    }

    pub fn set_secret(&self, name: &str, record: SecretRecord) -> Result<(), StateError> {
        self.update(|s| {
            s.secrets.insert(name.to_string(), record);
        })
    }

    pub fn remove_secret(&self, name: &str) -> Result<(), StateError> {
        self.update(|s| {
            s.secrets.remove(name);
        })
    }

    fn update(&self, f: impl FnOnce(&mut State)) -> Result<(), StateError> {
        let mut state = self.lock();
        f(&mut state);
        state.version = VERSION;
        let path = self.dir.join(FILE);
        let text = Zeroizing::new(serde_json::to_vec(&*state).unwrap_or_default());
        write_file(&path, &text, 0o600, None, None)
            .map(|_| ())
            .map_err(|e| StateError::Write { file: path.clone(), reason: e.to_string() })
    }

    /// After a clean stop: nothing is left to adopt.
    pub fn remove(&self) {
        let _ = fs::remove_file(self.dir.join(FILE));
    }

    #[cfg(test)]
    pub fn file(&self) -> PathBuf {
        self.dir.join(FILE)
    }
}

/// Renames a bad state file out of the way; returns the warning to log.
fn set_aside(path: &Path, why: &str) -> String {
    let stamp = unix(crate::clock::wall()) as u64;
    let aside = path.with_file_name(format!("{FILE}.bad-{stamp}"));
    match fs::rename(path, &aside) {
        Ok(()) => format!("state file {} is {why}; moved to {} and starting fresh", path.display(), aside.display()),
        Err(e) => format!("state file {} is {why} and could not be moved ({e}); starting fresh", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_with_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let sd = dir.path().join("state");
        let (store, warning) = StateStore::open(&sd).unwrap();
        assert!(warning.is_none());
        store
            .set_tokens(vec![TokenRecord {
                token: Zeroizing::new("hvs.x".into()),
                accessor: "acc".into(),
                first_ttl: 60.0,
                granted_at: 1.0,
                ttl: 60.0,
                final_expiry: false,
                batch: false,
            }])
            .unwrap();
        assert!(!format!("{:?}", store.snapshot().tokens).contains("hvs.x"), "Debug hides the token");
        assert_eq!(fs::metadata(&sd).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(store.file()).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, _) = StateStore::open(&sd).unwrap();
        assert_eq!(again.snapshot().tokens[0].accessor, "acc".into());
    }

    #[test]
    fn debug_shows_a_lease_record_without_its_secrets() {
        let record: LeaseRecord = serde_json::from_value(serde_json::json!({
            "path": "database/creds/app", "lease_id": "database/creds/app/AbCdEfGhIjKlMnOpQrStUvWx",
            "token_accessor": "ZyXwVuTsRqPoNmLkJiHgFeDc", "issued_at": 1.0, "first_ttl": 60.0, "granted_at": 1.0,
            "ttl": 60.0, "renewable": true, "capped": false, "data": {"password": "hunter2"}
        }))
        .unwrap();
        let dbg = format!("{record:?}");
        assert!(dbg.contains("ZyXwVu…") && dbg.contains("password"), "{dbg}");
        for secret in ["ZyXwVuTsRqPoNmLkJiHgFeDc", "EfGhIjKl", "hunter2"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
    }

    #[test]
    fn absurd_times_in_the_file_do_not_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let lease = r#"{"path": "p", "lease_id": "p/x", "token_accessor": "a", "issued_at": 1e19, "first_ttl": 1e300,
            "granted_at": 1e19, "ttl": 1.8e19, "renewable": true, "capped": false, "data": {}}"#;
        let text =
            format!(r#"{{"version": 1, "tokens": [], "secrets": {{"db": {{"current": {lease}, "retired": []}}}}}}"#);
        fs::write(dir.path().join(FILE), text).unwrap();
        let (store, warning) = StateStore::open(dir.path()).unwrap();
        assert!(warning.is_none(), "{warning:?}");
        let record = store.snapshot().secrets["db"].current.clone().unwrap();
        assert!(record.expires_at() > SystemTime::UNIX_EPOCH);
    }

    #[test]
    fn corrupt_and_foreign_files_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let (store, warning) = StateStore::open(dir.path()).unwrap();
        assert!(warning.unwrap().contains("corrupt"));
        assert!(store.snapshot().tokens.is_empty());
        assert!(!dir.path().join(FILE).exists());
        fs::write(dir.path().join(FILE), br#"{"version": 99, "tokens": [], "secrets": {}}"#).unwrap();
        let (_, warning) = StateStore::open(dir.path()).unwrap();
        assert!(warning.unwrap().contains("version 99"));
    }

    #[test]
    fn a_symlinked_or_foreign_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = StateStore::open(&link).err().expect("a symlink is refused");
        assert!(e.to_string().contains("is a symlink"), "{e}");
        assert!(StateStore::open(&real).is_ok());
        // Someone else's directory (CI runs as root, which can make one).
        let foreign = dir.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(4242), None).expect("chown needs root, as scripts/test runs");
        let e = StateStore::open(&foreign).err().expect("a foreign directory is refused");
        assert!(e.to_string().contains("owned by uid 4242"), "{e}");
    }
}
