//! The local backends of [`StateStore`]: one file per provider with a `flock(2)`
//! lock beside it, or memory only.

use super::fs::{private_dir, remove_debris, write_atomically};
use super::keys::{KeyRing, wipe};
use super::{DeadHolder, StateGuard, StateStore, StoreError, StoreFuture};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most keys one provider may keep.
pub(crate) const MAX_KEYS: usize = 256;
/// Largest key or value, in bytes.
pub(crate) const MAX_VALUE: usize = 64 * 1024;
/// Largest state one provider may keep, serialised (JSON): the host holds it in
/// memory and rewrites it whole on every `set`.
pub(crate) const MAX_STATE_BYTES: usize = 1024 * 1024;
/// Largest state file read: the state plus the sealing overhead, with room.
const MAX_STATE_FILE: u64 = 2 * 1024 * 1024;
/// Written beside sealed state files: from then on a clear-text state file in
/// that directory is refused (it could only have been planted).
const SEALED_MARKER: &str = ".sealed";

/// An exclusive `flock(2)` on a lock file, recording the holder's PID in it while
/// held. The kernel releases it when the holder dies; the record tells the next
/// holder that happened.
pub(crate) struct FileLock {
    file: File,
    abandoned: bool,
}

/// How a lock was taken.
pub(crate) struct Acquired {
    pub(crate) lock: FileLock,
    /// Whether another holder had it first (the call waited).
    pub(crate) waited: bool,
    /// The previous holder, if it died holding the lock.
    pub(crate) dead: Option<DeadHolder>,
}

impl FileLock {
    /// Take the lock on `path` (created 0600), polling for at most `wait`.
    /// `Err(Ok(holder))` when the wait ran out.
    pub(crate) async fn acquire(
        path: &Path,
        wait: Duration,
    ) -> Result<Acquired, Result<Option<u32>, std::io::Error>> {
        if let Some(dir) = path.parent() {
            private_dir(dir).map_err(Err)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(Err)?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let mut waited = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    waited = true;
                    if started.elapsed() >= wait {
                        return Err(Ok(read_record(&mut file).map(|h| h.pid)));
                    }
                    tokio::time::sleep(pause.min(wait.saturating_sub(started.elapsed()))).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Err(e)),
            }
        }
        let dead = read_record(&mut file);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let record = format!("pid={} since={now}\n", std::process::id());
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(record.as_bytes()));
        if let Err(e) = written {
            return Err(Err(e));
        }
        Ok(Acquired {
            lock: FileLock {
                file,
                abandoned: false,
            },
            waited,
            dead,
        })
    }
}

impl FileLock {
    /// Release without finishing: the record stays, marked, for the next holder.
    pub(crate) fn abandon(&mut self) {
        self.abandoned = true;
        let _ = self.file.write_all(b" aborted=1\n");
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // A clean release leaves an empty record; closing the file drops the flock.
        if !self.abandoned {
            let _ = self.file.set_len(0);
        }
    }
}

/// The holder record in a lock file, if any (a holder that released cleanly
/// leaves none).
fn read_record(file: &mut File) -> Option<DeadHolder> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(256).read_to_string(&mut text).ok()?;
    let mut pid = None;
    let mut since = None;
    let mut aborted = false;
    for field in text.split_whitespace() {
        aborted |= field == "aborted=1";
        if let Some(p) = field.strip_prefix("pid=") {
            pid = p.parse().ok();
        } else if let Some(s) = field.strip_prefix("since=") {
            since = s
                .parse()
                .ok()
                .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)));
        }
    }
    Some(DeadHolder {
        pid: pid?,
        since,
        aborted,
    })
}

/// In-process locks, one per provider: calls of one process queue here first
/// (fair, no polling), then take the file lock.
#[derive(Default)]
struct LocalLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl LocalLocks {
    fn of(&self, provider: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(provider.to_string())
            .or_default()
            .clone()
    }
}

