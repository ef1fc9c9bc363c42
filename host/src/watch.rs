//! Hot reload for long-running processes: reload a [`Host`] from its config file on
//! `SIGHUP` and whenever the config file, a provider's plugin or a `{ file = … }`
//! secret it references changes on disk.
//!
//! # Why it is built this way
//!
//! - **Only the files that matter count.** Editors and build tools replace files by
//!   rename, which a watch on the file itself would miss, so the watcher watches
//!   the *directories* of the files the host depends on
//!   ([`Host::watched_files`]) and keeps only the events that name one of those
//!   files. Anything else in those directories (the server's own log file, an
//!   editor's swap file, a busy neighbour) is dropped where the event arrives and
//!   can neither trigger a reload nor delay one. A file reached through a symlink
//!   (a Kubernetes ConfigMap volume swaps a `..data` symlink) is also watched where
//!   the link points, so replacing the link's target is seen. The set of files is
//!   recomputed after every reload, since a reload may add or drop plugins and
//!   secrets.
//! - **Debounced, but bounded.** A change often arrives as several events (`cp`
//!   truncates then writes; a build writes a plugin in pieces), so a reload waits
//!   for [`DEBOUNCE`] of quiet among the relevant files — but never longer than
//!   [`MAX_DELAY`] after the first of them: a file rewritten without pause cannot
//!   starve reloads.
//! - **`SIGHUP` is applied at once**, also in the middle of a debounce; it never
//!   waits behind file events. A `SIGHUP` or change that arrives while a reload
//!   runs triggers one more reload right after it (the running one may have read
//!   the files before the change).
//!
//! What a reload does per provider is described at [`Host::reload`]: a provider
//! whose new version fails to load keeps serving the old one.

use crate::error::Result;
use crate::host::{Host, ReloadReport};
use notify::{RecursiveMode, Watcher as _};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Quiet time among the relevant files, after their last event, before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Longest wait between the first event of a change to a relevant file and the
/// reload, however often the files keep changing.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// What set off a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Trigger {
    /// `SIGHUP`.
    Signal,
    /// A watched file changed.
    FileChange,
}

/// The paths whose events count, shared with the notify callback.
type Relevant = Arc<Mutex<BTreeSet<PathBuf>>>;

/// Watches a [`Host`]'s files and `SIGHUP`. Created ready: changes made after
/// [`Watcher::new`] returns are seen.
pub struct Watcher {
    host: Host,
    watcher: notify::RecommendedWatcher,
    /// One pending "a relevant file changed" at most: events coalesce here.
    changed: tokio::sync::mpsc::Receiver<()>,
    hangup: tokio::signal::unix::Signal,
    relevant: Relevant,
    dirs: BTreeSet<PathBuf>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("host", &self.host)
            .field("dirs", &self.dirs)
            .finish_non_exhaustive()
    }
}

