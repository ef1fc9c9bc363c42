//! The key ring that seals provider state and the shared token cache at rest.
//!
//! A key file (or a `{ env }` / `{ file }` config value) holds lines
//! `v1 <key id> <64 hex digits>`; the first key seals, every key opens (put a new
//! key on the first line to rotate; drop old lines once nothing sealed with them
//! is left). Sealing is ChaCha20-Poly1305 with a random 96-bit nonce; the format
//! is `magic | key-id length | key id | nonce | ciphertext+tag`, and the
//! associated data binds the magic and what the caller names (the provider, the
//! entry id), so a file copied under another name does not open.

use super::StoreError;
use super::fs::{loose_permissions, private_dir};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::io::Read;
use std::path::Path;

const KEY_VERSION: &str = "v1";

struct Key {
    id: String,
    aead: LessSafeKey,
    raw: [u8; 32],
}

/// Keys that seal data at rest: a key file of lines `v1 <key id> <64 hex digits>`;
/// the first key seals, every key opens (ChaCha20-Poly1305, the provider or entry
/// bound as associated data).
pub struct KeyRing {
    keys: Vec<Key>,
    /// Keys added to the key file after start (rotation): they open, the
    /// start-up first key still seals until a restart.
    learned: std::sync::RwLock<Vec<Key>>,
    /// The key file, when the ring came from one (re-read for unknown key ids).
    path: Option<std::path::PathBuf>,
    rng: SystemRandom,
    source: String,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("source", &self.source)
            .field(
                "key_ids",
                &self.keys.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why sealed bytes did not open (never their content).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Not in the sealed format (or cut short).
    NotSealed,
    /// Sealed with a key that is not in the ring.
    UnknownKey(String),
    /// The key is known but the tag does not verify: tampered, or sealed for
    /// another name.
    Rejected(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::NotSealed => f.write_str("is not a sealed reauth file"),
            OpenError::UnknownKey(id) => {
                write!(
                    f,
                    "was sealed with key id {id}, which is not in the key ring"
                )
            }
            OpenError::Rejected(id) => write!(
                f,
                "does not open with key id {id}: it was modified, or sealed for another name (copied from another provider or entry)"
            ),
        }
    }
}

