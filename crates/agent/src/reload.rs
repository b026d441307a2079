//! Watching the config file and its template files. ConfigMaps are updated
//! by swapping a `..data` symlink, which a watch on a file itself never
//! sees, so their directories are watched; only events that name one of
//! those files, or a `..`-entry of a ConfigMap swap beside them, count:
//! other files in the directory (a busy log, a socket) wake nothing. Nor do
//! accesses: reading the config (which a reload does) must not trigger the
//! next reload.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use config::{Config, SecretConfig};

/// What a reload changes, by secret name (everything else still configured
/// is updated in place: re-rendered from the credentials in hand).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Running, no longer configured: stopped, revoked, files removed.
    pub removed: Vec<String>,
    /// Still configured, read from another path, method or body: a re-issue.
    pub source_changed: Vec<String>,
}

/// The diff between the running secrets and a new config.
pub fn diff(running: &[&SecretConfig], new: &Config) -> Diff {
    let mut d = Diff::default();
    for old in running {
        match new.secrets.iter().find(|s| s.name == old.name) {
            None => d.removed.push(old.name.clone()),
            Some(s) if s.path != old.path || s.method != old.method || s.body != old.body => {
                d.source_changed.push(old.name.clone())
            }
            Some(_) => {}
        }
    }
    d.removed.sort();
    d.source_changed.sort();
    d
}

/// The config's text followed by the content of every `template_file` of
/// `config` (which usually sits in the same ConfigMap and changes with it):
/// a file event reloads only when this changed.
pub fn fingerprint(text: &str, config: &Config) -> String {
    let mut out = text.to_string();
    for file in config.secrets.iter().flat_map(|s| &s.files) {
        if let Some(path) = &file.template_file {
            out.push('\0');
            out.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
    }
    out
}

/// A watcher for `config` and `templates`; each relevant event sends `()`.
/// Keep the watcher alive as long as events are wanted.
pub fn watch(
    config: &Path,
    templates: &[PathBuf],
) -> notify::Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let files: Vec<PathBuf> =
        std::iter::once(config).chain(templates.iter().map(PathBuf::as_path)).map(absolute).collect();
    let relevant = Relevant { files: files.clone() };
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && changes(&event.kind)
            && relevant.matches(&event.paths)
        {
            let _ = tx.send(());
        }
    })?;
    let dirs: BTreeSet<PathBuf> = files.iter().filter_map(|f| f.parent().map(Path::to_path_buf)).collect();
    for dir in dirs {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    }
    Ok((watcher, rx))
}

/// Events that can change what a file holds: not opening, reading or
/// closing it unchanged (inotify's IN_OPEN, IN_ACCESS, IN_CLOSE_NOWRITE).
pub fn changes(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) => false,
        _ => true,
    }
}

/// The file in its directory's canonical path (the file itself may be a
/// symlink into `..data`, which is what changes), as notify reports it.
fn absolute(file: &Path) -> PathBuf {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    match file.file_name() {
        Some(name) => dir.join(name),
        None => dir,
    }
}

/// Which event paths concern the watched files.
pub struct Relevant {
    pub files: Vec<PathBuf>,
}

impl Relevant {
    pub fn matches(&self, paths: &[PathBuf]) -> bool {
        paths.iter().any(|p| {
            self.files.iter().any(|f| {
                p == f
                    || (p.parent() == f.parent()
                        && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("..")))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_source_is_told_from_a_removal_and_an_update() {
        let config = |secrets: &str| {
            let yaml =
                format!("vault:\n  address: http://v:8200\nauth:\n  kubernetes:\n    role: r\nsecrets:\n{secrets}");
            Config::parse(&yaml, Path::new("c.yaml"), &|_| None).unwrap()
        };
        let secret = |name: &str, path: &str, file: &str| {
            format!("  - name: {name}\n    path: {path}\n    files:\n      - path: /tmp/{file}\n        format: json\n")
        };
        let old = config(&format!(
            "{}{}{}",
            secret("a", "database/creds/a", "a"),
            secret("b", "database/creds/b", "b"),
            secret("c", "database/creds/c", "c")
        ));
        // a: same source, another file (an update); b: another path; c: gone.
        let new =
            config(&format!("{}{}", secret("a", "database/creds/a", "a2"), secret("b", "database/creds/b2", "b")));
        let running: Vec<&SecretConfig> = old.secrets.iter().collect();
        assert_eq!(diff(&running, &new), Diff { removed: vec!["c".into()], source_changed: vec!["b".into()] });
    }

    #[test]
    fn reading_a_file_is_no_change() {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};
        // The bug: a reload's own read of the config (IN_OPEN) armed the
        // next reload, every 200 ms forever.
        assert!(!changes(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(!changes(&EventKind::Access(AccessKind::Read)));
        assert!(!changes(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(changes(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(changes(&EventKind::Modify(ModifyKind::Data(DataChange::Any))));
        assert!(changes(&EventKind::Modify(ModifyKind::Name(RenameMode::To))));
        assert!(changes(&EventKind::Create(CreateKind::File)));
        assert!(changes(&EventKind::Remove(RemoveKind::File)));
    }

    #[test]
    fn only_the_config_its_templates_and_configmap_swaps_count() {
        let r =
            Relevant { files: vec![PathBuf::from("/etc/leasehold/leasehold.yaml"), PathBuf::from("/etc/tpl/app.j2")] };
        let hit = |p: &str| r.matches(&[PathBuf::from(p)]);
        assert!(hit("/etc/leasehold/leasehold.yaml"));
        assert!(hit("/etc/tpl/app.j2"));
        // kubelet's ConfigMap update: ..data_tmp renamed over ..data.
        assert!(hit("/etc/leasehold/..data"));
        assert!(hit("/etc/leasehold/..data_tmp"));
        assert!(hit("/etc/tpl/..2026_12_01_10_00_00.123"));
        // Anything else in those directories is none of our business.
        assert!(!hit("/etc/leasehold/app.log"));
        assert!(!hit("/etc/leasehold/.leasehold.yaml.swp"));
        assert!(!hit("/etc/tpl/other.j2"));
        assert!(!hit("/var/..data"));
        assert!(r.matches(&[PathBuf::from("/x"), PathBuf::from("/etc/tpl/app.j2")]), "any path of the event");
    }
}