/// Provider state in `<dir>/<provider>.json`, sealed with a [`KeyRing`] (the
/// associated data binds the provider's name) and locked across processes with
/// `flock(2)` on `<dir>/<provider>.lock`. See the [module docs](super).
pub struct FileStateStore {
    dir: PathBuf,
    local: LocalLocks,
    keys: Arc<KeyRing>,
}

impl std::fmt::Debug for FileStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStateStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl FileStateStore {
    /// A store in `dir` (created 0700 on first write), sealing with `keys`.
    /// Temporary files left by writers that were killed mid-write are removed now.
    pub fn new(dir: impl Into<PathBuf>, keys: Arc<KeyRing>) -> Self {
        let dir = dir.into();
        remove_debris(&dir);
        FileStateStore {
            dir,
            local: LocalLocks::default(),
            keys,
        }
    }

    /// The file holding `provider`'s state.
    pub fn path(&self, provider: &str) -> PathBuf {
        self.dir.join(format!("{provider}.json"))
    }

    fn lock_path(&self, provider: &str) -> PathBuf {
        self.dir.join(format!("{provider}.lock"))
    }
}

struct FileGuard {
    _local: tokio::sync::OwnedMutexGuard<()>,
    lock: FileLock,
    path: PathBuf,
    provider: String,
    keys: Arc<KeyRing>,
    values: BTreeMap<String, String>,
    dead: Option<DeadHolder>,
}

impl FileGuard {
    fn commit_now(&mut self, values: BTreeMap<String, String>) -> Result<(), StoreError> {
        let plain = serde_json::to_vec(&values).map_err(|e| StoreError::Corrupt {
            what: self.path.display().to_string(),
            why: e.to_string(),
        })?;
        // Sealed before it touches the disk: no temporary file ever holds a value
        // in clear.
        let bytes = self
            .keys
            .seal(STATE_MAGIC, self.provider.as_bytes(), plain)?;
        write_atomically(&self.path, &bytes, true).map_err(|source| StoreError::Io {
            what: format!("persisting state to {}", self.path.display()),
            source,
        })?;
        if let Some(dir) = self.path.parent() {
            let marker = dir.join(SEALED_MARKER);
            if !marker.exists() {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(marker);
            }
        }
        self.values = values;
        Ok(())
    }
}

impl StateGuard for FileGuard {
    fn values(&self) -> &BTreeMap<String, String> {
        &self.values
    }

    fn commit(
        &mut self,
        values: BTreeMap<String, String>,
    ) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(self.commit_now(values)))
    }

    fn previous_holder(&self) -> Option<&DeadHolder> {
        self.dead.as_ref()
    }

    fn abandon(&mut self) {
        self.lock.abandon();
    }
}

/// `reauth-state` format, version 1 (see [`KeyRing`]).
const STATE_MAGIC: &[u8] = b"reauth-state\x01";

/// What a state file held.
enum Stored {
    Missing,
    Sealed(BTreeMap<String, String>),
    /// The clear-text JSON of reauth before sealing: migrated on first read.
    Clear(BTreeMap<String, String>),
}

fn read_state(path: &Path, provider: &str, keys: &KeyRing) -> Result<Stored, StoreError> {
    let what = || format!("state of provider `{provider}` ({})", path.display());
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Stored::Missing),
        Err(source) => {
            return Err(StoreError::Io {
                what: format!("reading {}", what()),
                source,
            });
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| StoreError::Io {
            what: format!("reading {}", what()),
            source,
        })?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        wipe(&mut bytes);
        return Err(StoreError::Corrupt {
            what: what(),
            why: format!("larger than {MAX_STATE_FILE} bytes; reauth never writes such a file"),
        });
    }
    if bytes.first() == Some(&b'{') {
        let sealed_here = path
            .parent()
            .is_some_and(|d| d.join(SEALED_MARKER).exists());
        let values = if sealed_here {
            Err(StoreError::Corrupt {
                what: what(),
                why: "is in clear, but this directory holds sealed state: refused (reauth did not write it)".into(),
            })
        } else {
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                what: what(),
                // Position only: serde's message can quote content.
                why: format!(
                    "not a state file (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            })
        };
        wipe(&mut bytes);
        return values.map(Stored::Clear);
    }
    // Never a silent reset: a file that does not open is an error naming the
    // provider and the key id, and it stays as it is.
    let result = match keys.open(STATE_MAGIC, provider.as_bytes(), &mut bytes) {
        Ok(plain) => {
            let values = serde_json::from_slice(plain).map_err(|_| StoreError::Corrupt {
                what: what(),
                why: "opens, but is not a state map".into(),
            });
            wipe(plain);
            values.map(Stored::Sealed)
        }
        Err(e) => Err(StoreError::Corrupt {
            what: what(),
            why: format!("{e}; it was left as it is (restore it, or delete it and log in again)"),
        }),
    };
    wipe(&mut bytes);
    result
}

