//! Writing files so that a reader sees the old content or the new, never a
//! partial one: every file is staged complete beside its target (mode,
//! owner, fsync) and only then renamed over it. Credentials files and the
//! state file both go through here.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use config::Config;
use zeroize::Zeroizing;

/// Where a file goes and what it is made with.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: cannot write: {reason}")]
pub struct WriteError {
    pub file: PathBuf,
    pub reason: String,
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
) -> Result<bool, WriteError> {
    match stage(path, content, mode, owner, group)? {
        Some(staged) => staged.commit().map(|()| true),
        None => Ok(false),
    }
}

/// Why a secret's files were not all written.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct WriteAllError {
    pub error: WriteError,
    /// Some files were already replaced: they name the new credentials.
    pub partial: bool,
}

/// Writes a secret's files as one change, as far as a file system allows:
/// every temporary file is written, chmod-ed, chown-ed and fsync-ed first;
/// only then are they renamed, one after the other. A failure before the
/// first rename changes nothing (the temp files are removed). Returns each
/// path and whether it changed.
pub fn write_all(files: &[(Target, Zeroizing<String>)]) -> Result<Vec<(PathBuf, bool)>, WriteAllError> {
    let mut staged = Vec::new();
    for (target, text) in files {
        let s = stage(&target.path, text.as_bytes(), target.mode, target.owner, target.group)
            .map_err(|error| WriteAllError { error, partial: false })?;
        staged.push((target.path.clone(), s));
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
    pub fn commit(self) -> Result<(), WriteError> {
        let fail = |reason: String| WriteError { file: self.path.clone(), reason };
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
) -> Result<Option<Staged>, WriteError> {
    let fail = |reason: String| WriteError { file: path.to_path_buf(), reason };
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

/// Whether each file's directory exists and the agent may write there,
/// checked before credentials are asked for; the error names the
/// directory and what is wrong (as `leasehold check --local` does).
pub fn probe<'a>(paths: impl Iterator<Item = &'a Path>) -> Result<(), String> {
    for path in paths {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{}: {} is not a directory", path.display(), dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("{}: the directory {} does not exist", path.display(), dir.display()));
            }
            Err(e) => return Err(format!("{}: {}: {e}", path.display(), dir.display())),
        }
        if let Err(e) = nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK) {
            return Err(format!("{}: the directory {} is not writable ({e})", path.display(), dir.display()));
        }
    }
    Ok(())
}

/// Files with `owner`/`group` when this process cannot chown (no
/// CAP_CHOWN, as in the chart, which drops every capability): each write
/// of that secret would fail, so say so before the first one.
pub fn chown_warnings(config: &Config) -> Vec<String> {
    if can_chown() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, s) in config.secrets.iter().enumerate() {
        for (j, f) in s.files.iter().enumerate().filter(|(_, f)| f.owner.is_some() || f.group.is_some()) {
            out.push(format!(
                "secrets[{i}].files[{j}] ({}): owner/group is set but this process cannot change a file's owner \
                 (no CAP_CHOWN): writing it will fail; drop owner/group and use fsGroup, or grant CAP_CHOWN",
                f.path.display()
            ));
        }
    }
    out
}

/// CAP_CHOWN (bit 0) in the effective set, from /proc/self/status.
fn can_chown() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim);
    eff.and_then(|hex| u64::from_str_radix(hex, 16).ok()).is_some_and(|caps| caps & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_file_that_cannot_be_written_leaves_the_others_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("a.txt");
        fs::write(&ok, "old").unwrap();
        let plan = |path: PathBuf| Target { path, mode: 0o600, owner: None, group: None };
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
        let path = dir.path().join("db.json");
        assert!(write_file(&path, b"one", 0o440, None, None).unwrap());
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o440);
        assert!(!write_file(&path, b"one", 0o440, None, None).unwrap());
        assert!(write_file(&path, b"two", 0o440, None, None).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".leasehold-"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