impl KeyRing {
    /// The ring in `path`, created (0600, in a 0700 directory) with one random key
    /// if missing. Two processes creating it at once end up with the same key.
    pub fn load_or_create(path: &Path) -> Result<KeyRing, StoreError> {
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
            let created = super::fs::temp_file_in(dir)
                .and_then(|mut f| {
                    use std::io::Write;
                    f.write_all(line.as_bytes())?;
                    f.as_file().sync_all()?;
                    Ok(f)
                })
                .map_err(io(format!("creating key file {}", path.display())))?;
            // Fails if another process created the file meanwhile (the temp file
            // is then removed): both use that one.
            match created.persist_noclobber(path).map_err(|e| e.error) {
                Ok(_) => {
                    tracing::info!(key_file = %path.display(), key_id = %key_id(&key), "created a key for data at rest")
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(format!("creating key file {}", path.display()))(e)),
            }
        }
        if let Some(mode) = loose_permissions(path) {
            tracing::warn!(key_file = %path.display(), mode = format!("{mode:o}"), "the key file is readable by other users; it should be 0600");
        }
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(64 * 1024).read_to_string(&mut text))
            .map_err(io(format!("reading key file {}", path.display())))?;
        let mut ring = Self::parse(&text, &format!("key file {}", path.display()))?;
        ring.path = Some(path.to_path_buf());
        Ok(ring)
    }

    /// Re-read the key file for keys added since start; true if one was learned.
    fn learn(&self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let mut text = String::new();
        let read =
            std::fs::File::open(path).and_then(|f| f.take(64 * 1024).read_to_string(&mut text));
        let Ok(ring) = read
            .map_err(|_| ())
            .and_then(|_| Self::parse(&text, &self.source).map_err(|_| ()))
        else {
            return false;
        };
        let mut learned = self.learned.write().unwrap_or_else(|e| e.into_inner());
        let mut added = false;
        for key in ring.keys {
            let known = self
                .keys
                .iter()
                .chain(learned.iter())
                .any(|k| k.id == key.id);
            if !known {
                tracing::info!(key_file = %path.display(), key_id = %key.id, "learned a key added to the key file (it opens; the start-up key seals until a restart)");
                learned.push(key);
                added = true;
            }
        }
        added
    }

    /// A ring from its text (`v1 <id> <hex>` lines; `#` comments). `what` names
    /// where the text came from, for errors.
    pub fn parse(text: &str, what: &str) -> Result<KeyRing, StoreError> {
        let bad = |line: usize, why: &str| StoreError::Corrupt {
            what: what.to_string(),
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
            let mut raw = [0u8; 32];
            hex::decode_to_slice(hexkey, &mut raw)
                .map_err(|_| bad(i + 1, "the key is not 64 hex digits"))?;
            if id.is_empty()
                || id.len() > 64
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(bad(i + 1, "the key id must be 1–64 letters, digits or '-'"));
            }
            if keys.iter().any(|k: &Key| k.id == id) {
                return Err(bad(i + 1, "duplicate key id"));
            }
            let aead = LessSafeKey::new(
                UnboundKey::new(&CHACHA20_POLY1305, &raw).expect("32-byte ChaCha20 key"),
            );
            keys.push(Key {
                id: id.to_string(),
                aead,
                raw,
            });
        }
        if keys.is_empty() {
            return Err(bad(0, "no key"));
        }
        Ok(KeyRing {
            keys,
            learned: std::sync::RwLock::new(Vec::new()),
            path: None,
            rng: SystemRandom::new(),
            source: what.to_string(),
        })
    }

    /// The id of the key that seals.
    pub fn key_id(&self) -> &str {
        &self.keys[0].id
    }

    /// A 32-byte subkey of the sealing key for `label` (HMAC-SHA256).
    pub(crate) fn derive(&self, label: &[u8]) -> [u8; 32] {
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.keys[0].raw),
            label,
        );
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Seal `plain` (wiped afterwards) for `name`.
    pub(crate) fn seal(
        &self,
        magic: &[u8],
        name: &[u8],
        mut plain: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        let failed = |why: &str| StoreError::Io {
            what: "sealing data at rest".into(),
            source: std::io::Error::other(why.to_string()),
        };
        self.rng
            .fill(&mut nonce)
            .map_err(|_| failed("no randomness"))?;
        let sealed = key.aead.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(magic, name)),
            &mut plain,
        );
        if sealed.is_err() {
            wipe(&mut plain);
            return Err(failed("sealing failed"));
        }
        let id_len = u8::try_from(key.id.len()).map_err(|_| failed("key id too long"))?;
        let mut out = Vec::with_capacity(magic.len() + 1 + key.id.len() + NONCE_LEN + plain.len());
        out.extend_from_slice(magic);
        out.push(id_len);
        out.extend_from_slice(key.id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&plain);
        Ok(out)
    }

    /// Open what [`KeyRing::seal`] sealed for `name`. The plaintext is a slice of
    /// `bytes` (wipe `bytes` after use).
    pub(crate) fn open<'b>(
        &self,
        magic: &[u8],
        name: &[u8],
        bytes: &'b mut [u8],
    ) -> Result<&'b mut [u8], OpenError> {
        let rest = bytes.strip_prefix(magic).ok_or(OpenError::NotSealed)?;
        let (&id_len, rest) = rest.split_first().ok_or(OpenError::NotSealed)?;
        let id_len = usize::from(id_len);
        if rest.len() < id_len + NONCE_LEN {
            return Err(OpenError::NotSealed);
        }
        let id = String::from_utf8_lossy(&rest[..id_len]).into_owned();
        let header = magic.len() + 1 + id_len + NONCE_LEN;
        let nonce = Nonce::try_assume_unique_for_key(&bytes[header - NONCE_LEN..header])
            .map_err(|_| OpenError::NotSealed)?;
        let aad = aad(magic, name);
        let body = &mut bytes[header..];
        let open = |key: &Key, body: &'b mut [u8]| {
            key.aead
                .open_in_place(nonce, Aad::from(aad.as_slice()), body)
                .map_err(|_| OpenError::Rejected(id.clone()))
        };
        if let Some(key) = self.keys.iter().find(|k| k.id == id) {
            return open(key, body);
        }
        // Sealed by a process that started after a rotation: the key file may
        // know the key now.
        let known = |ring: &Self| {
            ring.learned
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|k| k.id == id)
        };
        if known(self) || self.learn() {
            let learned = self.learned.read().unwrap_or_else(|e| e.into_inner());
            if let Some(key) = learned.iter().find(|k| k.id == id) {
                return open(key, body);
            }
        }
        Err(OpenError::UnknownKey(id))
    }
}

