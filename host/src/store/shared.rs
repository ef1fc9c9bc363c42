//! The local backend of [`SharedCache`]: one sealed file per key in a 0700
//! directory, a `flock(2)` per key for cross-process single-flight.

use super::file::FileLock;
use super::fs::{private_dir, remove_debris, write_atomically};
use super::keys::{KeyRing, wipe};
use super::{SharedCache, StoreError, StoreFuture};
use crate::types::Credentials;
use crate::wire::WireCredentials;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One shared credential and when it was stored.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::exhaustive_structs,
    reason = "what a `SharedCache` stores: backends outside this crate build and read it whole"
)]
pub struct SharedEntry {
    /// The credential; `expires_at` is the expiry the writer's cache placed it on
    /// (its own, its JWT's, or the configured default lifetime).
    pub credentials: Credentials,
    /// When the writer stored it.
    pub written_at: SystemTime,
    /// Until when other processes take it as it is; after, the first one that
    /// needs it refreshes it (the writer's refresh-ahead point).
    pub fresh_until: SystemTime,
}

impl SharedEntry {
    /// A fingerprint of the credential (SHA-256 of its secret parts): what
    /// compare-and-invalidate compares. Never logged.
    pub fn fingerprint(credentials: &Credentials) -> String {
        use sha2::{Digest, Sha256};
        let wire = WireCredentials::from(credentials);
        let bytes = serde_json::to_vec(&wire.credential).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Plain {
    v: u8,
    written_at_ms: u64,
    fresh_until_ms: u64,
    credentials: WireCredentials,
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

/// `reauth-l2` format, version 1.
const MAGIC: &[u8] = b"reauth-l2\x01";
/// Largest entry file read.
const MAX_ENTRY: u64 = 1 << 20;

/// The shared token cache in a directory. See the [module docs](super).
pub struct FileSharedCache {
    dir: PathBuf,
    keys: Arc<KeyRing>,
    ids: ring::hmac::Key,
    max_entries: usize,
    writes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for FileSharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSharedCache")
            .field("dir", &self.dir)
            .field("key_id", &self.keys.key_id())
            .finish_non_exhaustive()
    }
}

impl FileSharedCache {
    /// Open the cache in `dir` (created 0700), sealing entries with `keys`.
    /// Temporary files of writers killed mid-write are removed now.
    pub fn open(dir: impl Into<PathBuf>, keys: Arc<KeyRing>) -> Result<Self, StoreError> {
        let dir = dir.into();
        private_dir(&dir).map_err(|source| StoreError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        remove_debris(&dir);
        // Entry ids are an HMAC under a key derived from the sealing key: file
        // names say nothing about providers, subjects or secrets.
        let ids = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &keys.derive(b"reauth-l2 entry ids"),
        );
        Ok(FileSharedCache {
            dir,
            keys,
            ids,
            max_entries: 10_000,
            writes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Keep at most `max` entries (default 10,000): past it, the least recently
    /// written are removed. Distinct subjects cannot fill the disk.
    pub fn with_max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(1);
        self
    }

    /// Remove the oldest entries beyond `max_entries` (down to 90% of it).
    /// Returns how many went. (Lock files are a fixed set of stripes: nothing to
    /// prune, and never one removed while someone holds it.)
    pub fn prune(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut tokens = Vec::new();
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tok") {
                let modified = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(UNIX_EPOCH);
                tokens.push((modified, path));
            }
        }
        if tokens.len() > self.max_entries {
            tokens.sort();
            let keep = self.max_entries - self.max_entries / 10;
            let excess = tokens.len() - keep;
            for (_, path) in tokens.into_iter().take(excess) {
                if std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
            tracing::info!(dir = %self.dir.display(), removed, max_entries = self.max_entries, "shared cache pruned");
        }
        removed
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.tok"))
    }

    /// The lock of `id`'s stripe: one of 4,096 files, whatever the number of
    /// keys (a client sending random subjects cannot create files without end).
    fn lock_path(&self, id: &str) -> PathBuf {
        let stripe = id.get(..3).unwrap_or("000");
        self.dir.join("locks").join(format!("{stripe}.lock"))
    }

    fn seal(&self, id: &str, entry: &SharedEntry) -> Result<Vec<u8>, StoreError> {
        self.keys.seal(MAGIC, id.as_bytes(), entry_to_bytes(entry)?)
    }

    /// Open a sealed entry; `Err` says why not (without content).
    fn unseal(&self, id: &str, bytes: &mut [u8]) -> Result<SharedEntry, String> {
        let plain = self
            .keys
            .open(MAGIC, id.as_bytes(), bytes)
            .map_err(|e| e.to_string())?;
        let parsed = entry_from_bytes(plain);
        wipe(plain);
        parsed
    }
}

/// An entry as the bytes that are sealed (the caller wipes them).
pub(crate) fn entry_to_bytes(entry: &SharedEntry) -> Result<Vec<u8>, StoreError> {
    let plain = Plain {
        v: 1,
        written_at_ms: ms(entry.written_at),
        fresh_until_ms: ms(entry.fresh_until),
        credentials: WireCredentials::from(&entry.credentials),
    };
    serde_json::to_vec(&plain).map_err(|e| StoreError::Corrupt {
        what: "shared cache entry".into(),
        why: e.to_string(),
    })
}

/// The entry in `plain` (opened bytes); `Err` says why not (without content).
pub(crate) fn entry_from_bytes(plain: &[u8]) -> Result<SharedEntry, String> {
    let parsed: Plain = serde_json::from_slice(plain).map_err(|_| "has malformed content")?;
    let credentials =
        Credentials::try_from(parsed.credentials).map_err(|e| format!("is malformed: {e}"))?;
    Ok(SharedEntry {
        credentials,
        written_at: from_ms(parsed.written_at_ms),
        fresh_until: from_ms(parsed.fresh_until_ms),
    })
}

impl SharedCache for FileSharedCache {
    fn read<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<super::SharedEntry>> {
        Box::pin(async move {
            let path = self.entry_path(id);
            let mut bytes = Vec::new();
            match std::fs::File::open(&path) {
                Ok(f) => {
                    if let Err(e) = f.take(MAX_ENTRY).read_to_end(&mut bytes) {
                        tracing::warn!(entry = %path.display(), error = %e, "shared cache entry unreadable; treated as a miss");
                        return None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                Err(e) => {
                    tracing::warn!(entry = %path.display(), error = %e, "shared cache entry unreadable; treated as a miss");
                    return None;
                }
            }
            let result = self.unseal(id, &mut bytes);
            wipe(&mut bytes);
            match result {
                Ok(entry) => Some(entry),
                Err(why) => {
                    tracing::warn!(entry = %path.display(), "shared cache entry {why}; treated as a miss and removed");
                    let _ = std::fs::remove_file(&path);
                    None
                }
            }
        })
    }

    fn write<'a>(
        &'a self,
        id: &'a str,
        entry: &'a SharedEntry,
        _lease: Option<&'a super::Lease>,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let bytes = self.seal(id, entry)?;
            let path = self.entry_path(id);
            // Now and then (and at the first write), keep the directory bounded.
            let n = self
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_multiple_of(256) {
                self.prune();
            }
            // A cache: atomic, not durable (a lost entry is one more fetch).
            write_atomically(&path, &bytes, false).map_err(|source| StoreError::Io {
                what: format!("writing shared cache entry {}", path.display()),
                source,
            })
        })
    }

    fn remove_if<'a>(&'a self, id: &'a str, fingerprint: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            // Under the key's lock, so that a newer entry written meanwhile is never
            // the one removed (past a short wait: without it, at worst one more
            // fetch).
            let _lock = FileLock::acquire(&self.lock_path(id), Duration::from_secs(2))
                .await
                .ok();
            match self.read(id).await {
                Some(entry) if SharedEntry::fingerprint(&entry.credentials) == fingerprint => {
                    std::fs::remove_file(self.entry_path(id)).is_ok()
                }
                _ => false,
            }
        })
    }

    fn fetching<'a>(
        &'a self,
        id: &'a str,
        wait: Duration,
    ) -> StoreFuture<'a, Option<super::Lease>> {
        Box::pin(async move {
            let path = self.lock_path(id);
            match FileLock::acquire(&path, wait).await {
                Ok(acquired) => Some(super::Lease {
                    fence: 0,
                    token: String::new(),
                    _hold: Box::new(acquired.lock),
                }),
                Err(Ok(holder)) => {
                    tracing::warn!(
                        ?holder,
                        wait_ms = wait.as_millis() as u64,
                        "another process kept fetching a shared key; fetching without it"
                    );
                    None
                }
                Err(Err(e)) => {
                    tracing::warn!(lock = %path.display(), error = %e, "cannot lock a shared cache key; fetching without it");
                    None
                }
            }
        })
    }

    fn entry_id(&self, material: &[u8]) -> String {
        hex::encode(&ring::hmac::sign(&self.ids, material).as_ref()[..16])
    }

    fn key_id(&self) -> String {
        self.keys.key_id().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Credential;

    fn entry(token: &str) -> SharedEntry {
        let now = SystemTime::now();
        SharedEntry {
            credentials: Credentials {
                credential: Credential::Bearer(token.into()),
                expires_at: Some(now + Duration::from_secs(600)),
                principal: Some("alice".into()),
            },
            written_at: now,
            fresh_until: now + Duration::from_secs(480),
        }
    }

    fn open(dir: &Path) -> FileSharedCache {
        let keys = KeyRing::load_or_create(&super::super::keys::default_key_file(dir)).unwrap();
        FileSharedCache::open(dir, Arc::new(keys)).unwrap()
    }

    use super::super::test_runtime as rt;

    #[test]
    fn round_trip_sealed_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(&dir.path().join("l2"));
        let id = cache.entry_id(b"provider|subject");
        rt().block_on(async {
            assert!(cache.read(&id).await.is_none());
            cache
                .write(&id, &entry("tok-secret-AAAA"), None)
                .await
                .unwrap();
            let back = cache.read(&id).await.unwrap();
            assert_eq!(back.credentials.principal.as_deref(), Some("alice"));
            assert_eq!(
                SharedEntry::fingerprint(&back.credentials),
                SharedEntry::fingerprint(&entry("tok-secret-AAAA").credentials)
            );
        });
        for file in std::fs::read_dir(dir.path().join("l2")).unwrap().flatten() {
            let bytes = std::fs::read(file.path()).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains("tok-secret-AAAA"),
                "{} holds the token in clear",
                file.path().display()
            );
        }
        assert_eq!(
            super::super::fs::loose_permissions(&dir.path().join("l2.keys/key")),
            None
        );
        assert_eq!(
            super::super::fs::loose_permissions(&dir.path().join("l2")),
            None
        );
    }

    #[test]
    fn tampered_swapped_and_foreign_entries_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(&dir.path().join("l2"));
        let (a, b) = (cache.entry_id(b"a"), cache.entry_id(b"b"));
        rt().block_on(async {
            cache.write(&a, &entry("token-a"), None).await.unwrap();
            cache.write(&b, &entry("token-b"), None).await.unwrap();
            // Swap the files: neither opens under the other's id.
            let (pa, pb) = (cache.entry_path(&a), cache.entry_path(&b));
            let (ba, bb) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
            std::fs::write(&pa, &bb).unwrap();
            std::fs::write(&pb, &ba).unwrap();
            assert!(cache.read(&a).await.is_none());
            assert!(cache.read(&b).await.is_none());
            // A flipped byte.
            cache.write(&a, &entry("token-a"), None).await.unwrap();
            let mut bytes = std::fs::read(&pa).unwrap();
            let last = bytes.len() - 20;
            bytes[last] ^= 1;
            std::fs::write(&pa, &bytes).unwrap();
            assert!(cache.read(&a).await.is_none());
            // Garbage, empty, truncated: misses, no panic.
            for junk in [&b""[..], b"reauth-l2\x01", b"reauth-l2\x01\xff", b"xx"] {
                std::fs::write(&pa, junk).unwrap();
                assert!(cache.read(&a).await.is_none());
            }
            // Another key (another user's cache, or a replaced key file).
            cache.write(&a, &entry("token-a"), None).await.unwrap();
            let other = tempfile::tempdir().unwrap();
            let foreign_keys = KeyRing::load_or_create(&other.path().join("k")).unwrap();
            let foreign =
                FileSharedCache::open(dir.path().join("l2"), Arc::new(foreign_keys)).unwrap();
            assert!(foreign.read(&a).await.is_none());
        });
    }

    #[test]
    fn the_directory_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(&dir.path().join("l2")).with_max_entries(20);
        rt().block_on(async {
            for i in 0..60 {
                let id = cache.entry_id(format!("subject-{i}").as_bytes());
                cache.write(&id, &entry("t"), None).await.unwrap();
                if i % 16 == 0 {
                    cache.prune();
                }
            }
        });
        cache.prune();
        let n = std::fs::read_dir(dir.path().join("l2"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "tok"))
            .count();
        assert!(n <= 20, "{n} entries kept");
    }

    #[test]
    fn rotated_keys_still_open_older_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(&dir.path().join("l2"));
        let id = cache.entry_id(b"k");
        rt().block_on(cache.write(&id, &entry("token-old"), None))
            .unwrap();
        let key_file = dir.path().join("l2.keys/key");
        let old = std::fs::read_to_string(&key_file).unwrap();
        std::fs::write(&key_file, format!("v1 next {}\n{old}", "ab".repeat(32))).unwrap();
        let rotated = open(&dir.path().join("l2"));
        assert_eq!(rotated.key_id(), "next");
        // Ids derive from the sealing key: a rotation starts a new namespace, and
        // the old entry is still read through its own id.
        assert!(rt().block_on(rotated.read(&id)).is_some());
    }
}