impl StateStore for FileStateStore {
    fn lock<'a>(
        &'a self,
        provider: &'a str,
        wait: Duration,
    ) -> StoreFuture<'a, Result<Box<dyn StateGuard>, StoreError>> {
        Box::pin(async move {
            let started = Instant::now();
            let path = self.path(provider);
            let locked = |holder| StoreError::Locked {
                what: format!("state of provider `{provider}` ({})", path.display()),
                holder,
                waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            };
            let local = tokio::time::timeout(wait, self.local.of(provider).lock_owned())
                .await
                .map_err(|_| locked(Some(std::process::id())))?;
            let acquired = match FileLock::acquire(
                &self.lock_path(provider),
                wait.saturating_sub(started.elapsed()),
            )
            .await
            {
                Ok(a) => a,
                Err(Ok(holder)) => return Err(locked(holder)),
                Err(Err(source)) => {
                    return Err(StoreError::Io {
                        what: format!("locking {}", self.lock_path(provider).display()),
                        source,
                    });
                }
            };
            if acquired.waited {
                tracing::debug!(
                    provider,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "waited for another process holding the provider's state"
                );
            }
            if let Some(dead) = &acquired.dead {
                tracing::warn!(
                    provider,
                    pid = dead.pid,
                    "the previous holder of this provider's state died holding it; a refresh token it rotated but did not save is lost"
                );
            }
            let stored = read_state(&path, provider, &self.keys)?;
            let mut guard = FileGuard {
                _local: local,
                lock: acquired.lock,
                path,
                provider: provider.to_string(),
                keys: self.keys.clone(),
                values: BTreeMap::new(),
                dead: acquired.dead,
            };
            match stored {
                Stored::Missing => {}
                Stored::Sealed(values) => guard.values = values,
                Stored::Clear(values) => {
                    // Migration: rewritten sealed at once, under the lock.
                    guard.commit_now(values)?;
                    tracing::info!(provider, state_file = %guard.path.display(), key_id = %self.keys.key_id(), "state file was in clear (written by an older reauth); rewritten sealed");
                }
            }
            Ok(Box::new(guard) as Box<dyn StateGuard>)
        })
    }

    fn describe(&self, provider: &str) -> String {
        self.path(provider).display().to_string()
    }
}

type Values = BTreeMap<String, String>;

/// Provider state in memory, lost when the process ends; calls of one provider
/// still take turns.
#[derive(Default)]
pub struct MemoryStateStore {
    states: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Values>>>>,
}

impl std::fmt::Debug for MemoryStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStateStore").finish_non_exhaustive()
    }
}

struct MemoryGuard(tokio::sync::OwnedMutexGuard<BTreeMap<String, String>>);

impl StateGuard for MemoryGuard {
    fn values(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    fn commit(
        &mut self,
        values: BTreeMap<String, String>,
    ) -> StoreFuture<'_, Result<(), StoreError>> {
        *self.0 = values;
        Box::pin(std::future::ready(Ok(())))
    }

    fn previous_holder(&self) -> Option<&DeadHolder> {
        None
    }
}

