//! Watching the config file. ConfigMaps are updated by swapping a `..data`
//! symlink, which a watch on the file itself never sees, so the directory is
//! watched and every event there is a hint to compare the file's content.

use std::path::Path;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// A watcher on `config`'s directory; each event sends `()`. Keep the
/// watcher alive as long as events are wanted.
pub fn watch(config: &Path) -> notify::Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })?;
    let dir = config.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok((watcher, rx))
}