/// The watches or the `SIGHUP` handler could not be set up ([`Watcher::new`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The file watcher (inotify) could not start.
    #[error("watching the config's files: {0}")]
    Files(#[from] notify::Error),
    /// The `SIGHUP` handler could not be installed (outside a tokio runtime?).
    #[error("installing the SIGHUP handler: {0}")]
    Signal(#[from] std::io::Error),
}

impl Watcher {
    /// Set up the file watches and the `SIGHUP` handler (inside a tokio runtime).
    pub fn new(host: Host) -> std::result::Result<Self, WatchError> {
        let (tx, changed) = tokio::sync::mpsc::channel::<()>(1);
        let relevant: Relevant = Arc::default();
        let filter = Arc::clone(&relevant);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            // Reads (including the reload's own) are not changes.
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let relevant = filter.lock().unwrap_or_else(|e| e.into_inner());
            if event.paths.iter().any(|p| relevant.contains(p)) {
                // Full means a change is already pending: nothing to add.
                let _ = tx.try_send(());
            }
        })?;
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let mut this = Watcher {
            host,
            watcher,
            changed,
            hangup,
            relevant,
            dirs: BTreeSet::new(),
        };
        this.rewatch();
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
                biased;
                () = &mut shutdown => return,
                _ = self.hangup.recv() => Trigger::Signal,
                Some(()) = self.changed.recv() => {
                    match self.settle(&mut shutdown).await {
                        Some(trigger) => trigger,
                        None => return,
                    }
                }
            };
            // This reload reads every file afresh: a change that is pending now is
            // covered by it.
            let _ = self.changed.try_recv();
            let reloading = self.host.clone();
            let outcome = tokio::task::spawn_blocking(move || reloading.reload_from_file())
                .await
                .unwrap_or_else(|e| {
                    Err(crate::Error::Io {
                        context: "reloading".into(),
                        source: std::sync::Arc::new(std::io::Error::other(e.to_string())),
                    })
                });
            on_reload(trigger, outcome);
            self.rewatch();
        }
    }

    /// After a first change: wait for [`DEBOUNCE`] of quiet, at most until
    /// [`MAX_DELAY`] has passed; a `SIGHUP` ends the wait at once. `None` if
    /// `shutdown` completed meanwhile.
    async fn settle(
        &mut self,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Option<Trigger> {
        let first = Instant::now();
        let latest = first.checked_add(MAX_DELAY).unwrap_or(first);
        let mut quiet_from = first;
        loop {
            let until = quiet_from
                .checked_add(DEBOUNCE)
                .unwrap_or(latest)
                .min(latest);
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return None,
                _ = self.hangup.recv() => return Some(Trigger::Signal),
                () = tokio::time::sleep_until(until) => return Some(Trigger::FileChange),
                Some(()) = self.changed.recv() => quiet_from = Instant::now(),
            }
        }
    }

    /// Recompute the relevant files from the host's current config and watch their
    /// directories (files are often replaced by rename, which a watch on the file
    /// itself would miss).
    fn rewatch(&mut self) {
        let mut files = BTreeSet::new();
        for file in self.host.watched_files() {
            files.extend(spellings(&file));
        }
        let wanted: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(PathBuf::from))
            .collect();
        *self.relevant.lock().unwrap_or_else(|e| e.into_inner()) = files;
        for gone in self.dirs.difference(&wanted) {
            let _ = self.watcher.unwatch(gone);
        }
        let mut watching: BTreeSet<PathBuf> = self.dirs.intersection(&wanted).cloned().collect();
        for dir in wanted.difference(&self.dirs) {
            match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watching.insert(dir.clone());
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; use SIGHUP to reload")
                }
            }
        }
        self.dirs = watching;
    }
}

/// The paths under which events about `file` arrive: the file in its directory's
/// canonical path (the directory is what is watched, and notify names events by
/// the watched path, so two spellings of one directory must agree), and, if the
/// file is a symlink, where it points (replacing the link's target directory, as
/// Kubernetes does, shows up there).
fn spellings(file: &Path) -> Vec<PathBuf> {
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let in_dir = match (file.parent(), file.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|dir| dir.join(name))
            .unwrap_or_else(|_| file.clone()),
        _ => file.clone(),
    };
    let mut paths = vec![in_dir];
    if let Ok(target) = std::fs::canonicalize(&file)
        && !paths.contains(&target)
    {
        paths.push(target);
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_agree_for_two_spellings_of_one_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let plain = dir.path().join("a.toml");
        let roundabout = dir.path().join("sub/../a.toml");
        assert_eq!(spellings(&plain)[0], spellings(&roundabout)[0]);
    }

    #[test]
    fn spellings_include_a_symlinks_target() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2024_01");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("reauth.toml"), "").unwrap();
        std::os::unix::fs::symlink(&data, dir.path().join("..data")).unwrap();
        let link = dir.path().join("reauth.toml");
        std::os::unix::fs::symlink("..data/reauth.toml", &link).unwrap();
        let paths = spellings(&link);
        let real = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            paths,
            [real.join("reauth.toml"), real.join("..2024_01/reauth.toml")]
        );
    }
}
