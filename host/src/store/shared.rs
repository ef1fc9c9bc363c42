//! The local backend of [`SharedCache`]: one sealed file per key in a 0700
//! directory, a `flock(2)` per key for cross-process single-flight.

use super::file::{FileLock, private_dir, remove_debris, write_atomically};
use super::{SharedCache, StoreError, StoreFuture};
use crate::types::Credentials;
use crate::wire::WireCredentials;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One shared credential and when it was stored.
#[derive(Debug, Clone, PartialEq)]
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
/// The key file's line format: `v1 <key id> <64 hex digits>`; the first line seals.
const KEY_VERSION: &str = "v1";

struct Key {
    id: String,
    aead: LessSafeKey,
}

/// The shared token cache in a directory. See the [module docs](super).
pub struct FileSharedCache {
    dir: PathBuf,
    keys: Vec<Key>,
    ids: ring::hmac::Key,
    rng: SystemRandom,
}

impl std::fmt::Debug for FileSharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSharedCache")
            .field("dir", &self.dir)
            .field("key_id", &self.keys[0].id)
            .finish_non_exhaustive()
    }
}

impl FileSharedCache {
    /// Open the cache in `dir` (created 0700), sealing with the key in `key_file`
    /// (default `<dir>/key`), which is created 0600 with a random key on first use.
    /// Further lines of the key file are older keys, still accepted for reading
    /// (put a new key on the first line to rotate).
    pub fn open(dir: impl Into<PathBuf>, key_file: Option<&Path>) -> Result<Self, StoreError> {
        let dir = dir.into();
        let io = |what: String| move |source| StoreError::Io { what, source };
        private_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        remove_debris(&dir);
        let key_path = key_file.map_or_else(|| dir.join("key"), Path::to_path_buf);
        let raw = load_or_create_key(&key_path)?;
        let keys = raw
            .iter()
            .map(|(id, bytes)| Key {
                id: id.clone(),
                aead: LessSafeKey::new(
                    UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("32-byte key"),
                ),
            })
            .collect();
        // Entry ids are an HMAC under a key derived from the sealing key: file
        // names say nothing about providers, subjects or secrets.
        let ids = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            ring::hmac::sign(
                &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw[0].1),
                b"reauth-l2 entry ids",
            )
            .as_ref(),
        );
        Ok(FileSharedCache {
            dir,
            keys,
            ids,
            rng: SystemRandom::new(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.tok"))
    }

    fn seal(&self, id: &str, entry: &SharedEntry) -> Result<Vec<u8>, StoreError> {
        let plain = Plain {
            v: 1,
            written_at_ms: ms(entry.written_at),
            fresh_until_ms: ms(entry.fresh_until),
            credentials: WireCredentials::from(&entry.credentials),
        };
        let mut buf = serde_json::to_vec(&plain).map_err(|e| StoreError::Corrupt {
            what: "shared cache entry".into(),
            why: e.to_string(),
        })?;
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| StoreError::Io {
            what: "drawing a nonce".into(),
            source: std::io::Error::other("no randomness"),
        })?;
        let sealed = key.aead.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(id)),
            &mut buf,
        );
        if sealed.is_err() {
            wipe(&mut buf);
            return Err(StoreError::Corrupt {
                what: "shared cache entry".into(),
                why: "sealing failed".into(),
            });
        }
        let mut out = Vec::with_capacity(MAGIC.len() + 1 + key.id.len() + NONCE_LEN + buf.len());
        out.extend_from_slice(MAGIC);
        out.push(u8::try_from(key.id.len()).unwrap_or(0));
        out.extend_from_slice(key.id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Open a sealed entry; `Err` says why not (without content).
    fn unseal(&self, id: &str, bytes: &mut [u8]) -> Result<SharedEntry, String> {
        let rest = bytes
            .strip_prefix(MAGIC)
            .ok_or("not a reauth shared-cache entry")?;
        let (&kid_len, rest) = rest.split_first().ok_or("truncated")?;
        let kid_len = usize::from(kid_len);
        if rest.len() < kid_len + NONCE_LEN {
            return Err("truncated".into());
        }
        let kid = String::from_utf8_lossy(&rest[..kid_len]).into_owned();
        let key = self
            .keys
            .iter()
            .find(|k| k.id == kid)
            .ok_or_else(|| format!("sealed with key {kid}, which is not in the key file"))?;
        let header = MAGIC.len() + 1 + kid_len + NONCE_LEN;
        let nonce = Nonce::try_assume_unique_for_key(&bytes[header - NONCE_LEN..header])
            .map_err(|_| "bad nonce")?;
        let plain = key
            .aead
            .open_in_place(nonce, Aad::from(aad(id)), &mut bytes[header..])
            .map_err(|_| {
                format!("does not open with key {kid} (tampered, or another entry's file)")
            })?;
        let parsed: Plain = serde_json::from_slice(plain).map_err(|_| "malformed content")?;
        wipe(plain);
        let credentials =
            Credentials::try_from(parsed.credentials).map_err(|e| format!("malformed: {e}"))?;
        Ok(SharedEntry {
            credentials,
            written_at: from_ms(parsed.written_at_ms),
            fresh_until: from_ms(parsed.fresh_until_ms),
        })
    }
}

fn aad(id: &str) -> Vec<u8> {
    let mut aad = MAGIC.to_vec();
    aad.extend_from_slice(id.as_bytes());
    aad
}

/// Best-effort: overwrite plaintext before the buffer is freed.
fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    std::hint::black_box(buf);
}

