//! Watching the config file and its template files. ConfigMaps are updated
//! by swapping a `..data` symlink, which a watch on a file itself never
//! sees, so their directories are watched; only events that name one of
//! those files, or a `..`-entry of a ConfigMap swap beside them, count:
//! other files in the directory (a busy log, a socket) wake nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

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