fn aad(magic: &[u8], name: &[u8]) -> Vec<u8> {
    let mut aad = magic.to_vec();
    aad.extend_from_slice(&(name.len() as u64).to_le_bytes());
    aad.extend_from_slice(name);
    aad
}

/// Best effort: overwrite plaintext before its buffer is freed.
pub(crate) fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    std::hint::black_box(buf);
}

/// A short public id of a key: the first 8 hex digits of its SHA-256.
fn key_id(key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(key)[..4])
}

pub use crate::config::default_key_file;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_binds_the_name_and_rejects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::load_or_create(&dir.path().join("k/key")).unwrap();
        let sealed = ring
            .seal(b"m1", b"alpha", b"secret-plain".to_vec())
            .unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("secret-plain"));
        let mut ok = sealed.clone();
        assert_eq!(
            ring.open(b"m1", b"alpha", &mut ok).unwrap(),
            b"secret-plain"
        );
        let mut other = sealed.clone();
        assert!(matches!(
            ring.open(b"m1", b"beta", &mut other),
            Err(OpenError::Rejected(_))
        ));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x80;
        assert!(matches!(
            ring.open(b"m1", b"alpha", &mut flipped),
            Err(OpenError::Rejected(_))
        ));
        for junk in [&b""[..], b"m1", b"m1\x05ab", b"xx"] {
            let mut j = junk.to_vec();
            assert!(ring.open(b"m1", b"alpha", &mut j).is_err());
        }
        let other_ring = KeyRing::load_or_create(&dir.path().join("k2/key")).unwrap();
        let mut foreign = sealed;
        assert!(matches!(
            other_ring.open(b"m1", b"alpha", &mut foreign),
            Err(OpenError::UnknownKey(_))
        ));
        assert_eq!(loose_permissions(&dir.path().join("k/key")), None);
        assert_eq!(loose_permissions(&dir.path().join("k")), None);
    }

    #[test]
    fn a_key_added_to_the_file_after_start_opens_what_it_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/key");
        let running = KeyRing::load_or_create(&path).unwrap();
        let old = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("v1 k2 {}\n{old}", "ef".repeat(32))).unwrap();
        let started_later = KeyRing::load_or_create(&path).unwrap();
        assert_eq!(started_later.key_id(), "k2");
        let mut sealed = started_later
            .seal(b"m1", b"p", b"rotated".to_vec())
            .unwrap();
        // The running process learns k2 from the file; it keeps sealing with its key.
        assert_eq!(running.open(b"m1", b"p", &mut sealed).unwrap(), b"rotated");
        assert_ne!(running.key_id(), "k2");
        // A ring from text has no file to learn from.
        let text = KeyRing::parse(&old, "runtime.key").unwrap();
        let mut again = started_later.seal(b"m1", b"p", b"x".to_vec()).unwrap();
        assert!(matches!(
            text.open(b"m1", b"p", &mut again),
            Err(OpenError::UnknownKey(_))
        ));
    }

    #[test]
    fn default_key_file_is_beside_the_directory() {
        assert_eq!(
            default_key_file(Path::new("/var/lib/reauth/state")),
            Path::new("/var/lib/reauth/state.keys/key")
        );
        assert_eq!(
            default_key_file(Path::new("./state/")),
            Path::new("./state.keys/key")
        );
    }

    #[test]
    fn a_broken_key_ring_is_an_error_naming_where_and_the_line() {
        for (text, why) in [
            ("v1 id nothex\n", "64 hex"),
            ("v2 id 00\n", "unknown version"),
            ("# only a comment\n", "no key"),
            (
                "v1 a/b 0000000000000000000000000000000000000000000000000000000000000000\n",
                "key id",
            ),
        ] {
            let err = KeyRing::parse(text, "runtime.key").unwrap_err().to_string();
            assert!(err.contains("runtime.key") && err.contains(why), "{err}");
            assert!(
                !err.contains("0000000000"),
                "the key is never in a message: {err}"
            );
        }
    }
}