/// Read the key file, or create it (0600, one random key) if missing. Two
/// processes creating it at once end up with the same key (link, not rename).
fn load_or_create_key(path: &Path) -> Result<Vec<(String, [u8; 32])>, StoreError> {
    let io = |what: String| move |source| StoreError::Io { what, source };
    if !path.exists() {
        let dir = path.parent().unwrap_or(Path::new("."));
        private_dir(dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| StoreError::Io {
                what: "generating a key".into(),
                source: std::io::Error::other("no randomness"),
            })?;
        let line = format!("{KEY_VERSION} {} {}\n", key_id(&key), hex::encode(key));
        let tmp = dir.join(format!(
            ".tmp-{}-key-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                use std::io::Write;
                f.write_all(line.as_bytes())?;
                f.sync_all()
            })
            .map_err(io(format!("creating key file {}", path.display())))?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                tracing::info!(key_file = %path.display(), key_id = %key_id(&key), "created the shared-cache key")
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(format!("creating key file {}", path.display()))(e)),
        }
    }
    if let Some(mode) = super::file::loose_permissions(path) {
        tracing::warn!(key_file = %path.display(), mode = format!("{mode:o}"), "the key file is readable by other users; it should be 0600");
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_string(&mut text))
        .map_err(io(format!("reading key file {}", path.display())))?;
    let bad = |line: usize, why: &str| StoreError::Corrupt {
        what: format!("key file {}", path.display()),
        why: format!("line {line}: {why}"),
    };
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [version, id, hexkey] = fields[..] else {
            return Err(bad(i + 1, "expected `v1 <key id> <64 hex digits>`"));
        };
        if version != KEY_VERSION {
            return Err(bad(i + 1, "unknown version (expected v1)"));
        }
        let mut key = [0u8; 32];
        hex::decode_to_slice(hexkey, &mut key)
            .map_err(|_| bad(i + 1, "the key is not 64 hex digits"))?;
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad(i + 1, "the key id must be 1–64 letters, digits or '-'"));
        }
        keys.push((id.to_string(), key));
    }
    if keys.is_empty() {
        return Err(bad(0, "no key"));
    }
    Ok(keys)
}

/// A short public id of a key: the first 8 hex digits of its SHA-256.
fn key_id(key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(key)[..4])
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
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let bytes = self.seal(id, entry)?;
            let path = self.entry_path(id);
            // A cache: atomic, not durable (a lost entry is one more fetch).
            write_atomically(&path, &bytes, false).map_err(|source| StoreError::Io {
                what: format!("writing shared cache entry {}", path.display()),
                source,
            })
        })
    }

    fn remove_if<'a>(&'a self, id: &'a str, fingerprint: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
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
    ) -> StoreFuture<'a, Option<Box<dyn Send + 'static>>> {
        Box::pin(async move {
            let path = self.dir.join(format!("{id}.lock"));
            match FileLock::acquire(&path, wait).await {
                Ok(acquired) => Some(Box::new(acquired.lock) as Box<dyn Send>),
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
        self.keys[0].id.clone()
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

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn round_trip_sealed_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileSharedCache::open(dir.path().join("l2"), None).unwrap();
        let id = cache.entry_id(b"provider|subject");
        rt().block_on(async {
            assert!(cache.read(&id).await.is_none());
            cache.write(&id, &entry("tok-secret-AAAA")).await.unwrap();
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
            super::super::file::loose_permissions(&dir.path().join("l2/key")),
            None
        );
        assert_eq!(
            super::super::file::loose_permissions(&dir.path().join("l2")),
            None
        );
    }

    #[test]
    fn tampered_swapped_and_foreign_entries_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileSharedCache::open(dir.path(), None).unwrap();
        let (a, b) = (cache.entry_id(b"a"), cache.entry_id(b"b"));
        rt().block_on(async {
            cache.write(&a, &entry("token-a")).await.unwrap();
            cache.write(&b, &entry("token-b")).await.unwrap();
            // Swap the files: neither opens under the other's id.
            let (pa, pb) = (cache.entry_path(&a), cache.entry_path(&b));
            let (ba, bb) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
            std::fs::write(&pa, &bb).unwrap();
            std::fs::write(&pb, &ba).unwrap();
            assert!(cache.read(&a).await.is_none());
            assert!(cache.read(&b).await.is_none());
            // A flipped byte.
            cache.write(&a, &entry("token-a")).await.unwrap();
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
            cache.write(&a, &entry("token-a")).await.unwrap();
            let other = tempfile::tempdir().unwrap();
            let foreign = FileSharedCache::open(dir.path(), Some(&other.path().join("k"))).unwrap();
            assert!(foreign.read(&a).await.is_none());
        });
    }

    #[test]
    fn rotated_keys_still_open_older_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileSharedCache::open(dir.path(), None).unwrap();
        let id = cache.entry_id(b"k");
        rt().block_on(cache.write(&id, &entry("token-old")))
            .unwrap();
        let old = std::fs::read_to_string(dir.path().join("key")).unwrap();
        let new_key = format!("v1 next {}\n{old}", "ab".repeat(32));
        std::fs::write(dir.path().join("key"), new_key).unwrap();
        let rotated = FileSharedCache::open(dir.path(), None).unwrap();
        assert_eq!(rotated.key_id(), "next");
        // Ids derive from the sealing key: a rotation starts a new namespace, and
        // the old entry is read through its own id.
        assert!(rt().block_on(rotated.read(&id)).is_some());
    }

    #[test]
    fn a_broken_key_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), "v1 id nothex\n").unwrap();
        let err = FileSharedCache::open(dir.path(), None).unwrap_err();
        assert!(
            err.to_string().contains("key file") && err.to_string().contains("line 1"),
            "{err}"
        );
    }
}
