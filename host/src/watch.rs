//! Hot reload for long-running processes: reload a [`Host`] from its config file on
//! `SIGHUP` and whenever the config file, a provider's plugin or a `{ file = … }`
//! secret it references changes on disk.
//!
//! Changes are debounced (editors and `cp` write in several steps, build tools
//! replace files by rename), and the set of watched files is recomputed after every
//! reload. What a reload does per provider is described at [`Host::reload`]: a
//! provider whose new version fails to load keeps serving the old one.

use crate::error::{BoxError, Result};
use crate::host::{Host, ReloadReport};
use notify::{RecursiveMode, Watcher as _};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// What set off a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `SIGHUP`.
    Signal,
    /// A watched file changed.
    FileChange,
}

/// Watches a [`Host`]'s files and `SIGHUP`. Created ready: changes made after
/// [`Watcher::new`] returns are seen.
pub struct Watcher {
    host: Host,
    watcher: notify::RecommendedWatcher,
    events: tokio::sync::mpsc::UnboundedReceiver<PathBuf>,
    hangup: tokio::signal::unix::Signal,
    files: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
}

impl Watcher {
    /// Set up the file watches and the `SIGHUP` handler (inside a tokio runtime).
    pub fn new(host: Host) -> std::result::Result<Self, BoxError> {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event
                && !matches!(event.kind, notify::EventKind::Access(_))
            {
                for path in event.paths {
                    let _ = tx.send(path);
                }
            }
        })?;
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let mut this = Watcher {
            host,
            watcher,
            events,
            hangup,
            files: BTreeSet::new(),
            dirs: BTreeSet::new(),
        };
        rewatch(
            &this.host,
            &mut this.watcher,
            &mut this.files,
            &mut this.dirs,
        );
        Ok(this)
    }

    /// Reload on every trigger until `shutdown` completes, handing every outcome
    /// to `on_reload`.
    pub async fn run(
        mut self,
        mut on_reload: impl FnMut(Trigger, Result<ReloadReport>) + Send,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        tokio::pin!(shutdown);
        loop {
            let trigger = tokio::select! {
                () = &mut shutdown => return,
                _ = self.hangup.recv() => Trigger::Signal,
                Some(path) = self.events.recv() => {
                    if !self.files.contains(&path) {
                        continue;
                    }
                    // Debounce: wait until the files have been quiet for a while.
                    while let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, self.events.recv()).await {}
                    Trigger::FileChange
                }
            };
            let reloading = self.host.clone();
            let outcome = tokio::task::spawn_blocking(move || reloading.reload_from_file())
                .await
                .unwrap_or_else(|e| {
                    Err(crate::Error::Io {
                        context: "reloading".into(),
                        source: std::io::Error::other(e.to_string()),
                    })
                });
            on_reload(trigger, outcome);
            rewatch(
                &self.host,
                &mut self.watcher,
                &mut self.files,
                &mut self.dirs,
            );
        }
    }
}

/// Watch the directories of every file the host depends on (files are often
/// replaced by rename, which a watch on the file itself would miss).
fn rewatch(
    host: &Host,
    watcher: &mut notify::RecommendedWatcher,
    files: &mut BTreeSet<PathBuf>,
    dirs: &mut BTreeSet<PathBuf>,
) {
    *files = host
        .watched_files()
        .into_iter()
        .map(|p| std::path::absolute(&p).unwrap_or(p))
        .collect();
    let wanted: BTreeSet<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(PathBuf::from))
        .collect();
    for gone in dirs.difference(&wanted) {
        let _ = watcher.unwatch(gone);
    }
    let mut watching: BTreeSet<PathBuf> = dirs.intersection(&wanted).cloned().collect();
    for dir in wanted.difference(dirs) {
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watching.insert(dir.clone());
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; use SIGHUP to reload")
            }
        }
    }
    *dirs = watching;
}