impl StateStore for MemoryStateStore {
    fn lock<'a>(
        &'a self,
        provider: &'a str,
        wait: Duration,
    ) -> StoreFuture<'a, Result<Box<dyn StateGuard>, StoreError>> {
        Box::pin(async move {
            let state = self
                .states
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(provider.to_string())
                .or_default()
                .clone();
            let started = Instant::now();
            let guard = tokio::time::timeout(wait, state.lock_owned())
                .await
                .map_err(|_| StoreError::Locked {
                    what: format!("state of provider `{provider}` (in memory)"),
                    holder: Some(std::process::id()),
                    waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                })?;
            Ok(Box::new(MemoryGuard(guard)) as Box<dyn StateGuard>)
        })
    }

    fn describe(&self, _provider: &str) -> String {
        "memory".into()
    }
}

/// Check the size limits of one `set`.
pub(crate) fn check_set(
    values: &BTreeMap<String, String>,
    key: &str,
    value: &str,
) -> Result<(), String> {
    if key.len() > MAX_VALUE || value.len() > MAX_VALUE {
        return Err(format!(
            "state keys and values are limited to {MAX_VALUE} bytes"
        ));
    }
    if !values.contains_key(key) && values.len() >= MAX_KEYS {
        return Err(format!("state is limited to {MAX_KEYS} keys"));
    }
    Ok(())
}

/// Check the whole state's size after a `set`.
pub(crate) fn check_size(values: &BTreeMap<String, String>) -> Result<(), String> {
    let size = serde_json::to_vec(values).map_or(usize::MAX, |v| v.len());
    if size > MAX_STATE_BYTES {
        return Err(format!(
            "state is limited to {MAX_STATE_BYTES} bytes in all (as JSON); this set would make it {size}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fs::{TMP_PREFIX, temp_file_in};
    use std::os::unix::fs::PermissionsExt;

    fn keys(dir: &Path) -> Arc<KeyRing> {
        Arc::new(KeyRing::load_or_create(&dir.join("keys/key")).unwrap())
    }

    use super::super::test_runtime as rt;

    #[test]
    fn commits_survive_reopen_and_leave_no_debris() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStateStore::new(dir.path().join("state"), keys(dir.path()));
        rt().block_on(async {
            let mut g = store.lock("p", Duration::from_secs(1)).await.unwrap();
            assert!(g.values().is_empty());
            g.commit(BTreeMap::from([("refresh".into(), "r2".into())]))
                .await
                .unwrap();
            drop(g);
            let again = FileStateStore::new(dir.path().join("state"), keys(dir.path()));
            let g = again.lock("p", Duration::from_secs(1)).await.unwrap();
            assert_eq!(g.values().get("refresh").map(String::as_str), Some("r2"));
            assert!(
                g.previous_holder().is_none(),
                "a clean release leaves no holder"
            );
        });
        let mode = std::fs::metadata(dir.path().join("state"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let mode = std::fs::metadata(dir.path().join("state/p.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_second_holder_waits_and_times_out_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        // Two stores on one directory stand for two processes: only the flock
        // stands between them.
        let a = FileStateStore::new(dir.path(), keys(dir.path()));
        let b = FileStateStore::new(dir.path(), keys(dir.path()));
        rt().block_on(async {
            let held = a.lock("p", Duration::from_secs(1)).await.unwrap();
            let err = match b.lock("p", Duration::from_millis(50)).await {
                Err(e) => e,
                Ok(_) => panic!("two holders at once"),
            };
            match &err {
                StoreError::Locked { holder, .. } => {
                    assert_eq!(*holder, Some(std::process::id()))
                }
                other => panic!("{other:?}"),
            }
            assert!(err.to_string().contains("held by process"), "{err}");
            // Other providers are not blocked.
            b.lock("q", Duration::from_millis(50)).await.unwrap();
            drop(held);
            b.lock("p", Duration::from_millis(200)).await.unwrap();
        });
    }

    #[test]
    fn a_call_cut_off_while_holding_the_state_is_reported_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStateStore::new(dir.path(), keys(dir.path()));
        rt().block_on(async {
            let mut g = store.lock("p", Duration::from_secs(1)).await.unwrap();
            g.abandon();
            drop(g);
            let g = store.lock("p", Duration::from_secs(1)).await.unwrap();
            let dead = g.previous_holder().expect("recorded");
            assert_eq!(dead.pid, std::process::id());
            assert!(dead.aborted);
            drop(g);
            // A clean release clears the record again.
            let g = store.lock("p", Duration::from_secs(1)).await.unwrap();
            assert!(g.previous_holder().is_none());
        });
    }

    #[test]
    fn a_holder_that_died_is_reported_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        // What a killed holder leaves: a record, and no flock (the kernel dropped it).
        std::fs::write(dir.path().join("p.lock"), "pid=4242 since=1700000000\n").unwrap();
        let store = FileStateStore::new(dir.path(), keys(dir.path()));
        rt().block_on(async {
            let g = store.lock("p", Duration::from_secs(1)).await.unwrap();
            assert_eq!(g.previous_holder().map(|d| d.pid), Some(4242));
        });
    }

    #[test]
    fn debris_of_dead_writers_is_removed_and_a_corrupt_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        // PID 0x7fffffff does not run; our own PID does.
        let old = SystemTime::now() - Duration::from_secs(3600);
        let debris = |name: &str| {
            std::fs::write(dir.path().join(name), "x").unwrap();
            File::options()
                .write(true)
                .open(dir.path().join(name))
                .unwrap()
                .set_modified(old)
                .unwrap();
        };
        debris(".tmp-2147483647-00ff");
        // A fresh file of a dead PID may belong to a live writer in another PID
        // namespace: kept until it is old.
        std::fs::write(dir.path().join(".tmp-2147483646-00ff"), "x").unwrap();
        let mine = format!(".tmp-{}-00ff", std::process::id());
        debris(&mine);
        std::fs::write(dir.path().join("p.json"), "{not json").unwrap();
        let store = FileStateStore::new(dir.path(), keys(dir.path()));
        assert!(!dir.path().join(".tmp-2147483647-00ff").exists());
        assert!(dir.path().join(".tmp-2147483646-00ff").exists());
        assert!(dir.path().join(&mine).exists());
        let err = rt()
            .block_on(store.lock("p", Duration::from_secs(1)))
            .err()
            .expect("corrupt");
        assert!(err.to_string().contains("p.json"), "{err}");
    }

    #[test]
    fn an_atomic_write_leaves_the_target_whole_and_no_temp_file_when_the_rename_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, b"one", true).unwrap();
        write_atomically(&path, b"two", false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        // A directory in the way: the rename fails, the temp file must go.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), "x").unwrap();
        assert!(write_atomically(&blocked, b"three", true).is_err());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(TMP_PREFIX)),
            "temp file left behind: {names:?}"
        );
        // The temp files carry the writer's PID (what `remove_debris` reads).
        let tmp = temp_file_in(dir.path()).unwrap();
        let name = tmp
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with(&format!("{TMP_PREFIX}{}-", std::process::id())),
            "{name}"
        );
    }

    /// Write `values` as `provider`'s state through a store on `dir`.
    fn put(dir: &Path, keys: &Arc<KeyRing>, provider: &str, values: &[(&str, &str)]) {
        let store = FileStateStore::new(dir, keys.clone());
        rt().block_on(async {
            let mut g = store.lock(provider, Duration::from_secs(1)).await.unwrap();
            g.commit(
                values
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
            .await
            .unwrap();
        });
    }

    fn get(
        dir: &Path,
        keys: &Arc<KeyRing>,
        provider: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        let store = FileStateStore::new(dir, keys.clone());
        rt().block_on(async {
            store
                .lock(provider, Duration::from_secs(1))
                .await
                .map(|g| g.values().clone())
                .map_err(|e| e.to_string())
        })
    }

    #[test]
    fn state_at_rest_is_sealed_bound_to_the_provider_and_never_reset() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let ring = keys(dir.path());
        put(&state, &ring, "sso", &[("refresh", "rt-secret-value-1")]);
        let bytes = std::fs::read(state.join("sso.json")).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("rt-secret-value-1"));
        assert_eq!(
            get(&state, &ring, "sso").unwrap()["refresh"],
            "rt-secret-value-1"
        );

        // Renamed to another provider's name: does not open, names both.
        std::fs::copy(state.join("sso.json"), state.join("other.json")).unwrap();
        let err = get(&state, &ring, "other").unwrap_err();
        assert!(
            err.contains("provider `other`") && err.contains(ring.key_id()),
            "{err}"
        );
        assert!(err.contains("sealed for another name"), "{err}");

        // Tampered: an error, and the file is left as it was (no silent reset).
        let mut tampered = bytes.clone();
        let last = tampered.len() - 3;
        tampered[last] ^= 1;
        std::fs::write(state.join("sso.json"), &tampered).unwrap();
        let err = get(&state, &ring, "sso").unwrap_err();
        assert!(err.contains("does not open"), "{err}");
        assert_eq!(std::fs::read(state.join("sso.json")).unwrap(), tampered);

        // The wrong key: names the key id the file wants.
        std::fs::write(state.join("sso.json"), &bytes).unwrap();
        let other = Arc::new(KeyRing::load_or_create(&dir.path().join("other-key")).unwrap());
        let err = get(&state, &other, "sso").unwrap_err();
        assert!(
            err.contains(&format!("key id {}", ring.key_id()))
                && err.contains("not in the key ring"),
            "{err}"
        );

        // Rotation: a new first key seals, the old one still opens.
        let key_file = dir.path().join("keys/key");
        let old = std::fs::read_to_string(&key_file).unwrap();
        std::fs::write(&key_file, format!("v1 k2 {}\n{old}", "cd".repeat(32))).unwrap();
        let rotated = keys(dir.path());
        assert_eq!(
            get(&state, &rotated, "sso").unwrap()["refresh"],
            "rt-secret-value-1"
        );
        put(&state, &rotated, "sso", &[("refresh", "rt-secret-value-2")]);
        // A process that started before the rotation learns k2 from the key file.
        assert_eq!(
            get(&state, &ring, "sso").unwrap()["refresh"],
            "rt-secret-value-2"
        );
    }

    #[test]
    fn clear_text_state_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(
            state.join("sso.json"),
            r#"{"refresh":"{\"refresh_token\":\"rt-clear-legacy\"}"}"#,
        )
        .unwrap();
        let ring = keys(dir.path());
        let values = get(&state, &ring, "sso").unwrap();
        assert_eq!(values["refresh"], r#"{"refresh_token":"rt-clear-legacy"}"#);
        let bytes = std::fs::read(state.join("sso.json")).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("rt-clear-legacy"),
            "rewritten sealed"
        );
        assert_eq!(get(&state, &ring, "sso").unwrap(), values);
        // From then on, clear text in this directory is refused: it could only
        // have been planted (say, someone's own refresh token).
        std::fs::write(state.join("other.json"), r#"{"refresh":"planted"}"#).unwrap();
        let err = get(&state, &ring, "other").unwrap_err();
        assert!(
            err.contains("is in clear") && err.contains("refused"),
            "{err}"
        );
    }

    #[test]
    fn the_total_state_size_is_bounded() {
        let mut values = BTreeMap::new();
        // Control characters take six bytes each as JSON.
        values.insert("k".to_string(), "\u{1}".repeat(200_000));
        assert!(check_size(&values).unwrap_err().contains("in all"));
        values.insert("k".to_string(), "x".repeat(1000));
        assert!(check_size(&values).is_ok());
    }

    #[test]
    fn memory_store_serialises_calls() {
        let store = MemoryStateStore::default();
        rt().block_on(async {
            let mut g = store.lock("p", Duration::from_secs(1)).await.unwrap();
            g.commit(BTreeMap::from([("k".into(), "v".into())]))
                .await
                .unwrap();
            assert!(store.lock("p", Duration::from_millis(20)).await.is_err());
            drop(g);
            let g = store.lock("p", Duration::from_millis(20)).await.unwrap();
            assert_eq!(g.values().get("k").map(String::as_str), Some("v"));
        });
    }
}
